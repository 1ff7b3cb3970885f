//! The guest side of `lynx:plugin@0.1.0`: the one place that generates the WIT bindings,
//! the default behaviour of each export, and [`plugin!`], which builds a plugin from
//! those defaults and whatever the plugin overrides.

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

/// Defines and exports a plugin: the default router, policy and post-processing, or the
/// functions given in their place.
///
/// ```ignore
/// lynx_plugin_sdk::plugin!(Strict, tokenize = strict_tokenize);
/// ```
#[macro_export]
macro_rules! plugin {
    ($name:ident) => {
        $crate::plugin!($name, tokenize = $crate::defaults::tokenize);
    };
    ($name:ident, tokenize = $tokenize:path) => {
        $crate::plugin!($name, tokenize = $tokenize, push = $crate::defaults::push);
    };
    ($name:ident, tokenize = $tokenize:path, push = $push:path) => {
        struct $name;

        impl $crate::bindings::exports::lynx::plugin::router::Guest for $name {
            fn normalize(method: String, path: String) -> String {
                $crate::defaults::normalize(&method, &path)
            }
        }

        impl $crate::bindings::exports::lynx::plugin::policy::Guest for $name {
            fn tokenize(request: $crate::PolicyRequest) -> Result<Vec<u32>, $crate::Rejection> {
                $tokenize(request)
            }
        }

        impl $crate::bindings::exports::lynx::plugin::postprocess::Guest for $name {
            fn start(config: $crate::PostConfig) {
                $crate::defaults::start(config)
            }
            fn push(token: u32) -> $crate::Released {
                $push(token)
            }
            fn finish() -> String {
                $crate::defaults::finish()
            }
        }

        $crate::bindings::export_plugin!($name);
    };
}
