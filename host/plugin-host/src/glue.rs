//! What every version's bindings module shares, as macros. Each `bindgen!` generates
//! its own traits and types, of the same shapes from one version to the next, so one
//! text serves them all: expanded in each module, it names that module's own `wit`
//! types (`lynx::plugin::types`) and traits.

/// The `host` imports every version has, forwarded to [`super::state::HostState`]; for
/// use inside that version's `impl lynx::plugin::host::Host for HostState`.
macro_rules! host_imports {
    () => {
        fn encode(&mut self, text: String, parse_special: bool) -> wasmtime::Result<Vec<u32>> {
            HostState::encode(self, text, parse_special)
        }
        fn token_bytes(&mut self, token: u32) -> wasmtime::Result<Vec<u8>> {
            HostState::token_bytes(self, token)
        }
        fn bos_token(&mut self) -> wasmtime::Result<Option<u32>> {
            HostState::bos_token(self)
        }
        fn log(&mut self, level: wit::LogLevel, message: String) -> wasmtime::Result<()> {
            let level = match level {
                wit::LogLevel::Trace => types::LogLevel::Trace,
                wit::LogLevel::Debug => types::LogLevel::Debug,
                wit::LogLevel::Info => types::LogLevel::Info,
                wit::LogLevel::Warn => types::LogLevel::Warn,
                wit::LogLevel::Error => types::LogLevel::Error,
            };
            HostState::log(self, level, message)
        }
    };
}

/// `host.model`, from 0.2.0 on.
macro_rules! model_import {
    () => {
        fn model(&mut self) -> wasmtime::Result<wit::ModelInfo> {
            let m = HostState::model_info(self);
            Ok(wit::ModelInfo {
                architecture: m.architecture,
                chat_template: m.chat_template,
                bos_token: m.bos_token,
                eos_token: m.eos_token,
            })
        }
    };
}

/// The `events` imports, and the conversions of the types every version has.
macro_rules! version_glue {
    () => {
        impl wit::Host for HostState {}

        impl lynx::plugin::events::Host for HostState {
            fn prompt_tokens(&mut self, count: u32) -> wasmtime::Result<()> {
                HostState::prompt_tokens(self, count)
            }
            fn completion_token(&mut self) -> wasmtime::Result<()> {
                HostState::completion_token(self)
            }
            fn first_token(&mut self) -> wasmtime::Result<()> {
                HostState::first_token(self)
            }
        }

        pub(super) fn policy_request(r: &types::PolicyRequest) -> wit::PolicyRequest {
            wit::PolicyRequest {
                prompt: match &r.prompt {
                    types::Prompt::Text(t) => wit::Prompt::Text(t.clone()),
                    types::Prompt::Tokens(ids) => wit::Prompt::Tokens(ids.clone()),
                    types::Prompt::Chat(messages) => wit::Prompt::Chat(
                        messages
                            .iter()
                            .map(|m| wit::ChatMessage {
                                role: m.role.clone(),
                                content: m.content.clone(),
                            })
                            .collect(),
                    ),
                },
                context_length: r.context_length,
                max_tokens: r.max_tokens,
            }
        }

        pub(super) fn rejection(r: wit::Rejection) -> types::Rejection {
            types::Rejection {
                code: r.code,
                message: r.message,
            }
        }

        pub(super) fn post_config(c: &types::PostConfig) -> wit::PostConfig {
            wit::PostConfig {
                stops: c.stops.clone(),
            }
        }

        pub(super) fn released(r: wit::Released) -> types::Released {
            types::Released {
                text: r.text,
                stop: r.stop,
            }
        }
    };
}

/// A version's row of [`super::versions::VERSIONS`]: `VERSION`, which links the world
/// `$world`'s imports and binds a component with `$pre::new`.
macro_rules! version_row {
    ($world:ident, $pre:ident) => {
        /// This version's row of [`super::versions::VERSIONS`].
        pub const VERSION: super::versions::Version = super::versions::Version {
            wit: WIT_VERSION,
            add_to_linker,
            link,
        };

        fn add_to_linker(
            linker: &mut wasmtime::component::Linker<HostState>,
        ) -> wasmtime::Result<()> {
            $world::add_to_linker::<HostState, wasmtime::component::HasSelf<HostState>>(
                linker,
                |s| s,
            )
        }

        fn link(
            pre: wasmtime::component::InstancePre<HostState>,
        ) -> wasmtime::Result<Box<dyn super::versions::Linked>> {
            Ok(Box::new($pre::new(pre)?))
        }
    };
}

/// A version whose world is the plain `plugin` (router, policy, post-processing): its
/// [`super::versions::Exports`] over the generated `Plugin`, and its `VERSION` entry.
macro_rules! plugin_world_version {
    () => {
        use super::types::{PolicyRequest, PostConfig, Rejection, Released};
        use super::versions::{Exports, Instance, Linked};
        use wasmtime::Store;

        super::glue::version_row!(Plugin, PluginPre);

        impl Linked for PluginPre<HostState> {
            fn instantiate(&self, store: &mut Store<HostState>) -> wasmtime::Result<Instance> {
                Ok(Box::new(PluginPre::instantiate(self, store)?))
            }
        }

        impl Exports for Plugin {
            fn normalize(
                &self,
                store: &mut Store<HostState>,
                method: &str,
                path: &str,
            ) -> wasmtime::Result<String> {
                self.lynx_plugin_router()
                    .call_normalize(store, method, path)
            }

            fn tokenize(
                &self,
                store: &mut Store<HostState>,
                request: &PolicyRequest,
            ) -> wasmtime::Result<Result<Vec<u32>, Rejection>> {
                let verdict = self
                    .lynx_plugin_policy()
                    .call_tokenize(store, &policy_request(request))?;
                Ok(verdict.map_err(rejection))
            }

            fn start(
                &self,
                store: &mut Store<HostState>,
                config: &PostConfig,
            ) -> wasmtime::Result<()> {
                self.lynx_plugin_postprocess()
                    .call_start(store, &post_config(config))
            }

            fn push(&self, store: &mut Store<HostState>, token: u32) -> wasmtime::Result<Released> {
                Ok(released(
                    self.lynx_plugin_postprocess().call_push(store, token)?,
                ))
            }

            fn finish(&self, store: &mut Store<HostState>) -> wasmtime::Result<String> {
                self.lynx_plugin_postprocess().call_finish(store)
            }
        }
    };
}

pub(super) use {host_imports, model_import, plugin_world_version, version_glue, version_row};
