//! The one module that owns `bindgen!` for the current `lynx:plugin` version (0.3.0):
//! its generated imports forward to [`HostState`], and its types convert to and from
//! the host's own ([`super::types`]), so nothing generated leaves `plugins/`.
//!
//! 0.3.0 has two worlds: `plugin`, and `constrained-plugin`, which adds the
//! `constraint` export. The bindings are generated for the larger one, and
//! [`PluginPre`] looks each export up itself, so a component of either world loads:
//! the constraint is there when the component exports it.

use wasmtime::component::InstancePre;
use wasmtime::Store;

use super::glue::{host_imports, model_import, version_glue};
use super::state::HostState;
use super::types;
use lynx_engine::constraint::Rule;

wasmtime::component::bindgen!({
    path: "../../wit",
    world: "constrained-plugin",
    imports: { default: trappable },
});

use exports::lynx::plugin::{constraint, policy, postprocess, router};
use lynx::plugin::types as wit;

/// The WIT package plugins implement.
pub const WIT_PACKAGE: &str = "lynx:plugin";
/// The version this host implements; older released ones load through their adapter.
pub const WIT_VERSION: &str = "0.3.0";

/// A 0.3.0 component linked, its exports found: the constraint only when it has one.
pub struct PluginPre {
    pre: InstancePre<HostState>,
    router: router::GuestIndices,
    policy: policy::GuestIndices,
    postprocess: postprocess::GuestIndices,
    constraint: Option<constraint::GuestIndices>,
}

/// One instance of a 0.3.0 plugin.
pub struct Plugin {
    pub(super) router: router::Guest,
    pub(super) policy: policy::Guest,
    pub(super) postprocess: postprocess::Guest,
    pub(super) constraint: Option<constraint::Guest>,
}

impl PluginPre {
    pub fn new(pre: InstancePre<HostState>) -> wasmtime::Result<Self> {
        Ok(Self {
            router: router::GuestIndices::new(&pre)?,
            policy: policy::GuestIndices::new(&pre)?,
            postprocess: postprocess::GuestIndices::new(&pre)?,
            // Absent for a `plugin`-world component; a `constraint` export of the wrong
            // shape fails `load`, so the plugin's smoke call refuses it at load.
            constraint: constraint::GuestIndices::new(&pre).ok(),
            pre,
        })
    }

    pub fn has_constraint(&self) -> bool {
        self.constraint.is_some()
    }

    pub fn instantiate(&self, store: &mut Store<HostState>) -> wasmtime::Result<Plugin> {
        let instance = self.pre.instantiate(&mut *store)?;
        Ok(Plugin {
            router: self.router.load(&mut *store, &instance)?,
            policy: self.policy.load(&mut *store, &instance)?,
            postprocess: self.postprocess.load(&mut *store, &instance)?,
            constraint: match &self.constraint {
                Some(c) => Some(c.load(&mut *store, &instance)?),
                None => None,
            },
        })
    }
}

impl lynx::plugin::host::Host for HostState {
    host_imports!();
    model_import!();
    fn vocabulary(&mut self) -> wasmtime::Result<wit::Vocab> {
        let v = HostState::vocabulary(self);
        Ok(wit::Vocab {
            bytes: v.bytes.clone(),
            ends: v.ends.clone(),
            special: v.special.clone(),
            end_tokens: v.end_tokens.clone(),
        })
    }
}

version_glue!();

pub(super) fn output_format(f: &types::OutputFormat) -> wit::OutputFormat {
    match f {
        types::OutputFormat::JsonObject => wit::OutputFormat::JsonObject,
        types::OutputFormat::JsonSchema {
            name,
            schema,
            strict,
        } => wit::OutputFormat::JsonSchema(wit::JsonSchema {
            name: name.clone(),
            schema: schema.clone(),
            strict: *strict,
        }),
        types::OutputFormat::Regex(r) => wit::OutputFormat::Regex(r.clone()),
        types::OutputFormat::Choice(c) => wit::OutputFormat::Choice(c.clone()),
    }
}

pub(super) fn rule(n: wit::NextToken) -> Rule {
    match n {
        wit::NextToken::Any => Rule::Any,
        wit::NextToken::Allowed(mask) => Rule::Allowed(mask),
        wit::NextToken::Biases(b) => {
            Rule::Biases(b.into_iter().map(|b| (b.token, b.bias)).collect())
        }
        wit::NextToken::Forced(tokens) => Rule::Forced(tokens),
        wit::NextToken::Stop => Rule::Stop,
    }
}
