//! The plugin supply chain on the real host: only code the operator deployed runs.
//! A forged compile-cache artifact, an untrusted cache folder, hostile entries in the
//! plugin folder, a file touched without end, cross-site and rebinding calls to the
//! admin API, an empty admin token, a swap to a failing version (rolled back on its
//! own), an oversized instance pool, and WASI granted deny-by-default.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lynx_tests::swap::{
    admin, admin_until, entry, served_by, start, test_plugin, version, PluginDir, V1, V2,
};
use lynx_tests::{host_binary, plugins_dist, run_host, Server};
use serde_json::{json, Value};

fn cwasm_files(cache: &Path) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(cache)
        .expect("cache dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "cwasm"))
        .collect()
}

#[tokio::test]
async fn a_forged_artifact_named_for_a_plugin_is_refused_and_recompiled() {
    let dir = PluginDir::new();
    dir.install("swap", &test_plugin("swap-v1.wasm"));
    dir.install("other", &test_plugin("swap-v2.wasm"));
    let apart = PluginDir::new();
    let cache = apart.0.join("cache");
    let cache_arg = cache.to_str().expect("utf-8").to_string();
    let first = start(&dir, &["--plugin-cache-dir", &cache_arg]).await;
    let view = admin(&first).await;
    let v1_sha = entry(&view, "swap")["sha256"]
        .as_str()
        .expect("sha")
        .to_string();
    let v2_sha = entry(&view, "other")["sha256"]
        .as_str()
        .expect("sha")
        .to_string();
    drop(first);
    assert_eq!(cwasm_files(&cache).len(), 2);

    // The attack: v2's genuine native artifact, under the name of v1's public sha256.
    std::fs::copy(
        cache.join(format!("{v2_sha}.cwasm")),
        cache.join(format!("{v1_sha}.cwasm")),
    )
    .expect("forge");
    let second = start(&dir, &["--plugin-cache-dir", &cache_arg]).await;
    let log = second.log();
    assert!(log.contains("failed authentication"), "{log}");
    assert_eq!(served_by(&second).await, V1, "v1's own code serves");
    let active = log
        .lines()
        .find(|l| l.contains("plugin active"))
        .unwrap_or_default();
    assert!(active.contains("source=\"compiled\""), "{active}");
    drop(second);

    // The recompiled artifact replaced the forgery: the next start uses it.
    let third = start(&dir, &["--plugin-cache-dir", &cache_arg]).await;
    let active = third
        .log()
        .lines()
        .find(|l| l.contains("plugin active"))
        .unwrap_or_default()
        .to_string();
    assert!(active.contains("source=\"disk cache\""), "{active}");
    assert_eq!(served_by(&third).await, V1);
    let mode = std::fs::metadata(&cache)
        .expect("cache")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o700, "the cache folder is private");
}

#[test]
fn an_untrusted_cache_folder_refuses_to_start() {
    let loose = std::env::temp_dir().join(format!("lynx-loose-cache-{}", std::process::id()));
    std::fs::create_dir_all(&loose).expect("loose");
    std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let plugins = plugins_dist();
    let plugins = plugins.to_str().expect("utf-8");
    let (ok, out) = run_host(&[
        "--plugins-dir",
        plugins,
        "--plugin-cache-dir",
        loose.to_str().expect("utf-8"),
    ]);
    let _ = std::fs::remove_dir_all(&loose);
    assert!(!ok, "started on a world-writable cache:\n{out}");
    assert!(out.contains("writable by group or others"), "{out}");

    let nested = format!("{plugins}/compiled");
    let (ok, out) = run_host(&["--plugins-dir", plugins, "--plugin-cache-dir", &nested]);
    let _ = std::fs::remove_dir_all(&nested);
    assert!(!ok, "started on a cache inside the plugin folder:\n{out}");
    assert!(out.contains("inside the plugin folder"), "{out}");
}

