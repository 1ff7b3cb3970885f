//! The adapter for plugins built for `lynx:plugin@0.1.0` (`wit/v0.1.0`), as Zed keeps
//! one module per extension API version: its own `bindgen!`, its imports forwarded to
//! the same [`HostState`], its types converted to the host's. A 0.1.0 plugin has no
//! `model` import, so it behaves exactly as it did on a 0.1.0 host.

use super::glue::{host_imports, plugin_world_version, version_glue};
use super::state::HostState;
use super::types;

wasmtime::component::bindgen!({
    path: "../../wit/v0.1.0",
    world: "plugin",
    imports: { default: trappable },
});

use lynx::plugin::types as wit;

pub const WIT_VERSION: &str = "0.1.0";

impl lynx::plugin::host::Host for HostState {
    host_imports!();
}

version_glue!();
plugin_world_version!();
