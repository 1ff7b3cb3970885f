//! `lynx:plugin@0.3.0` (`wit/v0.3.0`), the current version ([`crate::latest`]): its
//! `bindgen!`, its generated imports forwarded to [`HostState`], its types converted to
//! and from the host's own ([`super::types`]), so nothing generated leaves this crate.
//!
//! 0.3.0 has two worlds: `plugin`, and `constrained-plugin`, which adds the
//! `constraint` export. The bindings are generated for the larger one, and
//! [`PluginPre`] looks each export up itself, so a component of either world loads:
//! the constraint is there when the component exports it.

use wasmtime::component::InstancePre;
use wasmtime::Store;

use super::glue::{host_imports, model_import, version_glue, version_row};
use super::state::HostState;
use super::types::{self, OutputFormat, PolicyRequest, PostConfig, Rejection, Released};
use super::versions::{Exports, Instance, Linked};
use lynx_engine::constraint::Rule;

wasmtime::component::bindgen!({
    path: "../../wit/v0.3.0",
    world: "constrained-plugin",
    imports: { default: trappable },
});

use exports::lynx::plugin::{constraint, policy, postprocess, router};
use lynx::plugin::types as wit;

pub const WIT_VERSION: &str = "0.3.0";

version_row!(ConstrainedPlugin, PluginPre);

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
    router: router::Guest,
    policy: policy::Guest,
    postprocess: postprocess::Guest,
    constraint: Option<constraint::Guest>,
}

impl Plugin {
    fn constraint(&self) -> wasmtime::Result<&constraint::Guest> {
        self.constraint
            .as_ref()
            .ok_or_else(super::versions::no_constraint)
    }
}

impl Exports for Plugin {
    fn normalize(
        &self,
        store: &mut Store<HostState>,
        method: &str,
        path: &str,
    ) -> wasmtime::Result<String> {
        self.router.call_normalize(store, method, path)
    }

    fn tokenize(
        &self,
        store: &mut Store<HostState>,
        request: &PolicyRequest,
    ) -> wasmtime::Result<Result<Vec<u32>, Rejection>> {
        let verdict = self.policy.call_tokenize(store, &policy_request(request))?;
        Ok(verdict.map_err(rejection))
    }

    fn start(&self, store: &mut Store<HostState>, config: &PostConfig) -> wasmtime::Result<()> {
        self.postprocess.call_start(store, &post_config(config))
    }

    fn push(&self, store: &mut Store<HostState>, token: u32) -> wasmtime::Result<Released> {
        Ok(released(self.postprocess.call_push(store, token)?))
    }

    fn finish(&self, store: &mut Store<HostState>) -> wasmtime::Result<String> {
        self.postprocess.call_finish(store)
    }

    fn prepare(&self, store: &mut Store<HostState>) -> wasmtime::Result<()> {
        self.constraint()?.call_prepare(store)
    }

    fn constrain(
        &self,
        store: &mut Store<HostState>,
        format: &OutputFormat,
    ) -> wasmtime::Result<Result<(), Rejection>> {
        let verdict = self
            .constraint()?
            .call_start(store, &output_format(format))?;
        Ok(verdict.map_err(rejection))
    }

    fn next_token(&self, store: &mut Store<HostState>) -> wasmtime::Result<Rule> {
        Ok(rule(self.constraint()?.call_next(store)?))
    }

    fn taken(
        &self,
        store: &mut Store<HostState>,
        tokens: &[u32],
    ) -> wasmtime::Result<Result<(), String>> {
        self.constraint()?.call_taken(store, tokens)
    }
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
}

impl Linked for PluginPre {
    fn has_constraint(&self) -> bool {
        self.constraint.is_some()
    }

    fn instantiate(&self, store: &mut Store<HostState>) -> wasmtime::Result<Instance> {
        let instance = self.pre.instantiate(&mut *store)?;
        Ok(Box::new(Plugin {
            router: self.router.load(&mut *store, &instance)?,
            policy: self.policy.load(&mut *store, &instance)?,
            postprocess: self.postprocess.load(&mut *store, &instance)?,
            constraint: match &self.constraint {
                Some(c) => Some(c.load(&mut *store, &instance)?),
                None => None,
            },
        }))
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

fn output_format(f: &types::OutputFormat) -> wit::OutputFormat {
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

fn rule(n: wit::NextToken) -> Rule {
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
