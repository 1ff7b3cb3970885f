//! The default lynx plugin: lynx's own route names, the ChatML policy with left
//! truncation, and stop-sequence post-processing.

struct DefaultPlugin;

impl lynx_plugin_sdk::Plugin for DefaultPlugin {}

lynx_plugin_sdk::plugin!(DefaultPlugin);
