//! Reuse of KV state across requests to the same model. Editors resend nearly the same prompt
//! again and again; a request whose tokens start with a cached sequence prefills only the rest.
//!
//! Entries are (token sequence, cache) pairs, bounded by device bytes and evicted least recently
//! used first. A hit hands out a prefix *copy* (MLX arrays are immutable, so the stored entry is
//! never disturbed by the request that extends it).

use crate::cache::SequenceCache;

struct Entry {
    tokens: Vec<u32>,
    cache: SequenceCache,
    bytes: usize,
    last_used: u64,
}

/// A byte-bounded LRU of KV caches keyed by token sequences.
pub struct PromptCache {
    entries: Vec<Entry>,
    budget: usize,
    clock: u64,
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

    /// The longest cached prefix of `prompt`, leaving at least one token to feed (the model must
    /// produce logits for the last position). Returns the cache and how many tokens it covers.
    pub fn lookup(&mut self, prompt: &[u32]) -> Option<(SequenceCache, usize)> {
        let limit = prompt.len().saturating_sub(1);
        let (idx, len) = self
            .entries
            .iter()
            .enumerate()
            .map(|(i, e)| (i, common_prefix(&e.tokens, prompt).min(limit).min(e.cache.offset() as usize)))
            .max_by_key(|&(_, len)| len)?;
        if len == 0 {
            return None;
        }
        self.clock += 1;
        let e = &mut self.entries[idx];
        e.last_used = self.clock;
        let copy = e.cache.prefix_copy(len as i32).ok()?;
        Some((copy, len))
    }

    /// Stores the state of a finished request: `tokens` are exactly the tokens `cache` covers.
    pub fn insert(&mut self, tokens: Vec<u32>, cache: SequenceCache) {
        if self.budget == 0 || tokens.is_empty() || cache.offset() as usize != tokens.len() {
            return;
        }
        let bytes = cache.nbytes();
        if bytes > self.budget {
            return;
        }
        // An entry that is a prefix of the new one adds nothing.
        self.entries.retain(|e| !(e.tokens.len() <= tokens.len() && tokens.starts_with(&e.tokens)));
        self.clock += 1;
        self.entries.push(Entry { tokens, cache, bytes, last_used: self.clock });
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
