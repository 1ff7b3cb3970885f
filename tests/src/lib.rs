//! Harness for the end-to-end tests: starts the real `lynx-host` binary on the real
//! default model on a free loopback port, and reads its `/metrics` as parsed samples.
//!
//! The binary is `target/release/lynx-host` (built by `scripts/test.sh`), or `LYNX_BIN`.
//! A missing binary or model fails the test loudly: nothing here skips.

use std::collections::BTreeSet;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub mod attack;
pub mod nll;
pub mod prom;
pub mod swap;

use futures_util::StreamExt;
use serde_json::Value;

pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default()
}

/// The lynx cache folder, where scripts/fetch-model.sh and fetch-conformance.sh put
/// what they fetch: `LYNX_CACHE_DIR`, else `$XDG_CACHE_HOME/lynx`, else `~/.cache/lynx`.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("LYNX_CACHE_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|x| PathBuf::from(x).join("lynx")))
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/lynx")))
        .unwrap_or_else(|| PathBuf::from(".cache/lynx"))
}

/// A fetched model's path; panics naming the fetch command when it is missing.
pub fn cached_model(file: &str, fetch: &str) -> PathBuf {
    let path = cache_dir().join("models").join(file);
    assert!(path.is_file(), "{} is missing: run {fetch}", path.display());
    path
}

pub fn host_binary() -> PathBuf {
    let path = std::env::var_os("LYNX_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/release/lynx-host"));
    assert!(
        path.exists(),
        "lynx-host binary not found at {}: build it with `cargo build --release -p lynx-server` (scripts/test.sh does)",
        path.display()
    );
    path
}

/// Reads until the peer closes the connection; what it sent, or `None` if it was still
/// open after `within`.
pub fn read_until_closed(stream: &mut std::net::TcpStream, within: Duration) -> Option<String> {
    use std::io::Read;
    stream.set_read_timeout(Some(within)).expect("timeout");
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return Some(String::from_utf8_lossy(&got).into_owned()),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                return Some(String::from_utf8_lossy(&got).into_owned())
            }
            Err(_) => return None,
        }
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// The plugins built by `scripts/build-plugins.sh`: `default.wasm`, `strict.wasm`, and
/// under `test/` the hostile and wrong-version ones.
pub fn plugins_dist() -> PathBuf {
    let dir = workspace_root().join("plugins/dist");
    assert!(
        dir.join("default.wasm").exists(),
        "plugins not built at {}: run scripts/build-plugins.sh (scripts/test.sh does)",
        dir.display()
    );
    dir
}

