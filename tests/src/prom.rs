//! A real Prometheus for the end-to-end tests (Debian's `prometheus` package, installed by
//! `scripts/setup.sh`), run on a loopback port with the project's own config and rules,
//! and `promtool`. Missing binaries fail the test: nothing skips.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::{free_port, workspace_root};

pub fn infra(path: &str) -> PathBuf {
    workspace_root().join("infra").join(path)
}

/// The path of a required binary; panics with how to install it.
pub fn require(bin: &str) -> PathBuf {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|dir| dir.join(bin))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!("`{bin}` is not installed: run scripts/setup.sh (Debian's prometheus package)")
        })
}

/// Runs promtool; (success, stdout + stderr).
pub fn promtool(args: &[&str], stdin: Option<&str>) -> (bool, String) {
    use std::io::Write;
    let mut child = Command::new(require("promtool"))
        .args(args)
        .current_dir(infra("prometheus"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn promtool");
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("write promtool stdin");
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().expect("promtool output");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

pub struct Prometheus {
    child: Child,
    pub base: String,
    dir: PathBuf,
    client: reqwest::Client,
}

impl Prometheus {
    /// Starts Prometheus with `infra/prometheus/prometheus.yml` and its rule files, the
    /// lynx target replaced by `target` and every 15s interval shortened to 1s.
    pub async fn start(target: &str) -> Prometheus {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("lynx-prometheus-{port}"));
        std::fs::create_dir_all(&dir).expect("prometheus dir");
        let config = std::fs::read_to_string(infra("prometheus/prometheus.yml"))
            .expect("infra/prometheus/prometheus.yml")
            .replace("lynx:8000", target)
            .replace("15s", "1s");
        std::fs::write(dir.join("prometheus.yml"), config).expect("write config");
        for rules in ["rules.yml", "alerts.yml"] {
            std::fs::copy(infra(&format!("prometheus/{rules}")), dir.join(rules))
                .expect("copy rules");
        }
        let log = std::fs::File::create(dir.join("prometheus.log")).expect("log");
        let child = Command::new(require("prometheus"))
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn prometheus");
        let prometheus = Prometheus {
            child,
            base: format!("http://127.0.0.1:{port}"),
            dir,
            client: reqwest::Client::new(),
        };
        prometheus.wait_ready().await;
        prometheus
    }

    async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok(r) = self
                .client
                .get(format!("{}/-/ready", self.base))
                .send()
                .await
            {
                if r.status().is_success() {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!("prometheus did not become ready:\n{}", self.log());
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    /// An instant query; panics unless Prometheus parsed and ran it. The result vector.
    pub async fn query(&self, expr: &str) -> Vec<Value> {
        let body: Value = self
            .client
            .get(format!("{}/api/v1/query", self.base))
            .query(&[("query", expr)])
            .send()
            .await
            .expect("query")
            .json()
            .await
            .expect("query json");
        assert_eq!(body["status"], "success", "query {expr:?} failed: {body}");
        body["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// Polls `expr` until it returns at least one series.
    pub async fn query_until_data(&self, expr: &str, within: Duration) -> Vec<Value> {
        self.query_until(expr, within, |result| !result.is_empty())
            .await
    }

    /// Polls `expr` until its first sample is a finite number (rates over too few
    /// scrapes give NaN, which is "data" but not an answer).
    pub async fn query_until_finite(&self, expr: &str, within: Duration) -> Option<f64> {
        let result = self
            .query_until(expr, within, |result| {
                first_value(result).is_some_and(f64::is_finite)
            })
            .await;
        first_value(&result)
    }

    /// Polls `expr` until `done` accepts its result, or `within` has passed (then the
    /// last result is returned for the caller's assertion to explain).
    pub async fn query_until(
        &self,
        expr: &str,
        within: Duration,
        done: impl Fn(&[Value]) -> bool,
    ) -> Vec<Value> {
        let deadline = Instant::now() + within;
        loop {
            let result = self.query(expr).await;
            if done(&result) || Instant::now() > deadline {
                return result;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    pub async fn label_values(&self, label: &str, matcher: &str) -> Vec<String> {
        let body: Value = self
            .client
            .get(format!("{}/api/v1/label/{label}/values", self.base))
            .query(&[("match[]", matcher)])
            .send()
            .await
            .expect("label values")
            .json()
            .await
            .expect("label values json");
        serde_json::from_value(body["data"].clone()).unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The first sample value of an instant-query result.
pub fn first_value(result: &[Value]) -> Option<f64> {
    result.first()?["value"][1].as_str()?.parse().ok()
}

/// Every PromQL expression of a Grafana dashboard's panels.
pub fn dashboard_exprs(path: &Path) -> Vec<(String, String)> {
    let dash: Value = serde_json::from_str(&std::fs::read_to_string(path).expect("dashboard"))
        .expect("dashboard json");
    let mut out = Vec::new();
    for panel in dash["panels"].as_array().into_iter().flatten() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = target["expr"].as_str() {
                let title = panel["title"].as_str().unwrap_or("?").to_string();
                out.push((title, expr.to_string()));
            }
        }
    }
    out
}
