//! The default behaviour of each export: lynx's own route names, the model's own chat
//! template with left truncation, and stop-sequence post-processing, reporting the
//! token events.

use std::cell::RefCell;

use lynx_plugin_core::chat::{prompt_budget, Message};
use lynx_plugin_core::routes;
use lynx_plugin_core::stream::TextStream;
use lynx_plugin_core::template::{self, Specials};

use crate::{events, host, OutputFormat, PolicyRequest, PostConfig, Prompt, Rejection, Released};

pub fn normalize(_method: &str, path: &str) -> String {
    routes::normalize(path).to_string()
}

/// Text prompts are encoded (after BOS, when the model wants one), token prompts pass
/// through, conversations are rendered with the model's chat template (a model without
/// one refuses them: 400 `chat_template_missing`) and lose their oldest turns when over
/// the budget. A prompt still too long is left for the host to refuse with its limits.
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
            encode_chat(&messages, budget)?
        }
    };
    events::prompt_tokens(u32::try_from(ids.len()).unwrap_or(u32::MAX));
    Ok(ids)
}

/// The conversation through the model's template; when it outgrows `budget`, the oldest
/// turns after any leading system messages go, as many as their own lengths say must,
/// then one more at a time (a few times at most), until it fits or only the last
/// message is left.
fn encode_chat(messages: &[Message], budget: usize) -> Result<Vec<u32>, Rejection> {
    let model = host::model();
    let Some(tpl) = model.chat_template else {
        return Err(Rejection {
            code: "chat_template_missing".into(),
            message: format!(
                "The served model ({}) has no chat template: use /v1/completions, or start \
                 the server with --chat-template FILE.",
                model.architecture
            ),
        });
    };
    let specials = Specials {
        bos_token: model.bos_token,
        eos_token: model.eos_token,
    };
    let bos = host::bos_token();
    let encode = |text: &str, special: bool| host::encode(text, special);
    let refuse = |message: String| Rejection {
        code: "invalid_chat".into(),
        message,
    };
    let mut ids = template::encode(&tpl, messages, &specials, bos, &encode).map_err(refuse)?;
    if ids.len() <= budget {
        return Ok(ids);
    }
    let system = messages.iter().take_while(|m| m.role == "system").count();
    let mut over = ids.len() - budget;
    let mut dropped = 0;
    while over > 0 && system + dropped + 1 < messages.len() {
        over = over.saturating_sub(encode(&messages[system + dropped].content, false).len());
        dropped += 1;
    }
    for _ in 0..4 {
        let kept: Vec<Message> = messages[..system]
            .iter()
            .chain(&messages[system + dropped..])
            .cloned()
            .collect();
        // A template may refuse a cut conversation (roles must alternate): cut more.
        if let Ok(cut) = template::encode(&tpl, &kept, &specials, bos, &encode) {
            ids = cut;
            if ids.len() <= budget {
                break;
            }
        }
        if system + dropped + 1 >= messages.len() {
            break;
        }
        dropped += 1;
    }
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

/// A plugin that does not constrain outputs says so: the client gets a 400.
pub fn constrain(_format: OutputFormat) -> Result<(), Rejection> {
    Err(Rejection {
        code: "response_format_unsupported".into(),
        message: "This plugin does not constrain outputs: structured outputs are not served."
            .into(),
    })
}
