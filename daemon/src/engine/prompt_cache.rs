//! Reuse of KV state across requests to the same model. Editors resend nearly the same prompt
//! again and again; a request whose tokens start with a cached sequence prefills only the rest.
//!
//! Entries are (token sequence, cache) pairs, bounded by device bytes and evicted least recently
//! used first. A hit hands out a prefix *copy* (MLX arrays are immutable, so the stored entry is
//! never disturbed by the request that extends it).
//!
//! Each entry also keeps the logits of its request's last *prompt* position (`[1, V]`, counted
//! in its bytes) and that prompt's length. A prefix hit must still feed at least the prompt's last
//! token, because the first token is sampled from that position's logits; a request whose prompt
//! is exactly an entry's prompt gets those logits instead and runs no forward pass at all (on a
//! GPU that one pass is most of a repeat's time to first token). The logits are the very ones
//! the entry's request sampled from, so outputs are the same as without the cache.

use crate::cache::SequenceCache;
use mlx_rs::Array;

struct Entry {
    tokens: Vec<u32>,
    cache: SequenceCache,
    /// Length of the prompt of the request that left this entry; `logits` belong to its last
    /// position.
    prompt_len: usize,
    /// That request's logits for its last prompt position, `[1, V]`.
    logits: Array,
    bytes: usize,
    last_used: u64,
}

impl Entry {
    /// How many tokens of `prompt` this entry serves: all of them when `prompt` is exactly the
    /// prompt it was recorded for (its logits stand in for the last forward pass), otherwise its
    /// common prefix with `prompt` short of the last token (whose logits must be computed).
    fn serves(&self, prompt: &[u32]) -> usize {
        let common = common_prefix(&self.tokens, prompt).min(self.cache.offset() as usize);
        if common == prompt.len() && self.prompt_len == prompt.len() {
            return common;
        }
        common.min(prompt.len().saturating_sub(1))
    }
}

/// A byte-bounded LRU of KV caches keyed by token sequences.
pub struct PromptCache {
    entries: Vec<Entry>,
    budget: usize,
    clock: u64,
}

/// What a lookup found.
pub struct Hit {
    /// A cache covering the first `tokens` prompt tokens.
    pub cache: SequenceCache,
    /// Prompt tokens served.
    pub tokens: usize,
    /// The logits of the last prompt position, when the whole prompt was served (an exact repeat
    /// of a cached request's prompt): sample the first token from these, feed nothing.
    pub logits: Option<Array>,
}

/// Counters for the status message and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PromptCacheStats {
    /// Entries held.
    pub entries: usize,
    /// Device bytes held.
    pub bytes: usize,
}

impl PromptCache {
    /// A cache that holds at most `budget` bytes of KV state (0 disables it).
    pub fn new(budget: usize) -> Self {
        PromptCache { entries: Vec::new(), budget, clock: 0 }
    }

    /// Whether it stores anything at all (a budget of 0 disables it).
    pub fn enabled(&self) -> bool {
        self.budget > 0
    }

    /// How many tokens of `prompt` [`Self::lookup`] would serve (without counting as a use).
    pub fn serves(&self, prompt: &[u32]) -> usize {
        self.entries.iter().map(|e| e.serves(prompt)).max().unwrap_or(0)
    }

    /// The entry that serves the most of `prompt` (see [`Hit`]).
    pub fn lookup(&mut self, prompt: &[u32]) -> Option<Hit> {
        let (idx, len) =
            self.entries.iter().enumerate().map(|(i, e)| (i, e.serves(prompt))).max_by_key(|&(_, len)| len)?;
        if len == 0 {
            return None;
        }
        self.clock += 1;
        let e = &mut self.entries[idx];
        e.last_used = self.clock;
        let cache = e.cache.prefix_copy(len as i32).ok()?;
        let logits = (len == prompt.len()).then(|| e.logits.clone());
        Some(Hit { cache, tokens: len, logits })
    }

    /// Stores the state of a finished request: `tokens` are exactly the tokens `cache` covers,
    /// of which the first `prompt_len` were its prompt, and `logits` are its logits for the last
    /// prompt position.
    pub fn insert(&mut self, tokens: Vec<u32>, cache: SequenceCache, prompt_len: usize, logits: Array) {
        let consistent = cache.offset() as usize == tokens.len() && prompt_len <= tokens.len();
        if self.budget == 0 || tokens.is_empty() || !consistent {
            return;
        }
        // An entry for the same prompt that already covers these tokens serves everything the
        // new one would.
        if let Some(e) = self.entries.iter_mut().find(|e| e.prompt_len == prompt_len && e.tokens.starts_with(&tokens)) {
            self.clock += 1;
            e.last_used = self.clock;
            return;
        }
        // A finished row's cache may be a view into a whole stacked batch: what the budget
        // counts must be all the entry holds (see `SequenceCache::compact`).
        let Ok(cache) = cache.compact() else { return };
        let logits = match logits.contiguous().and_then(|l| l.eval().map(|_| l)) {
            Ok(l) => l,
            Err(_) => return,
        };
        let bytes = cache.nbytes() + logits.nbytes();
        if bytes > self.budget {
            return;
        }
        self.clock += 1;
        // An entry that is a prefix of the new one goes: the new one serves all its prefix hits.
        // (Its logits go with it: resending its prompt, if that differs from the new one's,
        // feeds that prompt's last token again, as any prefix hit does.)
        self.entries.retain(|e| !(e.tokens.len() <= tokens.len() && tokens.starts_with(&e.tokens)));
        self.entries.push(Entry { tokens, cache, prompt_len, logits, bytes, last_used: self.clock });
        self.evict_to_budget();
    }

    /// Changes the byte budget, evicting least recently used entries until the rest fit.
    pub fn set_budget(&mut self, budget: usize) {
        self.budget = budget;
        self.evict_to_budget();
    }

    fn evict_to_budget(&mut self) {
        while self.bytes() > self.budget {
            let oldest = self.entries.iter().enumerate().min_by_key(|(_, e)| e.last_used).map(|(i, _)| i);
            match oldest {
                Some(i) => {
                    self.entries.swap_remove(i);
                }
                None => break,
            }
        }
    }

    /// Drops every entry (model unload, memory pressure).
    pub fn clear(&mut self) {
        self.entries.clear();
    }

    fn bytes(&self) -> usize {
        self.entries.iter().map(|e| e.bytes).sum()
    }

    /// Current counters.
    pub fn stats(&self) -> PromptCacheStats {
        PromptCacheStats { entries: self.entries.len(), bytes: self.bytes() }
    }
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}
