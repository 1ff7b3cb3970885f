//! The `lynx:plugin` versions this host loads, and one plugin instance whatever its
//! version: [`Pre`] and [`Instance`] dispatch each call to the version's bindings and
//! hand back the host's own types.

use wasmtime::component::InstancePre;
use wasmtime::Store;

use super::state::HostState;
use super::types::{PolicyRequest, PostConfig, Rejection, Released};
use super::{since_v0_1, world};

/// Every version a plugin may be built for: the current one first.
pub const SUPPORTED: [&str; 2] = [world::WIT_VERSION, since_v0_1::WIT_VERSION];

/// A plugin linked and ready to instantiate.
pub enum Pre {
    Current(world::PluginPre<HostState>),
    V0_1(since_v0_1::PluginPre<HostState>),
}

/// One instance of a plugin.
pub enum Instance {
    Current(world::Plugin),
    V0_1(since_v0_1::Plugin),
}

impl Pre {
    /// The bindings of `version` (one of [`SUPPORTED`]) over a linked component.
    pub fn new(version: &str, pre: InstancePre<HostState>) -> wasmtime::Result<Self> {
        if version == since_v0_1::WIT_VERSION {
            Ok(Pre::V0_1(since_v0_1::PluginPre::new(pre)?))
        } else {
            Ok(Pre::Current(world::PluginPre::new(pre)?))
        }
    }

    pub fn instantiate(&self, store: &mut Store<HostState>) -> wasmtime::Result<Instance> {
        Ok(match self {
            Pre::Current(p) => Instance::Current(p.instantiate(store)?),
            Pre::V0_1(p) => Instance::V0_1(p.instantiate(store)?),
        })
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
            Instance::Current(p) => p.lynx_plugin_router().call_normalize(store, method, path),
            Instance::V0_1(p) => p.lynx_plugin_router().call_normalize(store, method, path),
        }
    }

    pub fn tokenize(
        &self,
        store: &mut Store<HostState>,
        request: &PolicyRequest,
    ) -> wasmtime::Result<Result<Vec<u32>, Rejection>> {
        match self {
            Instance::Current(p) => {
                let r = world::policy_request(request);
                Ok(world::verdict(
                    p.lynx_plugin_policy().call_tokenize(store, &r)?,
                ))
            }
            Instance::V0_1(p) => {
                let r = since_v0_1::policy_request(request);
                Ok(since_v0_1::verdict(
                    p.lynx_plugin_policy().call_tokenize(store, &r)?,
                ))
            }
        }
    }

    pub fn start(&self, store: &mut Store<HostState>, config: &PostConfig) -> wasmtime::Result<()> {
        match self {
            Instance::Current(p) => p
                .lynx_plugin_postprocess()
                .call_start(store, &world::post_config(config)),
            Instance::V0_1(p) => p
                .lynx_plugin_postprocess()
                .call_start(store, &since_v0_1::post_config(config)),
        }
    }

    pub fn push(&self, store: &mut Store<HostState>, token: u32) -> wasmtime::Result<Released> {
        Ok(match self {
            Instance::Current(p) => {
                world::released(p.lynx_plugin_postprocess().call_push(store, token)?)
            }
            Instance::V0_1(p) => {
                since_v0_1::released(p.lynx_plugin_postprocess().call_push(store, token)?)
            }
        })
    }

    pub fn finish(&self, store: &mut Store<HostState>) -> wasmtime::Result<String> {
        match self {
            Instance::Current(p) => p.lynx_plugin_postprocess().call_finish(store),
            Instance::V0_1(p) => p.lynx_plugin_postprocess().call_finish(store),
        }
    }
}
