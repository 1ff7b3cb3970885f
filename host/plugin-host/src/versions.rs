//! The `lynx:plugin` versions this host loads, and one plugin instance whatever its
//! version: [`Pre`] and [`Instance`] dispatch each call to the version's bindings and
//! hand back the host's own types.

use wasmtime::component::InstancePre;
use wasmtime::Store;

use super::state::HostState;
use super::types::{OutputFormat, PolicyRequest, PostConfig, Rejection, Released};
use super::{since_v0_1, since_v0_2, world};
use lynx_engine::constraint::Rule;

/// Every version a plugin may be built for: the current one first.
pub const SUPPORTED: [&str; 3] = [
    world::WIT_VERSION,
    since_v0_2::WIT_VERSION,
    since_v0_1::WIT_VERSION,
];

/// A plugin linked and ready to instantiate.
pub enum Pre {
    Current(world::PluginPre),
    V0_2(since_v0_2::PluginPre<HostState>),
    V0_1(since_v0_1::PluginPre<HostState>),
}

/// One instance of a plugin.
pub enum Instance {
    Current(world::Plugin),
    V0_2(since_v0_2::Plugin),
    V0_1(since_v0_1::Plugin),
}

impl Pre {
    /// The bindings of `version` (one of [`SUPPORTED`]) over a linked component.
    pub fn new(version: &str, pre: InstancePre<HostState>) -> wasmtime::Result<Self> {
        Ok(match version {
            v if v == since_v0_1::WIT_VERSION => Pre::V0_1(since_v0_1::PluginPre::new(pre)?),
            v if v == since_v0_2::WIT_VERSION => Pre::V0_2(since_v0_2::PluginPre::new(pre)?),
            _ => Pre::Current(world::PluginPre::new(pre)?),
        })
    }

    /// Whether the plugin exports token-level control (`constraint`, from 0.3.0).
    pub fn has_constraint(&self) -> bool {
        matches!(self, Pre::Current(p) if p.has_constraint())
    }

    pub fn instantiate(&self, store: &mut Store<HostState>) -> wasmtime::Result<Instance> {
        Ok(match self {
            Pre::Current(p) => Instance::Current(p.instantiate(store)?),
            Pre::V0_2(p) => Instance::V0_2(p.instantiate(store)?),
            Pre::V0_1(p) => Instance::V0_1(p.instantiate(store)?),
        })
    }
}

/// The constraint export of an instance that has one.
fn constraint(p: &Instance) -> wasmtime::Result<&world::exports::lynx::plugin::constraint::Guest> {
    match p {
        Instance::Current(world::Plugin {
            constraint: Some(c),
            ..
        }) => Ok(c),
        _ => Err(wasmtime::format_err!(
            "the plugin has no constraint interface"
        )),
    }
}

impl Instance {
    pub fn normalize(
        &self,
        store: &mut Store<HostState>,
        method: &str,
        path: &str,
    ) -> wasmtime::Result<String> {
        match self {
            Instance::Current(p) => p.router.call_normalize(store, method, path),
            Instance::V0_2(p) => p.lynx_plugin_router().call_normalize(store, method, path),
            Instance::V0_1(p) => p.lynx_plugin_router().call_normalize(store, method, path),
        }
    }

    pub fn tokenize(
        &self,
        store: &mut Store<HostState>,
        request: &PolicyRequest,
    ) -> wasmtime::Result<Result<Vec<u32>, Rejection>> {
        Ok(match self {
            Instance::Current(p) => world::verdict(
                p.policy
                    .call_tokenize(store, &world::policy_request(request))?,
            ),
            Instance::V0_2(p) => since_v0_2::verdict(
                p.lynx_plugin_policy()
                    .call_tokenize(store, &since_v0_2::policy_request(request))?,
            ),
            Instance::V0_1(p) => since_v0_1::verdict(
                p.lynx_plugin_policy()
                    .call_tokenize(store, &since_v0_1::policy_request(request))?,
            ),
        })
    }

    pub fn start(&self, store: &mut Store<HostState>, config: &PostConfig) -> wasmtime::Result<()> {
        match self {
            Instance::Current(p) => p.postprocess.call_start(store, &world::post_config(config)),
            Instance::V0_2(p) => p
                .lynx_plugin_postprocess()
                .call_start(store, &since_v0_2::post_config(config)),
            Instance::V0_1(p) => p
                .lynx_plugin_postprocess()
                .call_start(store, &since_v0_1::post_config(config)),
        }
    }

    pub fn push(&self, store: &mut Store<HostState>, token: u32) -> wasmtime::Result<Released> {
        Ok(match self {
            Instance::Current(p) => world::released(p.postprocess.call_push(store, token)?),
            Instance::V0_2(p) => {
                since_v0_2::released(p.lynx_plugin_postprocess().call_push(store, token)?)
            }
            Instance::V0_1(p) => {
                since_v0_1::released(p.lynx_plugin_postprocess().call_push(store, token)?)
            }
        })
    }

    pub fn finish(&self, store: &mut Store<HostState>) -> wasmtime::Result<String> {
        match self {
            Instance::Current(p) => p.postprocess.call_finish(store),
            Instance::V0_2(p) => p.lynx_plugin_postprocess().call_finish(store),
            Instance::V0_1(p) => p.lynx_plugin_postprocess().call_finish(store),
        }
    }

    pub fn prepare(&self, store: &mut Store<HostState>) -> wasmtime::Result<()> {
        constraint(self)?.call_prepare(store)
    }

    pub fn constrain(
        &self,
        store: &mut Store<HostState>,
        format: &OutputFormat,
    ) -> wasmtime::Result<Result<(), Rejection>> {
        let verdict = constraint(self)?.call_start(store, &world::output_format(format))?;
        Ok(verdict.map_err(world::rejection))
    }

    pub fn next_token(&self, store: &mut Store<HostState>) -> wasmtime::Result<Rule> {
        Ok(world::rule(constraint(self)?.call_next(store)?))
    }

    pub fn taken(
        &self,
        store: &mut Store<HostState>,
        tokens: &[u32],
    ) -> wasmtime::Result<Result<(), String>> {
        constraint(self)?.call_taken(store, tokens)
    }
}
