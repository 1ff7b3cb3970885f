//! The adapter for plugins built for `lynx:plugin@0.2.0` (`wit/v0.2.0`): its own
//! `bindgen!`, its imports forwarded to the same [`HostState`], its types converted to
//! the host's. A 0.2.0 plugin has no `vocabulary` import and no `constraint` export, so
//! it behaves exactly as it did on a 0.2.0 host, and structured-output requests sent to
//! it are refused.

use super::state::HostState;
use super::types;

wasmtime::component::bindgen!({
    path: "../wit/v0.2.0",
    world: "plugin",
    imports: { default: trappable },
});

use lynx::plugin::types as wit;

pub const WIT_VERSION: &str = "0.2.0";

impl wit::Host for HostState {}

impl lynx::plugin::host::Host for HostState {
    fn encode(&mut self, text: String, parse_special: bool) -> wasmtime::Result<Vec<u32>> {
        HostState::encode(self, text, parse_special)
    }
    fn token_bytes(&mut self, token: u32) -> wasmtime::Result<Vec<u8>> {
        HostState::token_bytes(self, token)
    }
    fn bos_token(&mut self) -> wasmtime::Result<Option<u32>> {
        HostState::bos_token(self)
    }
    fn model(&mut self) -> wasmtime::Result<wit::ModelInfo> {
        let m = HostState::model_info(self);
        Ok(wit::ModelInfo {
            architecture: m.architecture,
            chat_template: m.chat_template,
            bos_token: m.bos_token,
            eos_token: m.eos_token,
        })
    }
    fn log(&mut self, level: wit::LogLevel, message: String) -> wasmtime::Result<()> {
        HostState::log(self, log_level(level), message)
    }
}

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

fn log_level(level: wit::LogLevel) -> types::LogLevel {
    match level {
        wit::LogLevel::Trace => types::LogLevel::Trace,
        wit::LogLevel::Debug => types::LogLevel::Debug,
        wit::LogLevel::Info => types::LogLevel::Info,
        wit::LogLevel::Warn => types::LogLevel::Warn,
        wit::LogLevel::Error => types::LogLevel::Error,
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

pub(super) fn verdict(v: Result<Vec<u32>, wit::Rejection>) -> Result<Vec<u32>, types::Rejection> {
    v.map_err(|r| types::Rejection {
        code: r.code,
        message: r.message,
    })
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
