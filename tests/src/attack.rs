//! Attacks the tests mount against the real binary: an HTTP/2 client that never opens
//! its flow-control window.

use std::time::Duration;

use bytes::Bytes;
use serde_json::json;

/// Opens `n` streamed `n=choices, max_tokens=2` completions on one HTTP/2 connection whose
/// stream window is 0: the server may send headers, never a byte of body. Returns the
/// statuses and the connection's task (it ends when the server cuts the connection).
pub async fn zero_window_client(
    addr: &str,
    n: usize,
    choices: usize,
) -> (Vec<u16>, tokio::task::JoinHandle<Result<(), h2::Error>>) {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (client, connection) = h2::client::Builder::new()
        .initial_window_size(0)
        .handshake::<_, Bytes>(tcp)
        .await
        .expect("h2 handshake");
    let task = tokio::spawn(connection);
    let body = json!({"prompt": "Once upon a time", "n": choices, "max_tokens": 2,
                      "temperature": 0.7, "stream": true})
    .to_string();
    let mut responses = Vec::new();
    let mut client = client;
    for _ in 0..n {
        client = client.ready().await.expect("stream capacity");
        let req = http::Request::post(format!("http://{addr}/v1/completions"))
            .header("content-type", "application/json")
            .body(())
            .expect("request");
        let (response, mut send) = client.send_request(req, false).expect("send");
        send.send_data(Bytes::from(body.clone()), true)
            .expect("body");
        responses.push(response);
    }
    let mut statuses = Vec::new();
    for r in responses {
        let r = tokio::time::timeout(Duration::from_secs(60), r)
            .await
            .expect("headers in time")
            .expect("response headers");
        statuses.push(r.status().as_u16());
        // The body is never read: its window stays 0.
        std::mem::forget(r);
    }
    // Keep the client open (dropping it would close the connection).
    std::mem::forget(client);
    (statuses, task)
}
