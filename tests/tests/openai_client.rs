//! The official OpenAI Python client, unchanged, against the real binary: structured
//! outputs as its users ask for them (`tests/clients/structured.py`: Pydantic parsing,
//! `json_object` whole and streamed, vLLM's extras through `extra_body`).
//! `scripts/fetch-clients.sh` installs the client (scripts/setup.sh runs it).

use std::process::Command;

use lynx_tests::{cache_dir, workspace_root, Server};

#[tokio::test]
async fn the_openai_python_client_gets_structured_outputs() {
    let python = cache_dir().join("clients-venv/bin/python");
    assert!(
        python.is_file(),
        "{} is missing: run scripts/fetch-clients.sh",
        python.display()
    );
    let server = Server::start().await;
    let script = workspace_root().join("tests/clients/structured.py");
    let base = server.base.clone();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python)
            .arg(script)
            .arg(base)
            .output()
            .expect("run the client")
    })
    .await
    .expect("client task");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the client failed:\n{stdout}\n{stderr}\nserver log:\n{}",
        server.log()
    );
    assert!(stdout.trim_end().ends_with("ok"), "{stdout}");
}
