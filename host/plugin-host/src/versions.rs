//! The `lynx:plugin` versions this host loads, as one table ([`VERSIONS`]), and the two
//! traits each version's module implements over its own generated bindings: [`Linked`]
//! (a component linked, ready to instantiate) and [`Exports`] (one instance's exports,
//! in the host's own types). Everything above this module calls a plugin through those
//! traits and never learns which version it is.
//!
//! Adding a version is one folder under `wit/` and one `since_vX_Y` module (its
//! `bindgen!`, its `VERSION`), listed here; the module that was `latest` becomes an
//! older version unchanged.

use wasmtime::component::{InstancePre, Linker};
use wasmtime::Store;

use super::state::HostState;
use super::types::{OutputFormat, PolicyRequest, PostConfig, Rejection, Released};
use super::{since_v0_1, since_v0_2, since_v0_3};
use lynx_engine::constraint::Rule;

/// The WIT package plugins implement.
pub const WIT_PACKAGE: &str = "lynx:plugin";

/// One released version: what it links and how its components are bound.
pub struct Version {
    /// `lynx:plugin@{wit}`.
    pub wit: &'static str,
    /// Adds the version's imports to the one linker every version shares: their names
    /// carry the version, so they never collide.
    pub add_to_linker: fn(&mut Linker<HostState>) -> wasmtime::Result<()>,
    /// The version's bindings over a component linked for it.
    pub link: fn(InstancePre<HostState>) -> wasmtime::Result<Box<dyn Linked>>,
}

/// Every version a plugin may be built for, the current one first.
pub static VERSIONS: [Version; 3] = [
    since_v0_3::VERSION,
    since_v0_2::VERSION,
    since_v0_1::VERSION,
];

/// The released version of this number, if the host loads it.
pub fn find(wit: &str) -> Option<&'static Version> {
    VERSIONS.iter().find(|v| v.wit == wit)
}

/// The versions' numbers, newest first, for messages.
pub fn supported() -> Vec<&'static str> {
    VERSIONS.iter().map(|v| v.wit).collect()
}

/// A plugin linked for one version, ready to instantiate.
pub trait Linked: Send + Sync {
    /// Whether the plugin exports token-level control (`constraint`, from 0.3.0).
    fn has_constraint(&self) -> bool {
        false
    }
    fn instantiate(&self, store: &mut Store<HostState>) -> wasmtime::Result<Instance>;
}

/// One instance of a plugin, whatever its version.
pub type Instance = Box<dyn Exports>;

/// One instance's exports, in the host's own types. The constraint calls fail for a
/// plugin without the interface; the registry never routes a constrained request to one.
pub trait Exports: Send + Sync {
    fn normalize(
        &self,
        store: &mut Store<HostState>,
        method: &str,
        path: &str,
    ) -> wasmtime::Result<String>;

    fn tokenize(
        &self,
        store: &mut Store<HostState>,
        request: &PolicyRequest,
    ) -> wasmtime::Result<Result<Vec<u32>, Rejection>>;

    fn start(&self, store: &mut Store<HostState>, config: &PostConfig) -> wasmtime::Result<()>;

    fn push(&self, store: &mut Store<HostState>, token: u32) -> wasmtime::Result<Released>;

    fn finish(&self, store: &mut Store<HostState>) -> wasmtime::Result<String>;

    fn prepare(&self, _store: &mut Store<HostState>) -> wasmtime::Result<()> {
        Err(no_constraint())
    }

    fn constrain(
        &self,
        _store: &mut Store<HostState>,
        _format: &OutputFormat,
    ) -> wasmtime::Result<Result<(), Rejection>> {
        Err(no_constraint())
    }

    fn next_token(&self, _store: &mut Store<HostState>) -> wasmtime::Result<Rule> {
        Err(no_constraint())
    }

    fn taken(
        &self,
        _store: &mut Store<HostState>,
        _tokens: &[u32],
    ) -> wasmtime::Result<Result<(), String>> {
        Err(no_constraint())
    }
}

pub(crate) fn no_constraint() -> wasmtime::Error {
    wasmtime::format_err!("the plugin has no constraint interface")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_lists_each_released_version_once_newest_first() {
        let versions = supported();
        assert_eq!(versions, ["0.3.0", "0.2.0", "0.1.0"]);
        assert_eq!(crate::latest::VERSION.wit, versions[0]);
        for v in &versions {
            assert_eq!(find(v).map(|found| found.wit), Some(*v));
        }
        assert!(find("0.4.0").is_none());
        assert!(find("").is_none());
    }
}
