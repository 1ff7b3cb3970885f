//! The logic of lynx's default plugins as plain Rust, with no WebAssembly bindings, so
//! the same code runs inside the plugin and natively in the host's overhead benchmark.

pub mod chat;
pub mod routes;
pub mod stream;
pub mod template;
