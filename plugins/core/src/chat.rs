//! ChatML rendering and the default tokenization policy: ChatML for conversations, with
//! left truncation of the oldest turns when a conversation outgrows the context.

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// Completion tokens kept free when a conversation is truncated and the client set no
/// `max_tokens`.
pub const DEFAULT_RESERVE: u32 = 256;

/// Renders a conversation and the assistant generation prompt as ChatML. Like
/// llama.cpp's built-in ChatML, no default system prompt is added.
pub fn render_chatml(messages: &[Message]) -> String {
    let mut out = String::new();
    for m in messages {
        out.push_str("<|im_start|>");
        out.push_str(&m.role);
        out.push('\n');
        out.push_str(&m.content);
        out.push_str("<|im_end|>\n");
    }
    out.push_str("<|im_start|>assistant\n");
    out
}

/// Encodes a conversation with ChatML. When it does not fit `budget` tokens, the oldest
/// turns after any leading system messages are dropped until it fits or only the last
/// message is left (the host then refuses what still does not fit).
pub fn encode_chat(
    messages: &[Message],
    budget: usize,
    encode: impl Fn(&str) -> Vec<u32>,
) -> Vec<u32> {
    let system = messages.iter().take_while(|m| m.role == "system").count();
    let mut dropped = 0;
    loop {
        let kept: Vec<Message> = messages[..system]
            .iter()
            .chain(&messages[system + dropped..])
            .cloned()
            .collect();
        let ids = encode(&render_chatml(&kept));
        if ids.len() <= budget || system + dropped + 1 >= messages.len() {
            return ids;
        }
        dropped += 1;
    }
}

/// The prompt budget of a request: the context less the completion it needs.
pub fn prompt_budget(context_length: u32, max_tokens: Option<u32>) -> usize {
    let reserve = max_tokens.unwrap_or(DEFAULT_RESERVE).max(1);
    context_length.saturating_sub(reserve) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(role: &str, content: &str) -> Message {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }

    /// One "token" per byte: enough to test budgets.
    fn bytes(text: &str) -> Vec<u32> {
        text.bytes().map(u32::from).collect()
    }

    #[test]
    fn renders_chatml() {
        assert_eq!(
            render_chatml(&[msg("system", "Be brief."), msg("user", "Hi")]),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn drops_the_oldest_turns_but_keeps_system_and_last() {
        let conv = [
            msg("system", "S"),
            msg("user", &"old ".repeat(50)),
            msg("assistant", &"reply ".repeat(50)),
            msg("user", "last"),
        ];
        let full = bytes(&render_chatml(&conv));
        assert_eq!(encode_chat(&conv, 10_000, bytes), full);
        let kept = encode_chat(&conv, 100, bytes);
        let want = bytes(&render_chatml(&[msg("system", "S"), msg("user", "last")]));
        assert_eq!(kept, want);
        // Never drops the last message, even when it alone is over budget.
        assert_eq!(encode_chat(&conv, 1, bytes), want);
    }

    #[test]
    fn budget_reserves_the_completion() {
        assert_eq!(prompt_budget(4096, Some(96)), 4000);
        assert_eq!(prompt_budget(4096, None), 4096 - DEFAULT_RESERVE as usize);
        assert_eq!(prompt_budget(10, Some(100)), 0);
    }
}
