//! The plugin folder of a test: a temporary folder to install plugin versions into as
//! deploy tools do, and the `swap` test plugin's probes (which version serves, what the
//! admin view says).

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::{plugins_dist, Server};

pub const V1: &str = "[v1]";
pub const V2: &str = "[v2]";

/// A plugin folder of the test's own, removed at the end.
pub struct PluginDir(pub PathBuf);

static DIRS: AtomicUsize = AtomicUsize::new(0);

impl Default for PluginDir {
    fn default() -> Self {
        Self::new()
    }
}

impl PluginDir {
    pub fn new() -> Self {
        let n = DIRS.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("lynx-hotswap-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("plugin dir");
        Self(dir)
    }

    pub fn path(&self) -> &str {
        self.0.to_str().expect("utf-8 path")
    }

    /// Writes `NAME.wasm` as editors and deploy tools do: a temporary file, renamed.
    pub fn install(&self, name: &str, bytes: &[u8]) {
        let tmp = self.0.join(format!(".{name}.wasm.part"));
        std::fs::write(&tmp, bytes).expect("write plugin");
        std::fs::rename(&tmp, self.0.join(format!("{name}.wasm"))).expect("rename plugin");
    }

    /// A file's path in the folder.
    pub fn file(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    pub fn remove(&self, name: &str) {
        std::fs::remove_file(self.0.join(format!("{name}.wasm"))).expect("remove plugin");
    }
}

impl Drop for PluginDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn test_plugin(file: &str) -> Vec<u8> {
    std::fs::read(plugins_dist().join("test").join(file)).expect("test plugin")
}

pub async fn start(dir: &PluginDir, extra: &[&str]) -> Server {
    let mut args = vec!["--plugins-dir", dir.path(), "--plugin", "swap"];
    args.extend_from_slice(extra);
    Server::start_with(&args).await
}

/// The serving version, by the swap plugin's `lynx:version` probe (which its policy
/// answers without the model): the rejection code, `version-v1` and so on.
pub async fn version(server: &Server) -> String {
    let (_, body) = server
        .post("/v1/completions", &json!({"prompt": "lynx:version"}))
        .await;
    body["error"]["code"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// Which version served a response, from its text; `None` if mixed or empty.
pub fn version_of(text: &str) -> Option<&'static str> {
    [V1, V2]
        .into_iter()
        .find(|m| !text.is_empty() && text.replace(m, "").is_empty())
}

/// One greedy completion: the version that served it.
pub async fn served_by(server: &Server) -> &'static str {
    let (status, body) = server
        .post(
            "/v1/completions",
            &json!({"prompt": "Once upon a time", "max_tokens": 3, "temperature": 0}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let text = body["choices"][0]["text"].as_str().unwrap_or_default();
    version_of(text).unwrap_or_else(|| panic!("not one version: {text:?}"))
}

pub async fn admin(server: &Server) -> Value {
    server.admin_get("/admin/plugins").await
}

pub fn entry<'a>(view: &'a Value, name: &str) -> &'a Value {
    view["plugins"]
        .as_array()
        .and_then(|p| p.iter().find(|e| e["name"] == name))
        .unwrap_or_else(|| panic!("no {name} in {view}"))
}

/// Polls the admin view until `done` holds for the plugin `name`.
pub async fn admin_until(server: &Server, name: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let view = admin(server).await;
        if view["plugins"]
            .as_array()
            .and_then(|p| p.iter().find(|e| e["name"] == name))
            .is_some_and(&done)
        {
            return entry(&view, name).clone();
        }
        assert!(
            Instant::now() < deadline,
            "admin view never got there: {view}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