#[tokio::test]
async fn hostile_folder_entries_are_refused_with_their_reason_while_serving_goes_on() {
    let dir = PluginDir::new();
    dir.install("swap", &test_plugin("swap-v1.wasm"));
    // The swap plugin (about 1 MB) is under this cap; `big`, 2 MiB, is over it (the
    // size is checked before anything is parsed).
    let server = start(&dir, &["--plugin-max-bytes", "1500000"]).await;

    let fifo =
        std::ffi::CString::new(dir.file("fifo.wasm").to_str().expect("utf-8")).expect("path");
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0, "mkfifo");
    std::os::unix::fs::symlink("/dev/zero", dir.file("zero.wasm")).expect("symlink");
    let mut big = test_plugin("stdlib.wasm");
    big.resize(2 << 20, 0);
    dir.install("big", &big);

    let fifo_entry = admin_until(&server, "fifo", |e| !e["last_error"].is_null()).await;
    assert!(
        fifo_entry["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("FIFO")),
        "{fifo_entry}"
    );
    assert_eq!(fifo_entry["state"], "refused");
    let zero = admin_until(&server, "zero", |e| !e["last_error"].is_null()).await;
    assert!(
        zero["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("symlink")),
        "{zero}"
    );
    let big = admin_until(&server, "big", |e| !e["last_error"].is_null()).await;
    assert!(
        big["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("cap is 1500000 bytes")),
        "{big}"
    );
    assert_eq!(served_by(&server).await, V1);

    // The active plugin's file replaced by a symlink to /dev/zero: refused, v1 serves.
    let link = dir.0.join(".swap.link");
    std::os::unix::fs::symlink("/dev/zero", &link).expect("symlink");
    std::fs::rename(&link, dir.file("swap.wasm")).expect("rename");
    let swap = admin_until(&server, "swap", |e| {
        e["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("symlink"))
    })
    .await;
    assert_eq!(swap["state"], "active");
    assert_eq!(served_by(&server).await, V1);

    // Nothing is stuck: the reload lock is free, and a real swap goes live.
    dir.install("swap", &test_plugin("swap-v2.wasm"));
    admin_until(&server, "swap", |e| e["last_error"].is_null()).await;
    assert_eq!(served_by(&server).await, V2);
    let health = server.health_status().await;
    assert_eq!(health, 200);
}

#[tokio::test]
async fn a_file_touched_without_end_does_not_hold_back_a_swap() {
    let dir = PluginDir::new();
    dir.install("swap", &test_plugin("swap-v1.wasm"));
    let server = start(&dir, &[]).await;
    let noise = dir.file("noise.wasm");
    let bytes = test_plugin("future.wasm");
    let stop = Arc::new(AtomicBool::new(false));
    let toucher = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                std::fs::write(&noise, &bytes).expect("touch");
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t0 = Instant::now();
    dir.install("swap", &test_plugin("swap-v2.wasm"));
    let deadline = Instant::now() + Duration::from_secs(15);
    while version(&server).await != "version-v2" {
        assert!(
            Instant::now() < deadline,
            "the swap never went live while another file was being touched:\n{}",
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = t0.elapsed();
    stop.store(true, Ordering::Relaxed);
    toucher.join().expect("toucher");
    // Debounce at most MAX_WAIT (1 s) plus the load: far below the 15 s bound.
    eprintln!("swap live {took:?} after the rename, with a file touched every 50 ms");
}

#[tokio::test]
async fn admin_calls_need_json_and_a_loopback_host_without_a_token() {
    let server = Server::start().await;
    let reload = format!("{}/admin/plugins/reload", server.admin);
    let list = format!("{}/admin/plugins", server.admin);

    // A cross-site form post: no JSON content type.
    let r = server
        .client
        .post(&reload)
        .header("content-type", "application/x-www-form-urlencoded")
        .body("a=b")
        .send()
        .await
        .expect("form");
    assert_eq!(r.status(), 415);
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["error"]["type"], "invalid_request_error");

    // DNS rebinding: the right address, a foreign Host.
    for (name, value) in [
        ("host", "evil.example:9000"),
        ("host", "127.0.0.1.evil.example"),
    ] {
        let r = server
            .client
            .get(&list)
            .header(name, value)
            .send()
            .await
            .expect("rebinding");
        assert_eq!(r.status(), 403, "{value}");
        let body: Value = r.json().await.expect("json");
        assert_eq!(body["error"]["type"], "permission_error");
    }
    // A page of another origin posting JSON (only possible after a CORS preflight,
    // which is never granted; refused anyway).
    let r = server
        .client
        .post(&reload)
        .header("origin", "http://evil.example")
        .json(&json!({}))
        .send()
        .await
        .expect("origin");
    assert_eq!(r.status(), 403);

    let r = server
        .client
        .post(&reload)
        .json(&json!({}))
        .send()
        .await
        .expect("reload");
    assert_eq!(r.status(), 200);
    let log = server.log();
    assert!(
        log.lines()
            .any(|l| l.contains("admin action") && l.contains("POST /admin/plugins/reload")),
        "{log}"
    );
    assert!(log.contains("admin request refused"), "{log}");
}

#[tokio::test]
async fn the_admin_token_comes_from_a_file_and_cannot_be_empty() {
    let (ok, out) = run_host(&["--admin-token", ""]);
    assert!(!ok, "started with an empty token:\n{out}");
    assert!(out.contains("admin token is empty"), "{out}");

    let out = Command::new(host_binary())
        .env("LYNX_ADMIN_TOKEN", "")
        .env("LYNX_LOG", "info")
        .output()
        .expect("run");
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started with LYNX_ADMIN_TOKEN=\"\"");
    assert!(text.contains("admin token is empty"), "{text}");

    let dir = PluginDir::new();
    let file = dir.file("token");
    std::fs::write(&file, "   \n").expect("token");
    let (ok, out) = run_host(&["--admin-token-file", file.to_str().expect("utf-8")]);
    assert!(!ok && out.contains("admin token is empty"), "{out}");

    std::fs::write(&file, "a-long-admin-token-from-a-file\n").expect("token");
    let server = Server::start_with(&["--admin-token-file", file.to_str().expect("utf-8")]).await;
    let url = format!("{}/admin/plugins", server.admin);
    let r = server.client.get(&url).send().await.expect("admin");
    assert_eq!(r.status(), 401);
    let r = server
        .client
        .get(&url)
        .bearer_auth("a-long-admin-token-from-a-file")
        // With a token, the Host no longer matters (the token is the proof).
        .header("host", "lynx.internal:9000")
        .send()
        .await
        .expect("admin");
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn a_version_failing_half_its_requests_is_rolled_back_and_a_good_one_still_goes_live() {
    let dir = PluginDir::new();
    dir.install("swap", &test_plugin("swap-v1.wasm"));
    let server = start(
        &dir,
        &[
            "--plugin-rollback-window",
            "10",
            "--plugin-rollback-share",
            "0.2",
        ],
    )
    .await;
    assert_eq!(version(&server).await, "version-v1");
    let flaky = test_plugin("swap-flaky.wasm");
    dir.install("swap", &flaky);
    let deadline = Instant::now() + Duration::from_secs(10);
    while version(&server).await != "version-v3" {
        assert!(Instant::now() < deadline, "flaky never went live");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Half of these fail (odd-length prompts trap in the flaky policy): the third
    // failure is more than 20% of a 10-request window, whatever comes after.
    let mut failures = 0;
    for i in 0..10 {
        let prompt = if i % 2 == 0 {
            "Once upon a time"
        } else {
            "Once upon a time!"
        };
        let (status, _) = server
            .post(
                "/v1/completions",
                &json!({"prompt": prompt, "max_tokens": 2, "temperature": 0}),
            )
            .await;
        if status == 500 {
            failures += 1;
        }
    }
    assert!(failures >= 3, "{failures} failures");
    let deadline = Instant::now() + Duration::from_secs(5);
    while version(&server).await != "version-v1" {
        assert!(
            Instant::now() < deadline,
            "never rolled back:\n{}",
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let swap = entry(&admin(&server).await, "swap").clone();
    assert_eq!(swap["state"], "active");
    let quarantined = &swap["quarantined"];
    assert!(
        quarantined["reason"]
            .as_str()
            .is_some_and(|r| r.contains("rolled back")),
        "{swap}"
    );
    assert!(server.log().contains("plugin rolled back"));

    // The same bad file written again stays quarantined.
    dir.install("swap", &flaky);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(version(&server).await, "version-v1");
    assert_eq!(served_by(&server).await, V1);

    // A new, good version goes live and lifts the quarantine.
    dir.install("swap", &test_plugin("swap-v2.wasm"));
    let swap = admin_until(&server, "swap", |e| e["quarantined"].is_null()).await;
    assert_eq!(swap["state"], "active");
    assert_eq!(served_by(&server).await, V2);
}

#[test]
fn an_instance_pool_the_process_cannot_reserve_refuses_to_start() {
    let (ok, out) = run_host(&[
        "--plugins-dir",
        plugins_dist().to_str().expect("utf-8"),
        "--plugin-instances",
        "65536",
        "--plugin-memory-mib",
        "4096",
    ]);
    assert!(!ok, "started with a 512 TiB pool:\n{out}");
    assert!(out.contains("address space"), "{out}");
}

#[tokio::test]
async fn an_ordinary_rust_plugin_gets_clocks_random_and_stdout_and_nothing_else() {
    let dir = PluginDir::new();
    dir.install("stdlib", &test_plugin("stdlib.wasm"));
    let server = Server::start_with(&["--plugins-dir", dir.path(), "--plugin", "stdlib"]).await;
    let (status, body) = server
        .post(
            "/v1/completions",
            &json!({"prompt": "the cat and the hat", "max_tokens": 3}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let log = server.log();
    assert!(
        log.lines()
            .any(|l| l.contains("stdlib plugin: 4 distinct words") && l.contains("stdlib")),
        "println! reaches the host log, attributed:\n{log}"
    );
    assert!(log.contains("stderr works too"), "{log}");

    // A listener the plugin is told to connect to: nothing may arrive.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let addr = listener.local_addr().expect("addr");
    let (status, body) = server
        .post(
            "/v1/completions",
            &json!({"prompt": format!("lynx:probe {addr}")}),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "probe", "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    for expected in [
        "fs=error",
        "env=error",
        "vars=0",
        "args=0",
        "net=error",
        "clock=ok",
    ] {
        assert!(message.contains(expected), "{expected}: {message}");
    }
    assert!(!message.contains("DATA"), "{message}");
    assert!(listener.accept().is_err(), "the plugin reached a socket");
    assert_eq!(server.health_status().await, 200);
}
