//! Hot-swap on the real host: plugin files written, replaced (write-to-temp-then-rename)
//! and removed while traffic flows; refusals that leave the serving version in place;
//! the admin API and its token; SIGHUP; the compiled-plugin cache.
//!
//! The `swap` test plugin releases `[v1]` or `[v2]` for every token, so each response
//! shows which version served it, and whether versions mixed.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lynx_tests::swap::{
    admin, admin_until, entry, served_by, start, test_plugin, version_of, PluginDir, V1, V2,
};
use lynx_tests::{free_port, run_host, sse_data, Server};
use serde_json::{json, Value};

/// A streamed completion: `Ok(version)` if it completed wholly from one version.
async fn stream_once(client: &reqwest::Client, base: &str) -> Result<&'static str, String> {
    let body =
        json!({"prompt": "Once upon a time", "max_tokens": 4, "temperature": 0, "stream": true});
    let r = client
        .post(format!("{base}/v1/completions"))
        .json(&body)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if r.status() != 200 {
        return Err(format!("status {}", r.status()));
    }
    let mut buf = Vec::new();
    let mut chunks = r.bytes_stream();
    while let Some(chunk) = chunks.next().await {
        buf.extend_from_slice(&chunk.map_err(|e| e.to_string())?);
    }
    let events = sse_data(&String::from_utf8_lossy(&buf));
    if events.last().map(String::as_str) != Some("[DONE]") {
        return Err(format!("no [DONE]: {events:?}"));
    }
    let text: String = events
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .filter_map(|e| e["choices"][0]["text"].as_str().map(str::to_string))
        .collect();
    version_of(&text).ok_or_else(|| format!("mixed or empty: {text:?}"))
}

