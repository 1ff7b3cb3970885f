//! A strict tokenization policy: the default policy, but any prompt over
//! [`MAX_PROMPT_TOKENS`] tokens is refused with `prompt_too_long` instead of served.

use lynx_plugin_sdk::{defaults, host, LogLevel, Plugin, PolicyRequest, Rejection};

/// The longest prompt this policy admits.
pub const MAX_PROMPT_TOKENS: usize = 64;

struct StrictPlugin;

impl Plugin for StrictPlugin {
    fn tokenize(request: PolicyRequest) -> Result<Vec<u32>, Rejection> {
        strict_tokenize(request)
    }
}

fn strict_tokenize(request: PolicyRequest) -> Result<Vec<u32>, Rejection> {
    let ids = defaults::tokenize(request)?;
    if ids.len() > MAX_PROMPT_TOKENS {
        host::log(
            LogLevel::Info,
            &format!("refused a {}-token prompt", ids.len()),
        );
        return Err(Rejection {
            code: "prompt_too_long".to_string(),
            message: format!(
                "The prompt has {} tokens; this server's policy admits at most {MAX_PROMPT_TOKENS}.",
                ids.len()
            ),
        });
    }
    Ok(ids)
}

lynx_plugin_sdk::plugin!(StrictPlugin);
