//! A plugin in versions, for the hot-swap tests: the default plugin, except that each
//! generated token releases its version's marker (`[v1]` or `[v2]`) instead of its
//! text, so a response shows which version served it, and whether versions mixed.
//! The prompt `lynx:version` is refused with the code `version-v1` (or `-v2`): a probe
//! that shows the serving version without running the model.
//! Built with `--features smoke-trap`, it traps in route normalization, which the
//! host's smoke call at load exercises; with `--features smoke-sleep`, it sleeps there
//! for 60 s (a blocking WASI poll), which the call's deadline must cut. Built with `--features flaky`, it is `[v3]` and
//! traps in its policy on every text prompt of odd length: a version that fails half
//! of a test's requests, but passes its smoke call (a chat prompt).

use lynx_plugin_sdk::{defaults, Plugin, PolicyRequest, Prompt, Rejection, Released};

#[cfg(not(any(feature = "v2", feature = "flaky")))]
const MARKER: &str = "[v1]";
#[cfg(feature = "v2")]
const MARKER: &str = "[v2]";
#[cfg(all(feature = "flaky", not(feature = "v2")))]
const MARKER: &str = "[v3]";

struct SwapPlugin;

impl Plugin for SwapPlugin {
    fn normalize(method: &str, path: &str) -> String {
        if cfg!(feature = "smoke-trap") {
            panic!("swap plugin: built to fail its smoke call");
        }
        if cfg!(feature = "smoke-sleep") {
            std::thread::sleep(std::time::Duration::from_secs(60));
        }
        defaults::normalize(method, path)
    }

    fn tokenize(request: PolicyRequest) -> Result<Vec<u32>, Rejection> {
        if cfg!(feature = "flaky") && matches!(&request.prompt, Prompt::Text(t) if t.len() % 2 == 1)
        {
            panic!("swap plugin: built to fail half its requests");
        }
        if matches!(&request.prompt, Prompt::Text(t) if t == "lynx:version") {
            return Err(Rejection {
                code: format!("version-{}", MARKER.trim_matches(['[', ']'])),
                message: format!("served by {MARKER}"),
            });
        }
        defaults::tokenize(request)
    }

    fn push(token: u32) -> Released {
        let released = defaults::push(token);
        Released {
            text: MARKER.to_string(),
            stop: released.stop,
        }
    }

    fn finish() -> String {
        defaults::finish();
        String::new()
    }
}

lynx_plugin_sdk::plugin!(SwapPlugin);