/// Runs `lynx-host ARGS` to completion (for commands and refused start-ups): whether
/// it succeeded, and its stdout and stderr together.
pub fn run_host(args: &[&str]) -> (bool, String) {
    let out = Command::new(host_binary())
        .args(args)
        .env("LYNX_LOG", "info")
        .output()
        .expect("run lynx-host");
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// A running `lynx-host`, killed on drop.
pub struct Server {
    child: Child,
    pub base: String,
    /// The admin listener's base URL.
    pub admin: String,
    pub client: reqwest::Client,
    log: PathBuf,
}

impl Server {
    pub async fn start() -> Server {
        Self::start_with(&[]).await
    }

    /// Starts the binary with `args` on free ports. A port taken between `free_port`
    /// and the bind (by another test running in parallel) is retried on new ports; any
    /// other start-up failure panics with the log.
    pub async fn start_with(args: &[&str]) -> Server {
        for _ in 0..3 {
            match Self::try_start(args).await {
                Ok(server) => return server,
                Err(log) if log.contains("Address already in use") => continue,
                Err(log) => panic!("lynx-host exited at start-up; its log:\n{log}"),
            }
        }
        panic!("lynx-host found no free port in three tries")
    }

    async fn try_start(args: &[&str]) -> Result<Server, String> {
        let port = free_port();
        let log = std::env::temp_dir().join(format!("lynx-host-{port}.log"));
        let log_file = std::fs::File::create(&log).expect("log file");
        let mut command = Command::new(host_binary());
        command.args(["--listen", &format!("127.0.0.1:{port}")]);
        if !args.contains(&"--plugins-dir") {
            command.arg("--plugins-dir").arg(plugins_dist());
        }
        let admin_addr = match args.iter().position(|a| *a == "--admin-listen") {
            Some(i) => args.get(i + 1).expect("--admin-listen ADDR").to_string(),
            None => {
                let addr = format!("127.0.0.1:{}", free_port());
                command.args(["--admin-listen", &addr]);
                addr
            }
        };
        let child = command
            .args(args)
            .env("LYNX_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("spawn lynx-host");
        let mut server = Server {
            child,
            base: format!("http://127.0.0.1:{port}"),
            admin: format!(
                "http://127.0.0.1:{}",
                admin_addr.rsplit(':').next().unwrap_or_default()
            ),
            client: reqwest::Client::new(),
            log,
        };
        server.wait_ready().await?;
        Ok(server)
    }

    /// Waits for `/health`; the log if the process exited first.
    async fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("(exit {status})\n{}", self.log()));
            }
            if let Ok(r) = self.client.get(self.url("/health")).send().await {
                if r.status().is_success() {
                    return Ok(());
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("lynx-host did not become ready; its log:\n{}", self.log());
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` (e.g. `TERM`) to the server process.
    pub fn signal(&self, signal: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{signal}"), &self.pid().to_string()])
            .status()
            .expect("run kill")
            .success();
        assert!(ok, "kill -{signal} {} failed", self.pid());
    }

    /// Waits up to `within` for the process to exit; its exit status.
    pub async fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "lynx-host did not exit within {within:?}; its log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The public listener's `host:port`.
    pub fn addr(&self) -> String {
        self.base.trim_start_matches("http://").to_string()
    }

    /// The process' resident set size in KiB, from /proc.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("/proc/PID/status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/PID/status")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let r = self
            .client
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .expect("request");
        let status = r.status().as_u16();
        let text = r.text().await.expect("body");
        let json = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, json)
    }

    /// A POST of `body` as it is, labelled JSON: for bodies that are not valid JSON.
    pub async fn post_raw(&self, path: &str, body: impl Into<reqwest::Body>) -> (u16, Value) {
        let r = self
            .client
            .post(self.url(path))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("request");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// The token ids `/tokenize` gives `text` (with the BOS and other special tokens
    /// the policy adds when `special`).
    pub async fn tokenize(&self, text: &str, special: bool) -> Vec<u64> {
        let body = serde_json::json!({"prompt": text, "add_special_tokens": special});
        let (status, answer) = self.post("/tokenize", &body).await;
        assert_eq!(status, 200, "{answer}");
        answer["tokens"]
            .as_array()
            .expect("tokens")
            .iter()
            .map(|t| t.as_u64().expect("id"))
            .collect()
    }

    /// A streamed request: every `data:` payload, `[DONE]` included.
    pub async fn stream(&self, path: &str, body: &Value) -> Vec<String> {
        let r = self
            .client
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .expect("request");
        assert_eq!(r.status().as_u16(), 200);
        let mut bytes = r.bytes_stream();
        let mut buf = Vec::new();
        while let Some(chunk) = bytes.next().await {
            buf.extend_from_slice(&chunk.expect("stream chunk"));
        }
        sse_data(&String::from_utf8_lossy(&buf))
    }

    /// The status `/health` answers.
    /// A GET of the admin API, as JSON (it must answer 200).
    pub async fn admin_get(&self, path: &str) -> Value {
        let r = self
            .client
            .get(format!("{}{path}", self.admin))
            .send()
            .await
            .expect("admin request");
        assert_eq!(r.status(), 200, "{path}");
        r.json().await.expect("admin json")
    }

    pub async fn health_status(&self) -> u16 {
        self.health().await.0
    }

    /// The status and body `/health` answers.
    pub async fn health(&self) -> (u16, Value) {
        let r = self
            .client
            .get(self.url("/health"))
            .send()
            .await
            .expect("health");
        let status = r.status().as_u16();
        (status, r.json().await.expect("health body"))
    }

    pub async fn metrics(&self) -> Metrics {
        let text = self
            .client
            .get(self.url("/metrics"))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics body");
        Metrics::parse(&text)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Asserts that a stream's `data:` payloads make a complete answer: a final chunk with
/// a finish reason, then `[DONE]`.
/// The text of a completion or chat completion answer.
pub fn answer_text(body: &Value) -> String {
    let choice = &body["choices"][0];
    choice["message"]["content"]
        .as_str()
        .or_else(|| choice["text"].as_str())
        .unwrap_or_default()
        .to_string()
}

/// A usage's token counts, without what varies between runs of the same request (the
/// prompt tokens the prefix cache gave).
pub fn counts(usage: &Value) -> Value {
    serde_json::json!({
        "prompt_tokens": usage["prompt_tokens"],
        "completion_tokens": usage["completion_tokens"],
        "total_tokens": usage["total_tokens"],
    })
}

pub fn assert_complete(events: &[String]) {
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{events:?}"
    );
    let finish: Value = events
        .len()
        .checked_sub(2)
        .and_then(|i| serde_json::from_str(&events[i]).ok())
        .unwrap_or_else(|| panic!("no final chunk: {events:?}"));
    assert!(
        finish["choices"][0]["finish_reason"].is_string(),
        "incomplete answer: {events:?}"
    );
}

pub fn sse_data(text: &str) -> Vec<String> {
    text.split("\n\n")
        .filter_map(|event| {
            event
                .lines()
                .find_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:")))
                .map(str::to_string)
        })
        .collect()
}

/// A parsed scrape.
pub struct Metrics {
    pub scrape: prometheus_parse::Scrape,
    pub text: String,
}

impl Metrics {
    pub fn parse(text: &str) -> Metrics {
        let lines = text.lines().map(|l| Ok(l.to_string()));
        let scrape = prometheus_parse::Scrape::parse(lines).expect("valid exposition format");
        Metrics {
            scrape,
            text: text.to_string(),
        }
    }

    /// The family names declared by `# TYPE` lines.
    pub fn families(&self) -> BTreeSet<String> {
        self.text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split_whitespace().next())
            .map(str::to_string)
            .collect()
    }

    pub fn type_of(&self, family: &str) -> Option<String> {
        self.text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .find_map(|l| {
                let mut parts = l.split_whitespace();
                (parts.next() == Some(family)).then(|| parts.next().unwrap_or("").to_string())
            })
    }

    fn matching<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a prometheus_parse::Sample> + 'a {
        self.scrape.samples.iter().filter(move |s| {
            s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v))
        })
    }

    /// Sum of a counter or gauge over the series matching `labels`; 0 when none.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.matching(name, labels)
            .map(|s| match &s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => *v,
                _ => 0.0,
            })
            .sum()
    }

    /// Observation count of a histogram over the series matching `labels`.
    pub fn histogram_count(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        self.matching(name, labels)
            .map(|s| match &s.value {
                prometheus_parse::Value::Histogram(h) => {
                    h.iter().map(|b| b.count).fold(0.0, f64::max) as u64
                }
                _ => 0,
            })
            .sum()
    }

    /// The finite upper bounds of a histogram's buckets, for one series.
    pub fn buckets(&self, name: &str, labels: &[(&str, &str)]) -> Vec<f64> {
        self.matching(name, labels)
            .find_map(|s| match &s.value {
                prometheus_parse::Value::Histogram(h) => Some(
                    h.iter()
                        .map(|b| b.less_than)
                        .filter(|b| b.is_finite())
                        .collect(),
                ),
                _ => None,
            })
            .unwrap_or_default()
    }

    /// Every value a label takes in a family's series.
    pub fn label_values(&self, name: &str, label: &str) -> BTreeSet<String> {
        self.scrape
            .samples
            .iter()
            .filter(|s| s.metric == name)
            .filter_map(|s| s.labels.get(label).map(str::to_string))
            .collect()
    }

    /// The label names of a family's series (bucket `le` excluded).
    pub fn label_names(&self, name: &str) -> BTreeSet<String> {
        self.scrape
            .samples
            .iter()
            .filter(|s| s.metric == name)
            .flat_map(|s| s.labels.keys().cloned().collect::<Vec<_>>())
            .collect()
    }
}
