//! Graceful shutdown of the real binary: on SIGTERM the listener closes at once, the
//! health check says `draining`, in-flight streams run to their end, and the process
//! exits 0; streams still running when the grace period ends get an error event.

use std::time::Duration;

use futures_util::StreamExt;
use lynx_tests::{assert_complete, sse_data, Server};
use serde_json::{json, Value};
use tokio::sync::mpsc;

/// Starts `n` streamed completions; each reports when its first chunk has arrived, and
/// yields every `data:` payload once its stream ends.
fn start_streams(
    server: &Server,
    n: usize,
    body: Value,
) -> (
    mpsc::Receiver<()>,
    Vec<tokio::task::JoinHandle<Vec<String>>>,
) {
    let (first_tx, first_rx) = mpsc::channel(n);
    let tasks = (0..n)
        .map(|i| {
            let (client, url, first) = (
                server.client.clone(),
                server.url("/v1/completions"),
                first_tx.clone(),
            );
            let mut body = body.clone();
            body["seed"] = json!(i);
            tokio::spawn(async move {
                let r = client.post(url).json(&body).send().await.expect("request");
                assert_eq!(r.status().as_u16(), 200);
                let mut chunks = r.bytes_stream();
                let mut buf = Vec::new();
                let mut told = false;
                while let Some(chunk) = chunks.next().await {
                    buf.extend_from_slice(&chunk.expect("the stream was cut"));
                    if !told {
                        let _ = first.send(()).await;
                        told = true;
                    }
                }
                sse_data(&String::from_utf8_lossy(&buf))
            })
        })
        .collect();
    (first_rx, tasks)
}

async fn wait_draining(server: &Server) {
    for _ in 0..200 {
        if let Ok(r) = server
            .client
            .get(format!("{}/health", server.admin))
            .send()
            .await
        {
            if r.status().as_u16() == 503 {
                let body: Value = r.json().await.expect("health json");
                assert_eq!(body["status"], "draining");
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("/health never reported draining; log:\n{}", server.log());
}

#[tokio::test]
async fn sigterm_lets_in_flight_streams_finish_and_exits_0() {
    let mut server = Server::start_with(&["--shutdown-grace", "60"]).await;
    let body =
        json!({"prompt": "Once upon a time", "max_tokens": 48, "temperature": 0.8, "stream": true});
    let (mut first, tasks) = start_streams(&server, 8, body);
    for _ in 0..8 {
        first.recv().await.expect("every stream started");
    }
    server.signal("TERM");
    wait_draining(&server).await;
    // No new connection is accepted once the signal has been handled.
    let refused = server.client.get(server.url("/health")).send().await;
    assert!(
        refused.is_err(),
        "a new connection was served after SIGTERM: {refused:?}"
    );
    assert!(tokio::net::TcpStream::connect(server.addr()).await.is_err());
    for task in tasks {
        assert_complete(&task.await.expect("stream task"));
    }
    let status = server.wait_exit(Duration::from_secs(30)).await;
    assert_eq!(status.code(), Some(0), "log:\n{}", server.log());
}

#[tokio::test]
async fn streams_past_the_grace_period_end_with_an_error_event() {
    let mut server = Server::start_with(&["--shutdown-grace", "1"]).await;
    // Greedy counting runs to max_tokens: far longer than the grace period.
    let body = json!({"prompt": "1, 2, 3, 4, 5, 6, 7, 8,", "max_tokens": 4000, "temperature": 0, "stream": true});
    let (mut first, tasks) = start_streams(&server, 3, body);
    for _ in 0..3 {
        first.recv().await.expect("every stream started");
    }
    server.signal("TERM");
    for task in tasks {
        let events = task.await.expect("stream task");
        let last: Value = serde_json::from_str(events.last().expect("events")).expect("json");
        assert_eq!(last["error"]["code"], "shutting_down", "{events:?}");
    }
    let status = server.wait_exit(Duration::from_secs(30)).await;
    assert_eq!(status.code(), Some(0), "log:\n{}", server.log());
}