#[tokio::test]
async fn swapping_under_load_loses_nothing_and_never_mixes_versions() {
    let (v1, v2) = (test_plugin("swap-v1.wasm"), test_plugin("swap-v2.wasm"));
    let dir = PluginDir::new();
    dir.install("swap", &v1);
    // v2 also sits in the folder as a standby plugin, so it is compiled at start-up and
    // every swap below is a cache hit: the 1 s bound measures the swap, not cranelift
    // on two cores busy with 16 streams (the first-compile figure is in the log).
    dir.install("standby", &v2);
    let server = start(&dir, &["--kv-slots", "16"]).await;
    assert_eq!(served_by(&server).await, V1);

    // 16 streaming clients, until the swapping ends. Each records when it sent a request
    // and which version served it.
    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(Vec::<(Duration, Result<&str, String>)>::new()));
    let t0 = Instant::now();
    let mut clients = Vec::new();
    for _ in 0..16 {
        let (stop, seen) = (stop.clone(), seen.clone());
        let (client, base) = (server.client.clone(), server.base.clone());
        clients.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let sent = t0.elapsed();
                let result = stream_once(&client, &base).await;
                seen.lock().expect("seen").push((sent, result));
            }
        }));
    }
    // Requests that were sent after `since` and have completed.
    let completed_since = |since: Duration| {
        seen.lock()
            .expect("seen")
            .iter()
            .filter(|(sent, _)| *sent >= since)
            .count()
    };

    // 20 swaps, alternating versions. Each holds until a few requests sent from 1 s after
    // it have completed, so a slow machine stretches the test rather than leaving a
    // swap's window empty.
    let mut swaps = Vec::new();
    for i in 0..20 {
        let (bytes, version) = if i % 2 == 0 { (&v2, V2) } else { (&v1, V1) };
        let at = t0.elapsed();
        swaps.push((at, version));
        dir.install("swap", bytes);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let deadline = Instant::now() + Duration::from_secs(60);
        while completed_since(at + Duration::from_secs(1)) < 4 {
            assert!(Instant::now() < deadline, "traffic stalled after swap {i}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let end = t0.elapsed();
    for c in clients {
        c.await.expect("client task");
    }
    let seen = std::mem::take(&mut *seen.lock().expect("seen"));

    let failed: Vec<_> = seen.iter().filter(|(_, r)| r.is_err()).collect();
    assert!(failed.is_empty(), "{} failed: {failed:?}", failed.len());
    // Every request sent from 1 s after a swap until the next one saw that swap's
    // version (a request keeps the version it arrived under).
    let mut first_seen = Vec::new();
    for (i, &(at, version)) in swaps.iter().enumerate() {
        let until = swaps.get(i + 1).map_or(end, |s| s.0);
        let window: Vec<_> = seen
            .iter()
            .filter(|(sent, _)| *sent >= at + Duration::from_secs(1) && *sent < until)
            .collect();
        assert!(
            !window.is_empty(),
            "no request in swap {i}'s window ({} requests in all)",
            seen.len()
        );
        for (sent, r) in &window {
            assert_eq!(
                r.as_deref(),
                Ok(version),
                "swap {i} at {at:?}: request sent at {sent:?}"
            );
        }
        if let Some((sent, _)) = seen
            .iter()
            .filter(|(sent, r)| *sent >= at && *sent < until && r.as_deref() == Ok(version))
            .min_by_key(|(sent, _)| *sent)
        {
            first_seen.push(*sent - at);
        }
    }
    first_seen.sort();
    eprintln!(
        "{} streamed requests, 0 failed; rename → first request on the new version: median {:?}, max {:?}",
        seen.len(),
        first_seen[first_seen.len() / 2],
        first_seen.last()
    );
    let log = server.log();
    assert!(
        log.contains("memory cache"),
        "swapping back recompiled:\n{log}"
    );
}

#[tokio::test]
async fn refused_files_leave_the_serving_version_in_place() {
    let (v1, v2) = (test_plugin("swap-v1.wasm"), test_plugin("swap-v2.wasm"));
    let dir = PluginDir::new();
    dir.install("swap", &v1);
    let server = start(&dir, &[]).await;
    let v1_sha = entry(&admin(&server).await, "swap")["sha256"].clone();

    let truncated = v2[..v2.len() / 2].to_vec();
    let cases: [(&str, Vec<u8>, &str); 4] = [
        (
            "corrupt",
            b"\0asm\x0d\0\x01\0garbage".to_vec(),
            "not a valid WebAssembly component",
        ),
        (
            "wrong WIT version",
            test_plugin("future.wasm"),
            "lynx:plugin@0.9.0",
        ),
        ("truncated", truncated, "not a valid WebAssembly component"),
        (
            "trapping smoke call",
            test_plugin("swap-smoke-trap.wasm"),
            "smoke call",
        ),
    ];
    for (what, bytes, reason) in cases {
        dir.install("swap", &bytes);
        let e = admin_until(&server, "swap", |e| {
            e["last_error"].as_str().is_some_and(|m| m.contains(reason))
        })
        .await;
        assert_eq!(e["state"], "active", "{what}: {e}");
        assert_eq!(e["sha256"], v1_sha, "{what}: {e}");
        assert_eq!(served_by(&server).await, V1, "{what}");
    }
    assert!(server.log().contains("plugin file refused"));

    dir.install("swap", &v2);
    let e = admin_until(&server, "swap", |e| e["sha256"] != v1_sha).await;
    assert!(e["last_error"].is_null(), "{e}");
    assert_eq!(served_by(&server).await, V2);
}

#[tokio::test]
async fn removing_the_active_plugin_keeps_its_last_good_version() {
    let (v1, v2) = (test_plugin("swap-v1.wasm"), test_plugin("swap-v2.wasm"));
    let dir = PluginDir::new();
    dir.install("swap", &v1);
    dir.install("other", &v2);
    let server = start(&dir, &[]).await;
    let view = admin(&server).await;
    assert_eq!(view["active"], "swap");
    assert_eq!(entry(&view, "swap")["state"], "active");
    assert_eq!(entry(&view, "other")["state"], "standby");
    assert_eq!(entry(&view, "swap")["wit_version"], "0.3.0");

    dir.remove("swap");
    admin_until(&server, "swap", |e| e["state"] == "removed").await;
    assert_eq!(served_by(&server).await, V1);

    dir.install("swap", &v2);
    admin_until(&server, "swap", |e| e["state"] == "active").await;
    assert_eq!(served_by(&server).await, V2);

    // A standby plugin removed just leaves the view.
    dir.remove("other");
    let deadline = Instant::now() + Duration::from_secs(10);
    while admin(&server).await["plugins"]
        .as_array()
        .is_some_and(|p| p.iter().any(|e| e["name"] == "other"))
    {
        assert!(
            Instant::now() < deadline,
            "removed standby plugin still listed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn admin_reload_and_sighup_pick_up_changes() {
    let (v1, v2) = (test_plugin("swap-v1.wasm"), test_plugin("swap-v2.wasm"));
    let dir = PluginDir::new();
    dir.install("swap", &v1);
    let server = start(&dir, &[]).await;
    let v1_sha = entry(&admin(&server).await, "swap")["sha256"].clone();

    let r = server
        .client
        .post(format!("{}/admin/plugins/reload", server.admin))
        .json(&json!({}))
        .send()
        .await
        .expect("reload");
    assert_eq!(r.status(), 200);
    let view: Value = r.json().await.expect("json");
    assert_eq!(entry(&view, "swap")["state"], "active");

    dir.install("swap", &v2);
    let status = std::process::Command::new("kill")
        .args(["-HUP", &server.pid().to_string()])
        .status()
        .expect("kill -HUP");
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    while !server.log().contains("SIGHUP: reloading plugins") {
        assert!(
            Instant::now() < deadline,
            "no SIGHUP reload:\n{}",
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    admin_until(&server, "swap", |e| e["sha256"] != v1_sha).await;
    assert_eq!(served_by(&server).await, V2);

    // The admin API is not on the public port.
    let r = server
        .client
        .get(server.url("/admin/plugins"))
        .send()
        .await
        .expect("public");
    assert_eq!(r.status(), 404);
}

#[tokio::test]
async fn the_admin_api_beyond_loopback_requires_a_token() {
    let addr = format!("0.0.0.0:{}", free_port());
    let (ok, out) = run_host(&["--listen", "127.0.0.1:0", "--admin-listen", &addr]);
    assert!(!ok, "started without a token:\n{out}");
    assert!(out.contains("LYNX_ADMIN_TOKEN"), "{out}");

    let server = Server::start_with(&["--admin-listen", &addr, "--admin-token", "s3cret"]).await;
    let url = format!("{}/admin/plugins", server.admin);
    for auth in [None, Some("Bearer wrong"), Some("s3cret")] {
        let mut req = server.client.get(&url);
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        let r = req.send().await.expect("admin");
        assert_eq!(r.status(), 401, "{auth:?}");
        let body: Value = r.json().await.expect("json");
        assert_eq!(body["error"]["type"], "authentication_error");
    }
    let r = server
        .client
        .get(&url)
        .bearer_auth("s3cret")
        .send()
        .await
        .expect("admin");
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn compiled_plugins_are_cached_by_sha256_across_restarts() {
    let dir = PluginDir::new();
    dir.install("swap", &test_plugin("swap-v1.wasm"));
    // The cache lives apart from the plugin folder (the host refuses it inside).
    let apart = PluginDir::new();
    let cache = apart.0.join("cache");
    let cache_arg = cache.to_str().expect("utf-8").to_string();
    let first = start(&dir, &["--plugin-cache-dir", &cache_arg]).await;
    assert!(
        first.log().contains("source=\"compiled\""),
        "{}",
        first.log()
    );
    drop(first);
    let artifacts: Vec<PathBuf> = std::fs::read_dir(&cache)
        .expect("cache dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "cwasm"))
        .collect();
    assert_eq!(artifacts.len(), 1, "{artifacts:?}");
    let stem = artifacts[0]
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or_default();
    assert_eq!(stem.len(), 64, "named by sha256: {stem}");

    let second = start(&dir, &["--plugin-cache-dir", &cache_arg]).await;
    assert!(
        second.log().contains("source=\"disk cache\""),
        "{}",
        second.log()
    );
    assert_eq!(served_by(&second).await, V1);
}
