//! The guest side of `lynx:plugin@0.1.0`: the one place that generates the WIT bindings,
//! the default behaviour of each export ([`Plugin`]'s provided methods), and
//! [`plugin!`], which exports a plugin type.

pub use lynx_plugin_core as core;

pub mod bindings {
    //! The generated bindings of the `plugin` world.
    wit_bindgen::generate!({
        path: "../../wit",
        world: "plugin",
        pub_export_macro: true,
        export_macro_name: "export_plugin",
        default_bindings_module: "lynx_plugin_sdk::bindings",
    });
}

pub mod defaults;

pub use bindings::lynx::plugin::types::{
    ChatMessage, LogLevel, PolicyRequest, PostConfig, Prompt, Rejection, Released,
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
}

/// Exports a type implementing [`Plugin`] as the component's router, policy and
/// post-processing.
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

        $crate::bindings::export_plugin!($name);
    };
}
