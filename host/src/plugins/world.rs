//! The one module that owns `bindgen!` for the `lynx:plugin` world; the rest of the host
//! imports the generated types from here.

wasmtime::component::bindgen!({
    path: "../wit",
    world: "plugin",
    imports: { default: trappable },
});

pub use lynx::plugin::types::{
    ChatMessage, LogLevel, PolicyRequest, PostConfig, Prompt, Rejection, Released,
};

/// The WIT package plugins must implement, and its version.
pub const WIT_PACKAGE: &str = "lynx:plugin";
pub const WIT_VERSION: &str = "0.1.0";
