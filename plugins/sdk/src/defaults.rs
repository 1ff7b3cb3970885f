//! The default behaviour of each export: lynx's own route names, the ChatML policy with
//! left truncation, and stop-sequence post-processing, reporting the token events.

use std::cell::RefCell;

use lynx_plugin_core::chat::{encode_chat, prompt_budget, Message};
use lynx_plugin_core::routes;
use lynx_plugin_core::stream::TextStream;

use crate::{events, host, PolicyRequest, PostConfig, Prompt, Rejection, Released};

pub fn normalize(_method: &str, path: &str) -> String {
    routes::normalize(path).to_string()
}

/// Text prompts are encoded (after BOS, when the model wants one), token prompts pass
/// through, conversations are rendered with ChatML (message content never parsed for
/// special tokens) and lose their oldest turns when over the budget. A prompt still too long is left for the host to refuse with its limits.
pub fn tokenize(request: PolicyRequest) -> Result<Vec<u32>, Rejection> {
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

struct Generation {
    text: TextStream,
    tokens: u32,
}

thread_local! {
    // One instance serves one request, so this is that request's state.
    static GENERATION: RefCell<Generation> = RefCell::new(Generation {
        text: TextStream::default(),
        tokens: 0,
    });
}

pub fn start(config: PostConfig) {
    GENERATION.with_borrow_mut(|g| {
        *g = Generation {
            text: TextStream::new(config.stops),
            tokens: 0,
        }
    });
}

pub fn push(token: u32) -> Released {
    let bytes = host::token_bytes(token);
    GENERATION.with_borrow_mut(|g| {
        g.tokens += 1;
        if g.tokens == 1 {
            events::first_token();
        }
        events::completion_token();
        let released = g.text.push(&bytes);
        Released {
            text: released.text,
            stop: released.stop,
        }
    })
}

pub fn finish() -> String {
    GENERATION.with_borrow_mut(|g| g.text.finish())
}
