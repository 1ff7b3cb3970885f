//! The official OpenAI Python client, unchanged, against the real binary: structured
//! outputs as its users ask for them (`tests/clients/structured.py`: Pydantic parsing,
//! `json_object` whole and streamed, vLLM's extras through `extra_body`), and the API's
//! other fields read through the client's typed models (`tests/clients/parity.py`:
//! log-probabilities on both routes, echo, `n`, cached tokens, penalties), and tool
//! requests refused as the client's error until a plugin serves them, never answered
//! with their tools dropped (`tests/clients/tools.py`).
//! Every script runs under the client pinned in `tests/clients/requirements.txt` and
//! under its current 3.x release (`requirements-current.txt`), both installed by
//! `scripts/fetch-clients.sh` (scripts/setup.sh runs it).

use std::process::Command;

use lynx_tests::{cache_dir, workspace_root, Server};

#[tokio::test]
async fn the_openai_python_client_gets_structured_outputs() {
    run_client("structured.py").await;
}

#[tokio::test]
async fn the_openai_python_client_reads_logprobs_n_and_cached_tokens_typed() {
    run_client("parity.py").await;
}

#[tokio::test]
async fn the_openai_python_client_is_refused_tools_not_served_without_them() {
    run_client("tools.py").await;
}

/// The client's virtual environments: pinned, and the current 3.x release.
const CLIENTS: [&str; 2] = ["clients-venv", "clients-current-venv"];

/// Runs a client script against a fresh server under each client; it prints `ok`
/// when all held.
async fn run_client(name: &str) {
    let server = Server::start().await;
    for venv in CLIENTS {
        let python = cache_dir().join(venv).join("bin/python");
        assert!(
            python.is_file(),
            "{} is missing: run scripts/fetch-clients.sh",
            python.display()
        );
        let script = workspace_root().join("tests/clients").join(name);
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
            "{name} under {venv} failed:\n{stdout}\n{stderr}\nserver log:\n{}",
            server.log()
        );
        assert!(stdout.trim_end().ends_with("ok"), "{venv}: {stdout}");
    }
}
