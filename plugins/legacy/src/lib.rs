//! A plugin built against `lynx:plugin@0.1.0` (`wit/v0.1.0`), behaving as lynx's default
//! plugin did in that version: ChatML whatever the model, left truncation, stop
//! sequences. The tests hold a current host to serving it exactly as before. With the
//! `v0_2` feature the same plugin is built against the released `lynx:plugin@0.2.0`
//! (`wit/v0.2.0`), held to the same.

use std::cell::RefCell;

use lynx_plugin_core::chat::{encode_chat, prompt_budget, Message};
use lynx_plugin_core::stream::TextStream;

#[cfg(not(feature = "v0_2"))]
wit_bindgen::generate!({ path: "../../wit/v0.1.0", world: "plugin" });
#[cfg(feature = "v0_2")]
wit_bindgen::generate!({ path: "../../wit/v0.2.0", world: "plugin" });

use exports::lynx::plugin::{policy, postprocess, router};
use lynx::plugin::types::{PolicyRequest, PostConfig, Prompt, Rejection, Released};
use lynx::plugin::{events, host};

struct Legacy;

impl router::Guest for Legacy {
    fn normalize(_method: String, path: String) -> String {
        lynx_plugin_core::routes::normalize(&path).to_string()
    }
}

impl policy::Guest for Legacy {
    fn tokenize(request: PolicyRequest) -> Result<Vec<u32>, Rejection> {
        let ids = match request.prompt {
            Prompt::Text(text) => {
                let mut ids: Vec<u32> = host::bos_token().into_iter().collect();
                ids.extend(host::encode(&text, true));
                ids
            }
            Prompt::Tokens(ids) => ids,
            Prompt::Chat(messages) => {
                let messages: Vec<Message> = messages
                    .into_iter()
                    .map(|m| Message {
                        role: m.role,
                        content: m.content,
                    })
                    .collect();
                let budget = prompt_budget(request.context_length, request.max_tokens);
                encode_chat(&messages, budget, host::encode)
            }
        };
        events::prompt_tokens(u32::try_from(ids.len()).unwrap_or(u32::MAX));
        Ok(ids)
    }
}

thread_local! {
    // One instance serves one request: (its text stream, tokens pushed).
    static GENERATION: RefCell<(TextStream, u32)> = RefCell::new((TextStream::default(), 0));
}

impl postprocess::Guest for Legacy {
    fn start(config: PostConfig) {
        GENERATION.with_borrow_mut(|g| *g = (TextStream::new(config.stops), 0));
    }

    fn push(token: u32) -> Released {
        let bytes = host::token_bytes(token);
        GENERATION.with_borrow_mut(|(text, n)| {
            *n += 1;
            if *n == 1 {
                events::first_token();
            }
            events::completion_token();
            let released = text.push(&bytes);
            Released {
                text: released.text,
                stop: released.stop,
            }
        })
    }

    fn finish() -> String {
        GENERATION.with_borrow_mut(|(text, _)| text.finish())
    }
}

export!(Legacy);
