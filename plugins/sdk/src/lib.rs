//! The guest side of `lynx:plugin@0.3.0`: the one place that generates the WIT bindings
//! (of the `constrained-plugin` world), the default behaviour of each export
//! ([`Plugin`]'s provided methods), and [`plugin!`], which exports a plugin type.

pub use lynx_plugin_core as core;

pub mod bindings {
    //! The generated bindings of the `constrained-plugin` world.
    wit_bindgen::generate!({
        path: "../../wit/v0.3.0",
        world: "constrained-plugin",
        pub_export_macro: true,
        export_macro_name: "export_plugin",
        default_bindings_module: "lynx_plugin_sdk::bindings",
    });
}

pub mod defaults;

pub use bindings::lynx::plugin::types::{
    ChatMessage, JsonSchema, LogLevel, NextToken, OutputFormat, PolicyRequest, PostConfig, Prompt,
    Rejection, Released, TokenBias, Vocab,
};
pub use bindings::lynx::plugin::{events, host};

/// A plugin's behaviour: every method has the default plugin's behaviour, so a plugin
/// overrides only what it changes. [`plugin!`] exports a type implementing it.
pub trait Plugin {
    /// The `endpoint` label of a request.
    fn normalize(method: &str, path: &str) -> String {
        defaults::normalize(method, path)
    }
    /// The prompt's token ids, or a rejection the host answers with a 400.
    fn tokenize(request: PolicyRequest) -> Result<Vec<u32>, Rejection> {
        defaults::tokenize(request)
    }
    /// A generation starts.
    fn start(config: PostConfig) {
        defaults::start(config)
    }
    /// One generated token: the text it releases, and whether generation ends.
    fn push(token: u32) -> Released {
        defaults::push(token)
    }
    /// Generation ended: whatever text is still held.
    fn finish() -> String {
        defaults::finish()
    }
    /// Builds what every constrained request shares (once per instance).
    fn prepare() {}
    /// Starts constraining a request's output; by default no format is served, and the
    /// client is told so with a 400.
    fn constrain(format: OutputFormat) -> Result<(), Rejection> {
        defaults::constrain(format)
    }
    /// What the next token may be.
    fn next_token() -> NextToken {
        NextToken::Any
    }
    /// The tokens appended since the last call.
    fn taken(_tokens: Vec<u32>) -> Result<(), String> {
        Ok(())
    }
}

/// Exports a type implementing [`Plugin`] as the component's router, policy,
/// post-processing and constraint.
///
/// ```ignore
/// struct Strict;
/// impl lynx_plugin_sdk::Plugin for Strict { /* overrides */ }
/// lynx_plugin_sdk::plugin!(Strict);
/// ```
#[macro_export]
macro_rules! plugin {
    ($name:ident) => {
        impl $crate::bindings::exports::lynx::plugin::router::Guest for $name {
            fn normalize(method: String, path: String) -> String {
                <$name as $crate::Plugin>::normalize(&method, &path)
            }
        }

        impl $crate::bindings::exports::lynx::plugin::policy::Guest for $name {
            fn tokenize(request: $crate::PolicyRequest) -> Result<Vec<u32>, $crate::Rejection> {
                <$name as $crate::Plugin>::tokenize(request)
            }
        }

        impl $crate::bindings::exports::lynx::plugin::postprocess::Guest for $name {
            fn start(config: $crate::PostConfig) {
                <$name as $crate::Plugin>::start(config)
            }
            fn push(token: u32) -> $crate::Released {
                <$name as $crate::Plugin>::push(token)
            }
            fn finish() -> String {
                <$name as $crate::Plugin>::finish()
            }
        }

        impl $crate::bindings::exports::lynx::plugin::constraint::Guest for $name {
            fn prepare() {
                <$name as $crate::Plugin>::prepare()
            }
            fn start(format: $crate::OutputFormat) -> Result<(), $crate::Rejection> {
                <$name as $crate::Plugin>::constrain(format)
            }
            fn next() -> $crate::NextToken {
                <$name as $crate::Plugin>::next_token()
            }
            fn taken(tokens: Vec<u32>) -> Result<(), String> {
                <$name as $crate::Plugin>::taken(tokens)
            }
        }

        $crate::bindings::export_plugin!($name);
    };
}
