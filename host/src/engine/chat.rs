//! The chat template: ChatML (`<|im_start|>role\n…<|im_end|>\n`, then the assistant's
//! generation prompt), rendered natively rather than by a Jinja engine.
//!
//! Like llama.cpp's built-in ChatML, it adds no default system prompt. SmolLM2's own
//! Jinja template inserts one; with the Q4_1 weights that prompt turns the greedy answer
//! to "What is the capital of France?" into nonsense, while plain ChatML answers "Paris".

/// One chat message after validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// Renders a conversation and the assistant generation prompt as ChatML text.
pub fn render_chatml(messages: &[ChatMessage]) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_chatml_with_the_generation_prompt() {
        let msg = |role: &str, content: &str| ChatMessage {
            role: role.into(),
            content: content.into(),
        };
        assert_eq!(
            render_chatml(&[msg("system", "Be brief."), msg("user", "Hi")]),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }
}
