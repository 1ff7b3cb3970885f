//! The adapter for plugins built for `lynx:plugin@0.2.0` (`wit/v0.2.0`): its own
//! `bindgen!`, its imports forwarded to the same [`HostState`], its types converted to
//! the host's. A 0.2.0 plugin has no `vocabulary` import and no `constraint` export, so
//! it behaves exactly as it did on a 0.2.0 host, and structured-output requests sent to
//! it are refused.

use super::glue::{host_imports, model_import, plugin_world_version, version_glue};
use super::state::HostState;
use super::types;

wasmtime::component::bindgen!({
    path: "../../wit/v0.2.0",
    world: "plugin",
    imports: { default: trappable },
});

use lynx::plugin::types as wit;

pub const WIT_VERSION: &str = "0.2.0";

impl lynx::plugin::host::Host for HostState {
    host_imports!();
    model_import!();
}

version_glue!();
plugin_world_version!();
