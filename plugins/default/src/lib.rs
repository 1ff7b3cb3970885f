//! The default lynx plugin: lynx's own route names, the ChatML policy with left
//! truncation, and stop-sequence post-processing.

lynx_plugin_sdk::plugin!(DefaultPlugin);
