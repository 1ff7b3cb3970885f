//! Automatic prefix caching: what each KV slot holds, and where a new prompt starts.
//!
//! A slot keeps its keys and values after its sequence ends. A new prompt starts in
//! the slot whose cached tokens share the longest prefix with it, or, when a running
//! sequence shares a longer one, in a free slot the prefix is copied into (this is also
//! how a request's `n` choices fork from the first). Either way only the rest of the
//! prompt is prefilled. With nothing to reuse, the free slot least recently used is
//! taken, so the caches used most recently survive longest.
//!
//! Reuse never changes a result. With the f16 cache, a position's keys, values and
//! logits depend only on the tokens up to it, never on how they were split into steps
//! (`kv_cache.rs`, tested in `tests/prefix_exact.rs`), so any prefix may be reused,
//! generated tokens included. The f32 cache attends with candle's gemm, whose float
//! order depends on the chunk's shape: there a prefix is reused only in whole prompt
//! chunks computed from position 0, which a cold prefill computes identically.
//!
//! Reuse never crosses cache spaces: a slot's tokens serve only requests of the space
//! (`cache_salt`, or the server's sharing policy) they were computed for, so neither
//! `cached_tokens` nor a faster first token tells one client what another sent.

use super::kv_cache::KvDtype;
use super::scheduler::PREFILL_CHUNK;

#[derive(Debug, Default, Clone)]
struct Slot {
    /// The tokens whose keys and values fill positions `0..tokens.len()`.
    tokens: Vec<u32>,
    /// Leading positions computed as whole prompt chunks from position 0 (f32 reuse).
    chunked: usize,
    /// Leading positions that came from prompts, not generation: what another request
    /// may well send again.
    prompted: usize,
    /// The step it was last used in.
    used: u64,
    /// Whose prefixes these are: only a request of the same cache space reuses them.
    space: u64,
}

pub struct PrefixCache {
    slots: Vec<Slot>,
    /// Whether any prefix may be reused, not only whole chunks (see the module docs).
    any_split: bool,
    now: u64,
}

/// Where a new prompt starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    pub slot: usize,
    /// Prompt tokens whose keys and values are in the slot once the placement is
    /// carried out.
    pub reused: usize,
    /// The slot the `reused` prefix is to be copied from, when it is not in `slot`
    /// already: the scheduler copies it before the slot's first step.
    pub copy_from: Option<usize>,
}

impl PrefixCache {
    pub fn new(slots: usize, dtype: KvDtype) -> Self {
        Self {
            slots: vec![Slot::default(); slots],
            any_split: dtype == KvDtype::F16,
            now: 0,
        }
    }

    /// Tokens whose keys and values `slot` holds.
    pub fn held(&self, slot: usize) -> usize {
        self.slots.get(slot).map_or(0, |s| s.tokens.len())
    }

    /// Ends a step: slots used from now on are more recent.
    pub fn tick(&mut self) {
        self.now += 1;
    }

    /// Records a step's write of `tokens` at `pos` in `slot` (`prompt`: a prompt
    /// chunk); `None` when the step failed, leaving positions from `pos` on unknown.
    pub fn wrote(&mut self, slot: usize, pos: usize, tokens: Option<&[u32]>, prompt: bool) {
        let Some(s) = self.slots.get_mut(slot) else {
            return;
        };
        s.tokens.truncate(pos);
        s.chunked = s.chunked.min(pos);
        s.prompted = s.prompted.min(pos);
        s.used = self.now;
        if let Some(tokens) = tokens {
            s.tokens.extend_from_slice(tokens);
            if prompt && pos == s.prompted {
                s.prompted += tokens.len();
            }
            // Decoded and forced tokens, and a prompt's short last chunk, are not what
            // a cold prefill of a longer prompt computes at those positions under f32.
            if prompt && pos == s.chunked && tokens.len() == PREFILL_CHUNK {
                s.chunked += PREFILL_CHUNK;
            }
        }
    }

    /// The tokens the slot's cache and `prompt` share from the start.
    fn common(&self, slot: usize, prompt: &[u32]) -> usize {
        self.slots[slot]
            .tokens
            .iter()
            .zip(prompt)
            .take_while(|(a, b)| a == b)
            .count()
    }

