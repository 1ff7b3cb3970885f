//! The default lynx plugin: lynx's own route names, the model's chat template with left
//! truncation, stop-sequence post-processing, and structured outputs (JSON objects,
//! JSON schemas, regular expressions, choices) decided token by token with llguidance.

mod structured;

use lynx_plugin_sdk::{NextToken, OutputFormat, Rejection};

struct DefaultPlugin;

impl lynx_plugin_sdk::Plugin for DefaultPlugin {
    fn prepare() {
        structured::prepare()
    }
    fn constrain(format: OutputFormat) -> Result<(), Rejection> {
        structured::start(format)
    }
    fn next_token() -> NextToken {
        structured::next()
    }
    fn taken(tokens: Vec<u32>) -> Result<(), String> {
        structured::taken(&tokens)
    }
}

lynx_plugin_sdk::plugin!(DefaultPlugin);
