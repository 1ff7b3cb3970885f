//! The logic of lynx's default plugins as plain Rust, with no WebAssembly bindings, so
//! the same code runs inside the plugin and natively in the host's overhead benchmark.

pub mod chat;
pub mod routes;
pub mod stream;
pub mod template;

#[cfg(test)]
mod test_support {
    /// A stand-in tokenizer: one id per byte, the two ChatML markers one id each when
    /// parsed. Enough to test budgets and which text is parsed.
    pub fn bytes(text: &str, special: bool) -> Vec<u32> {
        let mut ids = Vec::new();
        let mut rest = text;
        while !rest.is_empty() {
            let marker = ["<|im_start|>", "<|im_end|>"]
                .iter()
                .enumerate()
                .find(|(_, m)| special && rest.starts_with(**m));
            match marker {
                Some((i, m)) => {
                    ids.push(1000 + i as u32);
                    rest = &rest[m.len()..];
                }
                None => {
                    let c = rest.chars().next().unwrap_or_default();
                    ids.extend(c.to_string().bytes().map(u32::from));
                    rest = &rest[c.len_utf8()..];
                }
            }
        }
        ids
    }
}
