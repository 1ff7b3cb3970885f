//! A plugin built against `lynx:plugin@0.9.0`, for the test that the host refuses it.

wit_bindgen::generate!({ path: "wit", world: "plugin" });

struct FuturePlugin;

impl exports::lynx::plugin::router::Guest for FuturePlugin {
    fn normalize(_method: String, path: String, _host: String) -> String {
        path
    }
}

export!(FuturePlugin);
