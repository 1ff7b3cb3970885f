//! `lynx-host plugin check FILE.wasm`: validates a plugin offline, exactly as the server
//! would load it (compile, WIT version, linking, smoke call), and reports what it has.

use std::fmt::Write;
use std::path::Path;
use std::sync::Arc;

use super::cache::ComponentCache;
use super::latest::WIT_VERSION;
use super::versions::WIT_PACKAGE;
use super::{PluginError, PluginLimits, PluginRuntime};
use lynx_engine::tokenizer::Tokenizer;

/// The report printed for a plugin that passed.
pub fn check(
    file: &Path,
    tokenizer: Arc<Tokenizer>,
    context_length: u32,
    limits: PluginLimits,
) -> Result<String, PluginError> {
    let runtime = PluginRuntime::new(
        tokenizer,
        context_length,
        limits,
        ComponentCache::in_memory(),
    )?;
    let plugin = runtime.load(file)?;
    let component = &plugin.component;
    let ty = component.component_type();
    let engine = runtime.engine();
    let mut out = String::new();
    let _ = writeln!(out, "plugin {}: OK", file.display());
    let _ = writeln!(out, "  name: {}", plugin.name);
    let _ = writeln!(
        out,
        "  implements: {WIT_PACKAGE}@{} (host: {WIT_VERSION})",
        plugin.wit_version
    );
    let _ = writeln!(out, "  exports:");
    for (name, _) in ty.exports(engine) {
        let _ = writeln!(out, "    {name}");
    }
    let _ = writeln!(out, "  imports:");
    for (name, _) in ty.imports(engine) {
        let granted = if name.starts_with(&format!("{WIT_PACKAGE}/")) {
            "provided"
        } else {
            "WASI, deny by default: clocks, random and stdout/stderr work; files, environment and network give errors"
        };
        let _ = writeln!(out, "    {name} ({granted})");
    }
    let _ = writeln!(
        out,
        "  smoke call: route, policy and post-processing passed"
    );
    Ok(out)
}