    /// How much of `prompt` the slot's cache may give a request of `space`.
    fn reusable(&self, slot: usize, prompt: &[u32], space: u64) -> usize {
        let s = &self.slots[slot];
        if s.space != space {
            return 0;
        }
        let common = self.common(slot, prompt);
        // At least the prompt's last token is computed again: its logits are needed.
        let common = common.min(prompt.len().saturating_sub(1));
        if self.any_split {
            common
        } else {
            common.min(s.chunked) / PREFILL_CHUNK * PREFILL_CHUNK
        }
    }

    /// Forgets what `slot` holds: a copy into it failed, so its positions are unknown.
    pub fn forget(&mut self, slot: usize) {
        if let Some(s) = self.slots.get_mut(slot) {
            s.tokens.clear();
            s.chunked = 0;
            s.prompted = 0;
        }
    }

    /// Chooses the slot for `prompt` among the `free` ones, reusing the longest cached
    /// prefix any slot (free, or `running` a sequence) holds. A prefix in a running
    /// slot, or in a free one other than the one chosen, is to be copied
    /// ([`Placement::copy_from`]). `cold` (`echo`) reuses nothing: it needs every
    /// prompt position's logits. Only slots of the request's cache `space` are reused;
    /// the chosen slot becomes that space's. The index records the slot as holding the
    /// reused prefix from now on, as it will once the placement is carried out.
    pub fn place(
        &mut self,
        (prompt, cold, space): (&[u32], bool, u64),
        (free, running): (&[usize], &[usize]),
    ) -> Placement {
        // The free slot least recently used, other than `keep`.
        let lru = |keep: Option<usize>| {
            free.iter()
                .copied()
                .filter(|&s| Some(s) != keep)
                .min_by_key(|&s| (self.slots.get(s).map_or(0, |x| x.used), s))
        };
        let best = if cold {
            None
        } else {
            free.iter()
                .map(|&s| (self.reusable(s, prompt, space), true, s))
                .chain(
                    running
                        .iter()
                        .map(|&s| (self.reusable(s, prompt, space), false, s)),
                )
                .filter(|&(n, _, _)| n > 0)
                .max_by_key(|&(n, is_free, s)| (n, is_free, std::cmp::Reverse(s)))
        };
        let (from, reused) = match best {
            Some((n, _, s)) => (Some(s), n),
            None => (None, 0),
        };
        let slot = match best {
            // Taking over an idle slot whose prompt goes on past what the new one shares
            // would lose that prompt (another conversation under the same system
            // prompt, say): the prefix is copied into the least recently used slot
            // instead, when there is one. Losing only generated tokens is fine.
            Some((_, true, s)) if self.common(s, prompt) < self.slots[s].prompted => {
                lru(Some(s)).unwrap_or(s)
            }
            Some((_, true, s)) => s,
            _ => lru(None).unwrap_or(0),
        };
        let copy_from = from.filter(|&f| f != slot);
        if let Some(from) = copy_from {
            self.slots[slot] = self.slots[from].clone();
        }
        let s = &mut self.slots[slot];
        s.tokens.truncate(reused);
        s.chunked = s.chunked.min(reused);
        s.prompted = s.prompted.min(reused);
        s.used = self.now;
        s.space = space;
        Placement {
            slot,
            reused,
            copy_from,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(slots: usize, dtype: KvDtype) -> PrefixCache {
        PrefixCache::new(slots, dtype)
    }

    fn at(p: Placement) -> (usize, usize) {
        (p.slot, p.reused)
    }

    /// A sequence in `slot` prefilled `prompt` (one chunk) and generated `out`.
    fn ran(p: &mut PrefixCache, slot: usize, prompt: &[u32], out: &[u32]) {
        p.wrote(slot, 0, Some(prompt), true);
        p.wrote(slot, prompt.len(), Some(out), false);
        p.tick();
    }

    #[test]
    fn the_longest_prefix_is_reused_in_place_and_the_last_token_recomputed() {
        let mut p = cache(3, KvDtype::F16);
        ran(&mut p, 1, &[1, 2, 3, 4], &[5, 6]);
        // A chat's next turn: its history, the answer included, then more.
        let next = [1, 2, 3, 4, 5, 6, 7, 8];
        assert_eq!(at(p.place((&next, false, 0), (&[0, 1, 2], &[]))), (1, 6));
        // The same prompt again: all but its last token.
        let mut p = cache(3, KvDtype::F16);
        ran(&mut p, 2, &[1, 2, 3, 4], &[]);
        assert_eq!(
            at(p.place((&[1, 2, 3, 4], false, 0), (&[0, 1, 2], &[]))),
            (2, 3)
        );
        // `echo` reuses nothing.
        assert_eq!(
            p.place((&[1, 2, 3, 4], true, 0), (&[0, 1, 2], &[])).reused,
            0
        );
    }

    #[test]
    fn another_prompt_under_the_same_prefix_is_kept_and_the_prefix_copied() {
        let mut p = cache(3, KvDtype::F16);
        ran(&mut p, 0, &[9, 9, 9, 1, 1], &[7]);
        ran(&mut p, 2, &[4, 4], &[]);
        // Slot 0's own question (1, 1) would be lost: the shared part goes to slot 1,
        // the least recently used free slot.
        let other = [9, 9, 9, 2, 2];
        let place = p.place((&other, false, 0), (&[0, 1, 2], &[]));
        assert_eq!(at(place), (1, 3));
        assert_eq!(place.copy_from, Some(0));
        assert_eq!(
            at(p.place((&[9, 9, 9, 1, 1, 7, 3], false, 0), (&[0, 2], &[]))),
            (0, 6)
        );
    }

    #[test]
    fn a_running_slot_s_prefix_is_copied_and_eviction_is_least_recent_first() {
        let mut p = cache(4, KvDtype::F16);
        ran(&mut p, 0, &[5, 5, 5, 5], &[]);
        ran(&mut p, 1, &[6, 6], &[]);
        ran(&mut p, 2, &[7, 7], &[]);
        // Slot 0 runs; a prompt sharing its prefix gets a copy in slot 3 (never used).
        assert_eq!(
            at(p.place((&[5, 5, 5, 8], false, 0), (&[1, 2, 3], &[0]))),
            (3, 3)
        );
        // Nothing shared: slot 1, the idle one used longest ago, is evicted.
        assert_eq!(at(p.place((&[3, 3], false, 0), (&[1, 2], &[0, 3]))), (1, 0));
        assert_eq!(p.common(1, &[6, 6]), 0, "evicted");
    }

    #[test]
    fn prefixes_never_cross_cache_spaces() {
        let mut p = cache(3, KvDtype::F16);
        let prompt = [1, 2, 3, 4, 5, 6];
        let first = p.place((&prompt, false, 7), (&[0, 1, 2], &[]));
        p.tick();
        p.wrote(first.slot, 0, Some(&prompt), true);
        p.tick();
        // Another space, idle or running: nothing is reused, nothing copied.
        let other = p.place((&prompt, false, 8), (&[0, 1, 2], &[]));
        assert_eq!((other.reused, other.copy_from), (0, None));
        assert_ne!(
            other.slot, first.slot,
            "the other space's prefix is not evicted first"
        );
        let free: Vec<usize> = (0..3).filter(|&s| s != first.slot).collect();
        let running = p.place((&prompt, false, 9), (&free, &[first.slot]));
        assert_eq!(running.reused, 0);
        // The same space reuses it.
        let again = p.place((&prompt, false, 7), (&[0, 1, 2], &[]));
        assert_eq!(at(again), (first.slot, 5));
    }

    #[test]
    fn the_f32_cache_reuses_only_whole_prompt_chunks() {
        let mut p = cache(2, KvDtype::F32);
        let prompt: Vec<u32> = (0..300).collect();
        for (at, chunk) in prompt.chunks(PREFILL_CHUNK).enumerate() {
            p.wrote(0, at * PREFILL_CHUNK, Some(chunk), true);
        }
        p.wrote(0, 300, Some(&[1, 2, 3]), false);
        let mut next = prompt.clone();
        next.extend([1, 2, 3, 4]);
        assert_eq!(
            p.place((&next, false, 0), (&[0, 1], &[])).reused,
            2 * PREFILL_CHUNK
        );
        assert_eq!(p.place((&prompt[..200], false, 0), (&[1], &[])).reused, 0);
    }
}
