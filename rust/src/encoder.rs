//! Encoding and decoding with a byte-level BPE vocabulary, under tiktoken's rank semantics:
//! a piece that is itself a token becomes that token; otherwise, starting from single bytes,
//! the adjacent pair whose concatenation has the lowest rank (= id) is merged, leftmost first
//! on ties, until no adjacent pair concatenates to a token.

use std::cell::RefCell;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashSet};

use rustc_hash::FxHashMap;

use crate::error::{Error, Result};
use crate::pretokenize::Pretokenizer;

pub type Rank = u32;

/// Pieces longer than this use the bucket-queue merge, which is linear instead of O(n^2);
/// for runs of CJK text the quadratic scan already costs more at a few dozen bytes.
const LONG_PIECE: usize = 255;
/// Pieces longer than this are first cut where no token can span (see `Encoder::merge`).
/// Japanese runs are pieces of dozens to hundreds of bytes that fall apart into segments of
/// about five bytes with cl100k, each merged on its own instead of in one heap of pairs
/// (Japanese encodes 20% faster). Merging costs more than linearly in the length, so
/// cutting never costs more than a pass over the bytes.
const CUT_PIECE: usize = 12;
/// log2 of the number of slots in each thread's direct-mapped cache of short pieces.
/// (The tests shrink every cache so that evictions and restarts happen on small inputs.)
const HOT_BITS: u32 = if cfg!(test) { 5 } else { 13 };
/// log2 of the two-slot sets of the second, larger cache of short pieces that BPE had to
/// merge (see [`Scratch::merged`]).
const MERGED_BITS: u32 = if cfg!(test) { 4 } else { 15 };
/// Probes of `merged` per check of its hit rate, and merges it stays off for after a
/// poor one (see [`Scratch::count_probe`]).
const PROBE_WINDOW: u32 = if cfg!(test) { 16 } else { 1024 };
const MERGED_OFF: u32 = if cfg!(test) { 64 } else { 1 << 14 };
/// log2 of the bits of the filter of pieces merged before (see [`Scratch::seen`]).
const SEEN_BITS: u32 = if cfg!(test) { 8 } else { 20 };
/// Entries of the cache of pieces of `HOT_LEN + 1` to `WARM_LEN` bytes before it starts
/// over: longer words are many and less frequent, so this one is a hash map, not a
/// direct-mapped table, which lost most of them to collisions.
const WARM_ENTRIES: usize = if cfg!(test) { 1 << 6 } else { 1 << 16 };
/// Ids kept for those pieces before the cache starts over.
const WARM_IDS: usize = if cfg!(test) { 1 << 9 } else { 1 << 20 };
/// Ids of cached pieces that do not fit in their slot go to a per-thread arena of this
/// many ids; when it is full it starts over (see [`Scratch::store`]).
const ARENA_IDS: usize = if cfg!(test) { 1 << 9 } else { 1 << 19 };

/// Pieces of up to this many bytes go through the per-thread direct-mapped cache.
pub(crate) const HOT_LEN: usize = 15;
/// Longest token accepted: the long-piece merge keeps part lengths in 16 bits.
pub const MAX_TOKEN_LEN: usize = u16::MAX as usize;
/// Most ordinary tokens accepted: ids are `u32`, with room above them for special tokens.
pub const MAX_TOKENS: usize = u32::MAX as usize / 2;
/// Longest piece cached: longer ones (runs of CJK text, identifiers) rarely repeat.
const WARM_LEN: usize = 2 * HOT_LEN + 1;
const _: () = assert!(WARM_LEN <= LONG_PIECE);

/// Marks the [`pack_hot`] key of a segment of a cut piece, whose ids are plain BPE on its
/// bytes, apart from the key of a piece with the same bytes, whose ids are that token if it
/// is one. Bit 62 of the high half is 0 in every piece key: it is 0 for pieces of up to 7
/// bytes and holds a length bit that is never set for longer ones (see [`pack`]).
const SEGMENT_MARK: u128 = 1 << (64 + 62);

/// One slot of the short-piece cache: a piece of at most `HOT_LEN` bytes (packed, see
/// [`pack_hot`]; never 0, so 0 marks an empty slot) and its ids: inline if there are at
/// most three, else `ids = [arena offset, arena generation, _]`.
#[derive(Clone, Copy, Default)]
#[repr(align(32))] // one slot per cache-line half, never straddling two lines
struct HotSlot {
    key: u128,
    n: u32,
    ids: [Rank; 3],
}

/// A set of [`Scratch::merged`]: two slots in one cache line, so a probe is one access.
#[derive(Clone, Copy, Default)]
#[repr(align(64))]
struct MergedSet([HotSlot; 2]);

/// Each thread's caches of merged pieces. Natural text repeats the same few thousand
/// words, and a probe here is much cheaper than re-running BPE on them; the tables are
/// small enough to stay in L2, while the full vocabulary tables are megabytes. Words of
/// non-Latin scripts are often several tokens (Armenian, Syriac, Gujarati: most pieces are
/// four or more), hence the arena rather than a fixed number of ids per slot.
struct Scratch {
    hot: Box<[HotSlot]>,
    /// Short pieces that are not tokens, two per set, newest first. Merging one costs
    /// several probes of the vocabulary tables (about 800 cycles for an English word that
    /// is not a token), a probe here one memory access; the English words that overflow
    /// `hot` mostly hit here. Whole tokens stay out: their one vocabulary probe is as cheap.
    merged: Box<[MergedSet]>,
    /// A bit per hash value of the pieces merged so far (see [`Scratch::seen`]).
    seen: Box<[u64]>,
    seen_marks: usize,
    /// Probes and hits of `merged` in the current window, and for how many more merges it
    /// is off (see [`Scratch::count_probe`]).
    merged_probes: u32,
    merged_hits: u32,
    merged_off: u32,
    /// Pieces of `HOT_LEN + 1` to `WARM_LEN` bytes (see [`pack_warm`]) to the offset and
    /// number of their ids in `warm_ids`; both start over together when either is full.
    warm: FxHashMap<(u128, u128), (u32, u32)>,
    warm_ids: Vec<Rank>,
    arena: Vec<Rank>,
    /// Bumped whenever the arena starts over, which invalidates every slot pointing into it.
    generation: u32,
}

impl Default for Scratch {
    fn default() -> Self {
        Scratch {
            hot: vec![HotSlot::default(); 1 << HOT_BITS].into_boxed_slice(),
            merged: vec![MergedSet::default(); 1 << MERGED_BITS].into_boxed_slice(),
            seen: vec![0; (1 << SEEN_BITS) / 64].into_boxed_slice(),
            seen_marks: 0,
            merged_probes: 0,
            merged_hits: 0,
            merged_off: 0,
            warm: FxHashMap::default(),
            warm_ids: Vec::new(),
            arena: Vec::with_capacity(ARENA_IDS),
            generation: 1,
        }
    }
}

impl Scratch {
    /// Copies `ids` into the arena; returns their offset and the generation to record.
    #[inline]
    fn store(&mut self, ids: &[Rank]) -> (u32, u32) {
        if self.arena.len() + ids.len() > ARENA_IDS {
            self.arena.clear();
            self.generation = self.generation.wrapping_add(1).max(1);
        }
        let offset = self.arena.len() as u32;
        self.arena.extend_from_slice(ids);
        (offset, self.generation)
    }

    /// Whether a piece with this `seen` index was merged before (since the filter last
    /// started over; a false yes only costs a probe). Only such pieces are looked up in
    /// `merged`: a piece seen for the first time cannot be there, and in a single pass
    /// over a corpus most merged pieces are new.
    #[inline]
    fn seen(&self, at: usize) -> bool {
        self.seen[at / 64] >> (at % 64) & 1 == 1
    }

    /// Records a piece's `seen` index; the filter starts over once a quarter full, before
    /// false positives become common.
    #[inline]
    fn mark_seen(&mut self, at: usize) {
        self.seen[at / 64] |= 1 << (at % 64);
        self.seen_marks += 1;
        if self.seen_marks > (1 << SEEN_BITS) / 4 {
            self.seen.fill(0);
            self.seen_marks = 0;
        }
    }

    /// Counts a probe of `merged`; after every `PROBE_WINDOW`, turns the cache off for a
    /// while if few of them hit. Text that repeats its words (English) hits most of the
    /// time; text whose pieces rarely recur within the cache's reach (Chinese) would pay a
    /// trip to memory per piece for nothing.
    #[inline]
    fn count_probe(&mut self) {
        self.merged_probes += 1;
        if self.merged_probes == PROBE_WINDOW {
            if self.merged_hits < PROBE_WINDOW / 4 {
                self.merged_off = MERGED_OFF;
            }
            self.merged_probes = 0;
            self.merged_hits = 0;
        }
    }

    /// The ids of a slot holding `key`, unless its arena ids were dropped since.
    #[inline(always)]
    fn ids_of<'s>(&'s self, slot: &'s HotSlot, key: u128) -> Option<&'s [Rank]> {
        if slot.key != key {
            return None;
        }
        if slot.n <= 3 {
            return Some(&slot.ids[..slot.n as usize]);
        }
        let (offset, n) = (slot.ids[0] as usize, slot.n as usize);
        (slot.ids[1] == self.generation).then(|| &self.arena[offset..offset + n])
    }

    /// A slot holding `key` and `ids`, which go to the arena if there are more than three.
    #[inline]
    fn slot_for(&mut self, key: u128, ids: &[Rank]) -> HotSlot {
        let mut slot = HotSlot {
            key,
            n: ids.len() as u32,
            ids: [0; 3],
        };
        if ids.len() <= 3 {
            slot.ids[..ids.len()].copy_from_slice(ids);
        } else {
            let (offset, generation) = self.store(ids);
            slot.ids = [offset, generation, 0];
        }
        slot
    }
}

/// A byte-level BPE vocabulary with its pre-tokenizer and special tokens.
pub struct Encoder {
    /// id -> bytes, for ids `0..tokens.len()`. Byte strings are distinct.
    tokens: Vec<Vec<u8>>,
    /// bytes -> id; the id doubles as the merge rank. Tokens of up to 7 bytes are also in
    /// `short`, keyed by their bytes packed in a u64: most probes are short, and a pointer-free
    /// table avoids a cache miss on the key per probe.
    ranks: FxHashMap<Vec<u8>, Rank>,
    short: FxHashMap<u64, Rank>,
    /// Tokens of 8 to `HOT_LEN` bytes keyed by [`pack_hot`], for the same reason.
    mid: FxHashMap<u128, Rank>,
    /// Two-byte tokens by `(first << 8) | second` (`Rank::MAX`: none): BPE on non-Latin
    /// text starts with one such probe per byte pair, and an array index beats a hash.
    two: Box<[Rank]>,
    /// Bit `(a << 8) | b` is set if the bytes `a b` occur next to each other inside some
    /// token. Where a piece has two neighbouring bytes that occur in no token, no merge can
    /// ever join them (every part is a token), so BPE on each side is independent: all but
    /// short pieces are cut there, which keeps long ones linear (see `merge`).
    inner_pairs: Box<[u64]>,
    /// Rank of each three-byte UTF-8 character (`Rank::MAX`: not a token) by code point:
    /// CJK and Indic text asks about its characters all the time, and an array index
    /// beats a hash probe.
    three: Box<[Rank]>,
    /// id of each single byte (identity for trained vocabularies).
    byte_ids: [Rank; 256],
    specials: FxHashMap<String, Rank>,
    special_by_id: FxHashMap<Rank, String>,
    /// Matches any special token (leftmost-first, longest listed first); `None` without specials.
    special_regex: Option<regex::Regex>,
    pretokenizer: Pretokenizer,
    cache: thread_local::ThreadLocal<RefCell<Scratch>>,
}

impl Clone for Encoder {
    fn clone(&self) -> Self {
        Encoder {
            tokens: self.tokens.clone(),
            ranks: self.ranks.clone(),
            short: self.short.clone(),
            mid: self.mid.clone(),
            two: self.two.clone(),
            inner_pairs: self.inner_pairs.clone(),
            three: self.three.clone(),
            byte_ids: self.byte_ids,
            specials: self.specials.clone(),
            special_by_id: self.special_by_id.clone(),
            special_regex: self.special_regex.clone(),
            pretokenizer: self.pretokenizer.clone(),
            cache: thread_local::ThreadLocal::new(),
        }
    }
}

impl std::fmt::Debug for Encoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encoder")
            .field("n_tokens", &self.tokens.len())
            .field("specials", &self.specials)
            .field("pattern", &self.pretokenizer.pattern())
            .finish()
    }
}

impl Encoder {
    /// Builds an encoder from the token byte strings indexed by id. Every one of the 256 single
    /// bytes must be a token and no byte string may appear twice; special token ids must not
    /// collide with vocabulary ids or each other.
    pub fn new(
        tokens: Vec<Vec<u8>>,
        specials: Vec<(String, Rank)>,
        pretokenizer: Pretokenizer,
    ) -> Result<Self> {
        if tokens.len() > MAX_TOKENS {
            return Err(Error::InvalidVocab(format!(
                "{} tokens; at most {MAX_TOKENS} are supported",
                tokens.len()
            )));
        }
        let mut ranks = FxHashMap::default();
        ranks.reserve(tokens.len());
        for (id, t) in tokens.iter().enumerate() {
            if t.is_empty() {
                return Err(Error::InvalidVocab(format!("token {id} is empty")));
            }
            if t.len() > MAX_TOKEN_LEN {
                return Err(Error::InvalidVocab(format!(
                    "token {id} is {} bytes long; at most {MAX_TOKEN_LEN} are supported",
                    t.len()
                )));
            }
            if let Some(prev) = ranks.insert(t.clone(), id as Rank) {
                return Err(Error::InvalidVocab(format!(
                    "tokens {prev} and {id} have the same bytes {t:?}"
                )));
            }
        }
        let mut byte_ids = [0 as Rank; 256];
        for (b, slot) in byte_ids.iter_mut().enumerate() {
            *slot = *ranks
                .get(&[b as u8][..])
                .ok_or_else(|| Error::InvalidVocab(format!("byte {b:#04x} is not a token")))?;
        }
        let mut special_map = FxHashMap::default();
        let mut special_by_id = FxHashMap::default();
        for (s, id) in &specials {
            if s.is_empty() {
                return Err(Error::InvalidVocab("a special token is empty".into()));
            }
            if (*id as usize) < tokens.len() || special_by_id.contains_key(id) {
                return Err(Error::InvalidVocab(format!(
                    "special token {s:?} has id {id}, which is already taken"
                )));
            }
            if special_map.insert(s.clone(), *id).is_some() {
                return Err(Error::InvalidVocab(format!(
                    "special token {s:?} is listed twice"
                )));
            }
            special_by_id.insert(*id, s.clone());
        }
        let special_regex = build_literal_regex(specials.iter().map(|(s, _)| s.as_str()))?;
        let short = ranks
            .iter()
            .filter(|(k, _)| k.len() <= 7)
            .map(|(k, &v)| (pack(k), v))
            .collect();
        let mut inner_pairs = vec![0u64; (1 << 16) / 64].into_boxed_slice();
        for t in ranks.keys() {
            for w in t.windows(2) {
                let i = (w[0] as usize) << 8 | w[1] as usize;
                inner_pairs[i / 64] |= 1 << (i % 64);
            }
        }
        let mut three = vec![Rank::MAX; 1 << 16].into_boxed_slice();
        for (k, &v) in ranks.iter() {
            if let Some(c) = char3(k) {
                three[c] = v;
            }
        }
        let mut two = vec![Rank::MAX; 1 << 16].into_boxed_slice();
        for (k, &v) in ranks.iter().filter(|(k, _)| k.len() == 2) {
            two[(k[0] as usize) << 8 | k[1] as usize] = v;
        }
        let mid = ranks
            .iter()
            .filter(|(k, _)| (8..=HOT_LEN).contains(&k.len()))
            .map(|(k, &v)| (pack_hot(k), v))
            .collect();
        Ok(Encoder {
            tokens,
            ranks,
            short,
            mid,
            two,
            inner_pairs,
            three,
            byte_ids,
            specials: special_map,
            special_by_id,
            special_regex,
            pretokenizer,
            cache: thread_local::ThreadLocal::new(),
        })
    }

    /// Number of ordinary (mergeable) tokens.
    pub fn n_tokens(&self) -> usize {
        self.tokens.len()
    }

    /// One past the largest id, special tokens included.
    pub fn vocab_size(&self) -> usize {
        let max_special = self
            .special_by_id
            .keys()
            .max()
            .map_or(0, |&m| m as usize + 1);
        self.tokens.len().max(max_special)
    }

    pub fn tokens(&self) -> &[Vec<u8>] {
        &self.tokens
    }

    pub fn specials(&self) -> &FxHashMap<String, Rank> {
        &self.specials
    }

    pub fn pretokenizer(&self) -> &Pretokenizer {
        &self.pretokenizer
    }

    #[inline]
    pub fn rank(&self, bytes: &[u8]) -> Option<Rank> {
        if bytes.len() == 2 {
            let r = self.two[(bytes[0] as usize) << 8 | bytes[1] as usize];
            return (r != Rank::MAX).then_some(r);
        }
        if bytes.len() == 1 {
            return Some(self.byte_ids[bytes[0] as usize]);
        }
        if let Some(c) = char3(bytes) {
            let r = self.three[c];
            return (r != Rank::MAX).then_some(r);
        }
        if bytes.len() <= 7 {
            self.short.get(&pack(bytes)).copied()
        } else if bytes.len() <= HOT_LEN {
            self.mid.get(&pack_hot(bytes)).copied()
        } else {
            self.ranks.get(bytes).copied()
        }
    }

    /// Encodes one pre-tokenized piece, appending ids to `out`.
    pub fn encode_piece(&self, piece: &[u8], out: &mut Vec<Rank>) {
        let mut scratch = self.cache.get_or_default().borrow_mut();
        self.encode_piece_with(piece, &mut scratch, out);
    }

    #[inline]
    fn encode_piece_with(&self, piece: &[u8], scratch: &mut Scratch, out: &mut Vec<Rank>) {
        let n = piece.len();
        if n <= HOT_LEN {
            let key = pack_hot(piece);
            let (at, at_merged, at_seen) = hot_index(key);
            let slot = scratch.hot[at];
            if slot.key == key && slot.n <= 3 {
                // A loop of at most three pushes: `extend_from_slice` calls memcpy.
                for &id in &slot.ids[..slot.n as usize] {
                    out.push(id);
                }
                return;
            }
            if let Some(ids) = scratch.ids_of(&slot, key) {
                out.extend_from_slice(ids);
                return;
            }
            let start = out.len();
            // `merged` is megabytes, so a probe is a trip to memory: it is made only for
            // pieces merged before, and its line is fetched while the vocabulary is asked
            // whether the piece is a token.
            let seen = scratch.seen(at_seen) && scratch.merged_off == 0;
            if seen {
                prefetch(scratch.merged.as_ptr().wrapping_add(at_merged));
            }
            if let Some(id) = self.rank(piece) {
                out.push(id);
            } else if n == 1 {
                out.push(self.byte_ids[piece[0] as usize]);
            } else {
                if seen {
                    for found in scratch.merged[at_merged].0 {
                        if let Some(ids) = scratch.ids_of(&found, key) {
                            out.extend_from_slice(ids);
                            scratch.hot[at] = found;
                            scratch.merged_hits += 1;
                            scratch.count_probe();
                            return;
                        }
                    }
                    scratch.count_probe();
                } else {
                    scratch.merged_off = scratch.merged_off.saturating_sub(1);
                }
                self.merge_with(piece, scratch, out);
                let slot = scratch.slot_for(key, &out[start..]);
                scratch.hot[at] = slot;
                if scratch.merged_off == 0 {
                    let set = &mut scratch.merged[at_merged].0;
                    *set = [slot, set[0]];
                }
                if !seen {
                    scratch.mark_seen(at_seen);
                }
                return;
            }
            scratch.hot[at] = scratch.slot_for(key, &out[start..]);
        } else if let Some(&id) = self.ranks.get(piece) {
            out.push(id);
        } else if n > WARM_LEN {
            self.merge_with(piece, scratch, out);
        } else {
            let key = pack_warm(piece);
            if let Some(&(offset, n)) = scratch.warm.get(&key) {
                out.extend_from_slice(&scratch.warm_ids[offset as usize..(offset + n) as usize]);
                return;
            }
            let start = out.len();
            self.merge_with(piece, scratch, out);
            let ids = &out[start..];
            if scratch.warm.len() >= WARM_ENTRIES || scratch.warm_ids.len() + ids.len() > WARM_IDS {
                scratch.warm.clear();
                scratch.warm_ids.clear();
            }
            let offset = scratch.warm_ids.len() as u32;
            scratch.warm_ids.extend_from_slice(ids);
            scratch.warm.insert(key, (offset, ids.len() as u32));
        }
    }

    /// BPE on a piece of two or more bytes that is not itself a token (tests call this;
    /// the encoder uses [`Encoder::merge_with`] with the scratch it already holds).
    #[cfg(test)]
    fn merge(&self, piece: &[u8], out: &mut Vec<Rank>) {
        let mut scratch = self.cache.get_or_default().borrow_mut();
        self.merge_with(piece, &mut scratch, out);
    }

    /// BPE on a piece of two or more bytes that is not itself a token.
    fn merge_with(&self, piece: &[u8], scratch: &mut Scratch, out: &mut Vec<Rank>) {
        if piece.len() <= CUT_PIECE {
            merge_short(|b| self.rank(b), piece, |r| out.push(r));
            return;
        }
        // Cut where no token can span (see `inner_pairs`); each segment gets BPE on its own
        // (never the whole-piece lookup, which applies to pieces only).
        let mut start = 0;
        for i in 1..=piece.len() {
            if i < piece.len() && self.joinable(piece[i - 1], piece[i]) {
                continue;
            }
            let seg = &piece[start..i];
            match seg.len() {
                1 => out.push(self.byte_ids[seg[0] as usize]),
                n if n <= HOT_LEN => self.merge_segment(seg, scratch, out),
                n if n <= LONG_PIECE => merge_short(|b| self.rank(b), seg, |r| out.push(r)),
                _ => merge_long(|b| self.rank(b), seg, |r| out.push(r)),
            }
            start = i;
        }
    }

    /// BPE on a short segment of a cut piece, through the `hot` cache under a key of its own
    /// (see [`SEGMENT_MARK`]): Japanese runs cut into segments of a few bytes that recur
    /// (particles, common words) even where the runs themselves never do.
    #[inline]
    fn merge_segment(&self, seg: &[u8], scratch: &mut Scratch, out: &mut Vec<Rank>) {
        let key = pack_hot(seg) | SEGMENT_MARK;
        let (at, _, _) = hot_index(key);
        let slot = scratch.hot[at];
        if let Some(ids) = scratch.ids_of(&slot, key) {
            out.extend_from_slice(ids);
            return;
        }
        let start = out.len();
        merge_short(|b| self.rank(b), seg, |r| out.push(r));
        scratch.hot[at] = scratch.slot_for(key, &out[start..]);
    }

    /// Whether the bytes `a b` occur next to each other in some token.
    #[inline]
    fn joinable(&self, a: u8, b: u8) -> bool {
        let i = (a as usize) << 8 | b as usize;
        self.inner_pairs[i / 64] >> (i % 64) & 1 == 1
    }

    /// Encodes text ignoring special tokens (their text is encoded as ordinary text).
    pub fn encode_ordinary(&self, text: &str) -> Result<Vec<Rank>> {
        let mut out = Vec::with_capacity(text.len() / 4 + 1);
        self.encode_ordinary_into(text, &mut out)?;
        Ok(out)
    }

    /// [`Encoder::encode_ordinary`], appending to `out`.
    pub fn encode_ordinary_into(&self, text: &str, out: &mut Vec<Rank>) -> Result<()> {
        let mut scratch = self.cache.get_or_default().borrow_mut();
        self.pretokenizer.for_each_piece(text, |p| {
            self.encode_piece_with(p.as_bytes(), &mut scratch, out)
        })
    }

    /// Encodes text, turning the special tokens in `allowed` into their ids. If `disallowed`
    /// is given, any occurrence of one of those special tokens is an error (tiktoken's check).
    pub fn encode(
        &self,
        text: &str,
        allowed: &HashSet<String>,
        disallowed: Option<&HashSet<String>>,
    ) -> Result<Vec<Rank>> {
        let mut out = Vec::with_capacity(text.len() / 4 + 1);
        self.encode_into(text, allowed, disallowed, &mut out)?;
        Ok(out)
    }

    /// [`Encoder::encode`], appending to `out` (on error `out` may hold part of the ids).
    pub fn encode_into(
        &self,
        text: &str,
        allowed: &HashSet<String>,
        disallowed: Option<&HashSet<String>>,
        out: &mut Vec<Rank>,
    ) -> Result<()> {
        if let Some(dis) = disallowed {
            self.check_disallowed(text, dis)?;
        }
        let Some(special_regex) = self.special_regex.as_ref().filter(|_| !allowed.is_empty())
        else {
            return self.encode_ordinary_into(text, out);
        };
        let mut start = 0;
        loop {
            // The next allowed special token at or after `start`; specials that are not
            // allowed are skipped and stay ordinary text.
            let mut find_from = start;
            let mut next = None;
            while let Some(m) = special_regex.find_at(text, find_from) {
                if allowed.contains(m.as_str()) {
                    next = Some(m);
                    break;
                }
                find_from = m.start() + text[m.start()..].chars().next().map_or(1, char::len_utf8);
            }
            let end = next.map_or(text.len(), |m| m.start());
            self.encode_ordinary_into(&text[start..end], out)?;
            match next {
                Some(m) => {
                    out.push(self.specials[m.as_str()]);
                    start = m.end();
                }
                None => return Ok(()),
            }
        }
    }

    /// [`Encoder::encode`] with its defaults (no special token allowed, all disallowed),
    /// appending to `out`: the common call, without building the two sets.
    pub fn encode_strict_into(&self, text: &str, out: &mut Vec<Rank>) -> Result<()> {
        if let Some(m) = self.special_regex.as_ref().and_then(|r| r.find(text)) {
            return Err(Error::DisallowedSpecial(m.as_str().to_string()));
        }
        self.encode_ordinary_into(text, out)
    }

    fn check_disallowed(&self, text: &str, disallowed: &HashSet<String>) -> Result<()> {
        if disallowed.is_empty() {
            return Ok(());
        }
        for s in disallowed {
            if !self.specials.contains_key(s) {
                return Err(Error::Value(format!("{s:?} is not a special token")));
            }
        }
        let found = if disallowed.len() == self.specials.len() {
            self.special_regex
                .as_ref()
                .and_then(|r| r.find(text))
                .map(|m| m.as_str().to_string())
        } else {
            build_literal_regex(disallowed.iter().map(String::as_str))?
                .and_then(|r| r.find(text).map(|m| m.as_str().to_string()))
        };
        match found {
            Some(s) => Err(Error::DisallowedSpecial(s)),
            None => Ok(()),
        }
    }

    /// The bytes of a sequence of ids (special tokens give their text).
    pub fn decode_bytes(&self, ids: &[Rank]) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(ids.len() * 4);
        for &id in ids {
            if let Some(t) = self.tokens.get(id as usize) {
                out.extend_from_slice(t);
            } else if let Some(s) = self.special_by_id.get(&id) {
                out.extend_from_slice(s.as_bytes());
            } else {
                return Err(Error::UnknownId(id));
            }
        }
        Ok(out)
    }

    /// The (left, right) pair each token above the byte tokens was merged from, in id order.
    /// For a trained vocabulary these are the recorded merges; for a loaded one (tiktoken,
    /// GPT-2) they are recovered by running BPE on the token's bytes with only lower ranks,
    /// which must stop at exactly two parts for a consistent BPE vocabulary.
    pub fn derive_merges(&self) -> Result<Vec<(Rank, Rank)>> {
        let mut merges = Vec::with_capacity(self.tokens.len().saturating_sub(256));
        for (id, t) in self.tokens.iter().enumerate() {
            if t.len() == 1 {
                if id >= 256 {
                    return Err(Error::InvalidVocab(format!(
                        "byte token {id} is not below 256"
                    )));
                }
                continue;
            }
            if id < 256 {
                return Err(Error::InvalidVocab(format!(
                    "token {id} below 256 is not a byte"
                )));
            }
            let mut parts = Vec::with_capacity(2);
            let below = |b: &[u8]| self.rank(b).filter(|&r| r < id as Rank);
            if t.len() <= LONG_PIECE {
                merge_short(below, t, |r| parts.push(r));
            } else {
                merge_long(below, t, |r| parts.push(r));
            }
            if parts.len() != 2 {
                return Err(Error::InvalidVocab(format!(
                    "token {id} ({t:?}) is not the merge of two lower-ranked tokens"
                )));
            }
            merges.push((parts[0], parts[1]));
        }
        Ok(merges)
    }
}

/// A regex matching any of the literals, longest first so that a special token that is a
/// prefix of another does not shadow it.
fn build_literal_regex<'a>(lits: impl Iterator<Item = &'a str>) -> Result<Option<regex::Regex>> {
    let mut lits: Vec<&str> = lits.collect();
    if lits.is_empty() {
        return Ok(None);
    }
    lits.sort_by(|a, b| b.len().cmp(&a.len()).then(a.cmp(b)));
    let alt = lits
        .iter()
        .map(|s| regex::escape(s))
        .collect::<Vec<_>>()
        .join("|");
    regex::Regex::new(&alt)
        .map(Some)
        .map_err(|e| Error::Value(e.to_string()))
}

/// The bytes of a short (at most 7 bytes) string packed with its length into a u64. Built
/// from two overlapping loads rather than a variable-length copy (which is a `memcpy` call).
#[inline]
fn pack(b: &[u8]) -> u64 {
    let n = b.len();
    debug_assert!(n <= 7);
    let v = if n >= 4 {
        let lo = u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as u64;
        let hi = u32::from_le_bytes([b[n - 4], b[n - 3], b[n - 2], b[n - 1]]) as u64;
        lo | (hi << ((n - 4) * 8))
    } else if n >= 2 {
        let lo = u16::from_le_bytes([b[0], b[1]]) as u64;
        let hi = u16::from_le_bytes([b[n - 2], b[n - 1]]) as u64;
        lo | (hi << ((n - 2) * 8))
    } else if n == 1 {
        b[0] as u64
    } else {
        0
    };
    v | ((n as u64) << 56)
}

/// A piece of at most `HOT_LEN` bytes packed into a u128: up to 7 bytes as [`pack`] in the
/// low half; longer ones as their first 8 bytes, then the rest packed with a flag bit that
/// keeps the two forms apart. Never 0.
#[inline]
pub(crate) fn pack_hot(b: &[u8]) -> u128 {
    if b.len() <= 7 {
        pack(b) as u128
    } else {
        let lo = u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
        let hi = pack(&b[8..]) | (1 << 63);
        lo as u128 | ((hi as u128) << 64)
    }
}

/// The bytes [`pack_hot`] packed, as a buffer and the length used (no allocation: the
/// trainer unpacks every distinct piece).
pub(crate) fn unpack_hot(key: u128) -> ([u8; 16], usize) {
    let (lo, hi) = (key as u64, (key >> 64) as u64);
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&lo.to_le_bytes());
    if hi == 0 {
        (out, (lo >> 56) as usize)
    } else {
        out[8..].copy_from_slice(&hi.to_le_bytes());
        (out, 8 + ((hi >> 56) & 0x7F) as usize)
    }
}

/// The code point of `b` if it is exactly one three-byte UTF-8 character.
#[inline]
fn char3(b: &[u8]) -> Option<usize> {
    match *b {
        [l @ 0xE0..=0xEF, c1, c2] if c1 & 0xC0 == 0x80 && c2 & 0xC0 == 0x80 => {
            let cp =
                ((l as usize & 0x0F) << 12) | ((c1 as usize & 0x3F) << 6) | (c2 as usize & 0x3F);
            // Overlong forms (below U+0800) and surrogates are not characters; they never
            // occur in a piece of valid text but may be tokens, so they keep the hash path.
            (cp >= 0x800 && !(0xD800..0xE000).contains(&cp)).then_some(cp)
        }
        _ => None,
    }
}

/// Asks the CPU to start loading the cache line at `p`.
#[inline(always)]
pub(crate) fn prefetch<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is a hint; it never faults, whatever the address.
    unsafe {
        std::arch::x86_64::_mm_prefetch(p as *const i8, std::arch::x86_64::_MM_HINT_T0);
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Slot and set of a packed piece in the per-thread caches `hot` and `merged` and its bit in the
/// `seen` filter (Fibonacci hashing of both halves). Only the top bits of a product depend
/// on every bit of the key, so `merged` and `seen` take the top bits of a second round:
/// lower bits of the first depended on the first few bytes alone, and words sharing a
/// prefix collided.
#[inline]
fn hot_index(key: u128) -> (usize, usize, usize) {
    const K: u64 = 0x9E37_79B9_7F4A_7C15;
    let h = (key as u64 ^ ((key >> 64) as u64).rotate_left(29)).wrapping_mul(K);
    let h2 = (h ^ (h >> 32)).wrapping_mul(K);
    let merged = h2 >> (64 - MERGED_BITS);
    let seen = (h2 >> (64 - MERGED_BITS - SEEN_BITS)) & ((1 << SEEN_BITS) - 1);
    (
        (h >> (64 - HOT_BITS)) as usize,
        merged as usize,
        seen as usize,
    )
}

/// A piece of `HOT_LEN + 1` to `WARM_LEN` bytes as its first 16 bytes and the rest packed.
#[inline]
fn pack_warm(b: &[u8]) -> (u128, u128) {
    debug_assert!(b.len() > HOT_LEN && b.len() <= WARM_LEN);
    let mut lo = [0u8; 16];
    lo.copy_from_slice(&b[..16]);
    let rest = &b[16..];
    let hi = if rest.is_empty() { 0 } else { pack_hot(rest) };
    (u128::from_le_bytes(lo), hi)
}

/// BPE on a piece of 2 to `LONG_PIECE` bytes, on the stack. Calls `emit(rank)` for each
/// final part.
fn merge_short(rank: impl Fn(&[u8]) -> Option<Rank>, piece: &[u8], emit: impl FnMut(Rank)) {
    // Arrays sized for the piece: they are initialized on every call, and most pieces are
    // short.
    match piece.len() {
        0..=32 => merge_on_stack::<32, 0>(rank, piece, emit),
        33..=64 => merge_on_stack::<64, { 3 * 64 }>(rank, piece, emit),
        _ => merge_on_stack::<LONG_PIECE, { 3 * LONG_PIECE }>(rank, piece, emit),
    }
}

/// BPE on a piece of 2 to `CAP` bytes (`CAP` < 256). Without a heap (`HEAP == 0`) the
/// lowest pair is found by a scan, O(n^2) with tiny constants; else the pairs are kept in a
/// heap of `HEAP` entries, at least `3 * CAP` (the initial pairs and two per merge).
fn merge_on_stack<const CAP: usize, const HEAP: usize>(
    rank: impl Fn(&[u8]) -> Option<Rank>,
    piece: &[u8],
    mut emit: impl FnMut(Rank),
) {
    let n = piece.len();
    debug_assert!(n >= 2 && n <= CAP && CAP < 256);
    let rank_of = |s: usize, e: usize| rank(&piece[s..e]).unwrap_or(Rank::MAX);
    // Indexed by byte position, so that a merge moves nothing (compacting arrays of parts
    // cost a memmove per merge): `end[s]` is the end of the part starting at `s`, `prev[s]`
    // the start of the part before it, `pair_rank[s]` the rank of that part joined with the
    // next (`Rank::MAX` if no token, or if `s` no longer starts a part) and `id[s]` the
    // part's id once it is a merge. On the stack: this runs once per uncached piece, and
    // heap allocations per call were a visible share of the time.
    let mut end = [0u8; CAP];
    let mut prev = [0u8; CAP];
    let mut pair_rank = [Rank::MAX; CAP];
    let mut id = [Rank::MAX; CAP];
    for i in 0..n {
        end[i] = i as u8 + 1;
        prev[i] = i.wrapping_sub(1) as u8;
    }
    for (i, r) in pair_rank[..n - 1].iter_mut().enumerate() {
        *r = rank_of(i, i + 2);
    }
    // Longer pieces: candidate pairs as `rank << 8 | position` in a min-heap, whose
    // smallest key is the lowest rank, leftmost first. Entries go stale when a part changes
    // and are then skipped: an entry is current iff its rank is still the pair's rank at
    // its position (equal ranks are equal bytes, so the same span).
    let use_heap = HEAP > 0;
    let mut heap = SmallHeap::<HEAP>::new();
    if use_heap {
        for (i, &r) in pair_rank[..n - 1].iter().enumerate() {
            if r != Rank::MAX {
                heap.push((r as u64) << 8 | i as u64);
            }
        }
    }
    loop {
        let (at, best) = if use_heap {
            match heap.pop() {
                Some(key) => ((key & 0xFF) as usize, (key >> 8) as Rank),
                None => break,
            }
        } else {
            leftmost_min(&pair_rank[..n - 1])
        };
        if best == Rank::MAX {
            break;
        }
        if pair_rank[at] != best {
            continue;
        }
        let mid = end[at] as usize;
        let e = end[mid] as usize;
        end[at] = e as u8;
        id[at] = best;
        pair_rank[mid] = Rank::MAX;
        pair_rank[at] = if e < n {
            prev[e] = at as u8;
            rank_of(at, end[e] as usize)
        } else {
            Rank::MAX
        };
        if use_heap && pair_rank[at] != Rank::MAX {
            heap.push((pair_rank[at] as u64) << 8 | at as u64);
        }
        if at > 0 {
            let p = prev[at] as usize;
            pair_rank[p] = rank_of(p, e);
            if use_heap && pair_rank[p] != Rank::MAX {
                heap.push((pair_rank[p] as u64) << 8 | p as u64);
            }
        }
    }
    let mut s = 0;
    while s < n {
        // A final part is a single byte or a merged token, so it always has a rank.
        emit(if id[s] != Rank::MAX {
            id[s]
        } else {
            rank(&piece[s..s + 1]).unwrap_or(Rank::MAX)
        });
        s = end[s] as usize;
    }
}

/// Position and value of the first smallest rank.
#[inline]
fn leftmost_min(ranks: &[Rank]) -> (usize, Rank) {
    let mut best = Rank::MAX;
    let mut at = 0;
    for (i, &r) in ranks.iter().enumerate() {
        if r < best {
            best = r;
            at = i;
        }
    }
    (at, best)
}

/// A binary min-heap of at most `N` keys on the stack.
struct SmallHeap<const N: usize> {
    len: usize,
    keys: [u64; N],
}

impl<const N: usize> SmallHeap<N> {
    #[inline]
    fn new() -> Self {
        SmallHeap {
            len: 0,
            keys: [0; N],
        }
    }

    #[inline]
    fn push(&mut self, key: u64) {
        let mut i = self.len;
        self.len += 1;
        while i > 0 {
            let parent = (i - 1) / 2;
            if self.keys[parent] <= key {
                break;
            }
            self.keys[i] = self.keys[parent];
            i = parent;
        }
        self.keys[i] = key;
    }

    #[inline]
    fn pop(&mut self) -> Option<u64> {
        if self.len == 0 {
            return None;
        }
        let top = self.keys[0];
        self.len -= 1;
        let last = self.keys[self.len];
        let mut i = 0;
        loop {
            let mut child = 2 * i + 1;
            if child >= self.len {
                break;
            }
            if child + 1 < self.len && self.keys[child + 1] < self.keys[child] {
                child += 1;
            }
            if last <= self.keys[child] {
                break;
            }
            self.keys[i] = self.keys[child];
            i = child;
        }
        self.keys[i] = last;
        Some(top)
    }
}

/// BPE on a long piece with a bucket queue: positions are grouped by the rank of the pair
/// that starts there, and the ranks are taken in increasing order, each rank's positions
/// left to right. That is the global "lowest rank, leftmost first" order, because merging a
/// pair of rank `r` can only create pairs of other ranks (a pair whose bytes equal a token
/// of rank `r` would be longer than that token). In ordinary vocabularies the new pairs
/// rank higher; if one ranks lower (possible in hand-made vocabularies), the rest of the
/// current rank is put back and the lowest rank is taken first, as the definition demands.
///
/// A heap of all positions, as used before, is O(n log n) with a cache miss on most of its
/// levels: on multi-megabyte pieces its time grew about twice as fast as the input. Here
/// each merge costs a bucket push, and each rank's positions are visited in one sorted
/// sweep.
///
/// `pair_rank[s]` is the rank of the pair starting at part `s` (`Rank::MAX` if that pair is
/// not a token or `s` is no longer a part start); a queued position is current iff its rank
/// still equals the bucket's. Equal ranks mean equal bytes, hence the same span.
fn merge_long(rank: impl Fn(&[u8]) -> Option<Rank>, piece: &[u8], mut emit: impl FnMut(Rank)) {
    let n = piece.len();
    debug_assert!(n < u32::MAX as usize);
    let rank_of = |s: usize, e: usize| rank(&piece[s..e]).unwrap_or(Rank::MAX);
    // len[s]: length of the part starting at s; before[s]: length of the part before it.
    // Lengths, not positions, because a part is a token (or a byte), and tokens are short:
    // two bytes per array instead of four mean less memory to fault in and stream through
    // on multi-megabyte pieces, whose time otherwise grew faster than their size.
    let mut kept = LONG_SCRATCH.take();
    let (mut len, mut before, mut pair_rank) = (kept.len, kept.before, kept.pair_rank);
    len.clear();
    len.resize(n, 1);
    before.clear();
    before.resize(n, 1);
    pair_rank.clear();
    pair_rank.extend((0..n).map(|i| {
        if i + 1 < n {
            rank_of(i, i + 2)
        } else {
            Rank::MAX
        }
    }));
    let mut buckets = Buckets {
        spare: std::mem::take(&mut kept.spare),
        ..Buckets::default()
    };
    for (s, &r) in pair_rank.iter().enumerate() {
        if r != Rank::MAX {
            buckets.push(r, s);
        }
    }
    while let Some((r, mut list)) = buckets.pop() {
        sort_positions(&mut list);
        let mut k = 0;
        while k < list.len() {
            let s = list[k] as usize;
            k += 1;
            if pair_rank[s] != r {
                continue; // stale: the part or its neighbour changed
            }
            // Join the part at s with the next one.
            let mid = s + len[s] as usize;
            let e = mid + len[mid] as usize;
            len[s] = (e - s) as u16;
            pair_rank[mid] = Rank::MAX;
            if e < n {
                before[e] = len[s];
            }
            let mut lower = false;
            pair_rank[s] = if e < n {
                rank_of(s, e + len[e] as usize)
            } else {
                Rank::MAX
            };
            if pair_rank[s] != Rank::MAX {
                lower |= pair_rank[s] < r;
                buckets.push(pair_rank[s], s);
            }
            if s > 0 {
                let p = s - before[s] as usize;
                pair_rank[p] = rank_of(p, e);
                if pair_rank[p] != Rank::MAX {
                    lower |= pair_rank[p] < r;
                    buckets.push(pair_rank[p], p);
                }
            }
            if lower {
                // A lower rank must go first: requeue what is left of this one.
                for &s in &list[k..] {
                    buckets.push(r, s as usize);
                }
                break;
            }
        }
        buckets.recycle(list);
    }
    let mut s = 0;
    while s < n {
        let e = s + len[s] as usize;
        emit(rank(&piece[s..e]).unwrap_or(Rank::MAX));
        s = e;
    }
    if n <= LONG_KEEP {
        LONG_SCRATCH.set(LongScratch {
            len,
            before,
            pair_rank,
            spare: buckets.spare,
        });
    }
}

/// Longest piece whose [`merge_long`] arrays a thread keeps for the next long piece (about
/// 20 bytes per byte of piece, so at most ~20 MiB per thread). Big buffers freed after
/// each call went back to the operating system and were faulted in again on the next:
/// that was most of why 1 MB of one letter cost more per byte than 100 KB.
const LONG_KEEP: usize = 1 << 20;

/// The reusable buffers of [`merge_long`].
#[derive(Default)]
struct LongScratch {
    len: Vec<u16>,
    before: Vec<u16>,
    pair_rank: Vec<Rank>,
    spare: Vec<Vec<u32>>,
}

thread_local! {
    static LONG_SCRATCH: std::cell::Cell<LongScratch> = std::cell::Cell::new(LongScratch::default());
}

/// The positions of [`merge_long`] grouped by rank, taken lowest rank first.
struct Buckets {
    lists: Vec<Vec<u32>>,
    /// Rank -> index in `lists` of the ranks still queued.
    index: FxHashMap<Rank, usize>,
    queue: BinaryHeap<Reverse<Rank>>,
    /// The two ranks pushed to last, with their indices: a merge sweep pushes to the same
    /// one or two ranks over and over, and this skips the hash lookup for them.
    recent: [(Rank, usize); 2],
    /// Emptied lists, reused for new ranks: on a multi-megabyte piece, allocating a fresh
    /// list per rank meant faulting in fresh memory again and again.
    spare: Vec<Vec<u32>>,
}

impl Default for Buckets {
    fn default() -> Self {
        Buckets {
            lists: Vec::new(),
            index: FxHashMap::default(),
            queue: BinaryHeap::new(),
            recent: [(Rank::MAX, 0); 2],
            spare: Vec::new(),
        }
    }
}

impl Buckets {
    #[inline]
    fn push(&mut self, r: Rank, s: usize) {
        debug_assert!(r != Rank::MAX);
        let i = if self.recent[0].0 == r {
            self.recent[0].1
        } else if self.recent[1].0 == r {
            self.recent.swap(0, 1);
            self.recent[0].1
        } else {
            let i = match self.index.get(&r) {
                Some(&i) => i,
                None => {
                    self.lists.push(self.spare.pop().unwrap_or_default());
                    self.queue.push(Reverse(r));
                    self.index.insert(r, self.lists.len() - 1);
                    self.lists.len() - 1
                }
            };
            self.recent = [(r, i), self.recent[0]];
            i
        };
        self.lists[i].push(s as u32);
    }

    /// Takes back a list returned by [`Buckets::pop`] once its positions are used.
    fn recycle(&mut self, mut list: Vec<u32>) {
        list.clear();
        self.spare.push(list);
    }

    /// The lowest queued rank and its positions.
    fn pop(&mut self) -> Option<(Rank, Vec<u32>)> {
        let Reverse(r) = self.queue.pop()?;
        let i = self.index.remove(&r)?;
        for slot in &mut self.recent {
            if slot.0 == r {
                *slot = (Rank::MAX, 0);
            }
        }
        Some((r, std::mem::take(&mut self.lists[i])))
    }
}

/// Sorts positions: a radix sort for big lists (linear, where a comparison sort would add
/// a log factor on multi-megabyte pieces), the standard sort for small ones.
fn sort_positions(list: &mut Vec<u32>) {
    // Positions are pushed during left-to-right sweeps, so lists are often sorted already.
    if list.is_sorted() {
        return;
    }
    if list.len() < 1 << 12 {
        list.sort_unstable();
        return;
    }
    let max = list.iter().copied().max().unwrap_or(0);
    let mut tmp = vec![0u32; list.len()];
    let mut shift = 0;
    while shift < 32 && (max >> shift) != 0 {
        let mut counts = [0usize; 257];
        for &x in list.iter() {
            counts[((x >> shift) & 0xFF) as usize + 1] += 1;
        }
        for i in 1..257 {
            counts[i] += counts[i - 1];
        }
        for &x in list.iter() {
            let d = ((x >> shift) & 0xFF) as usize;
            tmp[counts[d]] = x;
            counts[d] += 1;
        }
        std::mem::swap(list, &mut tmp);
        shift += 8;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toy(merges: &[&[u8]]) -> Encoder {
        let mut tokens: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
        tokens.extend(merges.iter().map(|m| m.to_vec()));
        Encoder::new(
            tokens,
            vec![("<|endoftext|>".into(), 256 + merges.len() as u32)],
            Pretokenizer::new("gpt2").unwrap(),
        )
        .unwrap()
    }

    #[test]
    fn lowest_rank_merges_first() {
        let e = toy(&[b"bc", b"ab", b"abc"]);
        // bc (256) beats ab (257); then a+bc = abc (258).
        assert_eq!(e.encode_ordinary("abc").unwrap(), vec![258]);
        assert_eq!(e.encode_ordinary("abd").unwrap(), vec![257, b'd' as u32]);
    }

    /// BPE by definition, as slowly as possible: the reference for the fast paths.
    fn naive(e: &Encoder, piece: &[u8]) -> Vec<Rank> {
        let mut parts: Vec<Vec<u8>> = piece.iter().map(|&b| vec![b]).collect();
        loop {
            let best = (0..parts.len().saturating_sub(1))
                .filter_map(|i| {
                    e.rank(&[parts[i].clone(), parts[i + 1].clone()].concat())
                        .map(|r| (r, i))
                })
                .min();
            let Some((_, i)) = best else { break };
            let right = parts.remove(i + 1);
            parts[i].extend(right);
        }
        parts.iter().map(|p| e.rank(p).unwrap()).collect()
    }

    #[test]
    fn long_pieces_follow_the_definition_even_with_inverted_ranks() {
        // "xyz" ranks below "xy" and "yz" is no token: merging x+y creates the pair xy+z
        // of lower rank (the requeue path).
        let e = toy(&[
            b"bc", b"cd", b"abc", b"ab", b"abcd", b"aa", b"aaa", b"aaaa", b"dab", b"xyz", b"xy",
        ]);
        let mut state = 7u64;
        for len in [65usize, 100, 257, 1000, 4000] {
            for alphabet in [&b"ab"[..], b"abcd", b"a", b"abcdx", b"xyz", b"xyza"] {
                let s: Vec<u8> = (0..len)
                    .map(|_| {
                        state ^= state << 13;
                        state ^= state >> 7;
                        state ^= state << 17;
                        alphabet[(state % alphabet.len() as u64) as usize]
                    })
                    .collect();
                let want = naive(&e, &s);
                let mut long = Vec::new();
                merge_long(|b| e.rank(b), &s, |r| long.push(r));
                assert_eq!(long, want, "len {len} alphabet {alphabet:?}");
                // The same through the dispatch that cuts at bytes no token joins.
                let mut cut = Vec::new();
                e.merge(&s, &mut cut);
                assert_eq!(cut, want, "len {len} alphabet {alphabet:?} (cut)");
            }
        }
    }

    fn xorshift(state: &mut u64) -> u64 {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *state
    }

    #[test]
    fn stack_merges_follow_the_definition_at_every_size() {
        // The scan (up to 32 bytes) and the two heap sizes, across their boundaries, with
        // the vocabulary whose merges can create lower-ranked pairs.
        let e = toy(&[
            b"bc", b"cd", b"abc", b"ab", b"abcd", b"aa", b"aaa", b"aaaa", b"dab", b"xyz", b"xy",
        ]);
        let mut state = 11u64;
        let lens = (2..=70).chain([127, 128, 200, LONG_PIECE - 1, LONG_PIECE]);
        for len in lens {
            for alphabet in [&b"ab"[..], b"abcd", b"a", b"abcdx", b"xyz", b"xyza"] {
                let s: Vec<u8> = (0..len)
                    .map(|_| alphabet[(xorshift(&mut state) % alphabet.len() as u64) as usize])
                    .collect();
                let mut got = Vec::new();
                merge_short(|b| e.rank(b), &s, |r| got.push(r));
                assert_eq!(got, naive(&e, &s), "len {len} alphabet {alphabet:?}");
            }
        }
    }

    #[test]
    fn three_byte_characters_use_their_table() {
        // 中 = e4 b8 ad, 文 = e6 96 87; tokens inside, across and of whole characters.
        let e = toy(&[
            b"\xb8\xad",
            b"\xe4\xb8\xad",
            b"\xad\xe6",
            b"\xe6\x96",
            b"\xe6\x96\x87",
            b"\xe4\xb8\xad\xe6\x96\x87",
            b"\xe4\xb8",
        ]);
        assert_eq!(e.rank("中".as_bytes()), Some(257));
        assert_eq!(e.rank("文".as_bytes()), Some(260));
        assert_eq!(e.rank("字".as_bytes()), None);
        let mut state = 5u64;
        for len in [1usize, 2, 3, 7, 20, 90, 400] {
            let s: String = (0..len)
                .map(|_| ['中', '文', '字'][(xorshift(&mut state) % 3) as usize])
                .collect();
            let mut got = Vec::new();
            e.merge(s.as_bytes(), &mut got);
            assert_eq!(got, naive(&e, s.as_bytes()), "{s}");
        }
    }

    #[test]
    fn caches_give_what_merging_gives() {
        // Words of 2 to 40 bytes, most of several tokens, encoded again and again: later
        // passes are served by the caches (hot slots with ids inline and in the arena, the
        // second cache of merged pieces, the map of longer pieces), which the tests shrink
        // so that they evict and start over all the time. Text of few distinct words
        // (which `merged` serves) alternates with text of new words each time (after which
        // it turns itself off for a while), so both states and the switches between them
        // are covered.
        let e = toy(&[b"ab", b"cd", b"abcd", b"ba", b"dc", b"bab"]);
        let pre = Pretokenizer::new("gpt2").unwrap();
        let mut state = 3u64;
        let word = |state: &mut u64| -> String {
            let len = 2 + (xorshift(state) % 39) as usize;
            (0..len)
                .map(|_| ['a', 'b', 'c', 'd'][(xorshift(state) % 4) as usize])
                .collect()
        };
        let vocab: Vec<String> = (0..60).map(|_| word(&mut state)).collect();
        for round in 0..8 {
            let mut text = String::new();
            for _ in 0..3000 {
                text.push(' ');
                if round % 2 == 0 {
                    text.push_str(&vocab[(xorshift(&mut state) % 60) as usize]);
                } else {
                    text.push_str(&word(&mut state));
                }
            }
            let mut want = Vec::new();
            for p in pre.pieces(&text).unwrap() {
                match e.rank(p.as_bytes()) {
                    Some(id) => want.push(id),
                    None => want.extend(naive(&e, p.as_bytes())),
                }
            }
            for pass in 0..2 {
                assert_eq!(
                    e.encode_ordinary(&text).unwrap(),
                    want,
                    "round {round} pass {pass}"
                );
            }
        }
    }

    #[test]
    fn radix_sort_sorts() {
        let mut state = 1u64;
        for n in [0usize, 5, 4095, 4096, 10_000, 100_000] {
            let mut v: Vec<u32> = (0..n)
                .map(|_| {
                    state = state.wrapping_mul(6364136223846793005).wrapping_add(1);
                    (state >> 33) as u32 % (n as u32 * 3 + 1)
                })
                .collect();
            let mut want = v.clone();
            want.sort_unstable();
            sort_positions(&mut v);
            assert_eq!(v, want);
        }
    }

    #[test]
    fn long_and_short_paths_agree() {
        let e = toy(&[b"aa", b"aaaa", b"ab", b"aaab"]);
        for n in [1usize, 2, 3, 5, LONG_PIECE - 2, LONG_PIECE - 1] {
            let s: String = "a".repeat(n) + "b";
            let mut short = Vec::new();
            merge_short(|b| e.rank(b), s.as_bytes(), |r| short.push(r));
            let mut long = Vec::new();
            merge_long(|b| e.rank(b), s.as_bytes(), |r| long.push(r));
            assert_eq!(short, long, "n={n}");
        }
    }

    #[test]
    fn pack_hot_round_trips() {
        let text = b"\x00\x01abcdefghijklmno\xff\x80";
        for n in 1..=HOT_LEN {
            for start in 0..=text.len() - n {
                let b = &text[start..start + n];
                let (bytes, n) = unpack_hot(pack_hot(b));
                assert_eq!(&bytes[..n], b, "{b:?}");
                assert_ne!(pack_hot(b), 0);
            }
        }
    }

    #[test]
    fn specials_allowed_and_disallowed() {
        let e = toy(&[]);
        let eot = 256;
        let all: HashSet<String> = ["<|endoftext|>".to_string()].into();
        let none = HashSet::new();
        assert_eq!(
            e.encode("a<|endoftext|>", &all, None).unwrap(),
            vec![97, eot]
        );
        assert!(matches!(
            e.encode("a<|endoftext|>", &none, Some(&all)),
            Err(Error::DisallowedSpecial(_))
        ));
        assert!(e.encode("a<|endoftext|>", &none, None).unwrap().len() > 2);
    }

    #[test]
    fn decode_unknown_id() {
        let e = toy(&[]);
        assert_eq!(
            e.decode_bytes(&[104, 105, 256]).unwrap(),
            b"hi<|endoftext|>"
        );
        assert!(matches!(
            e.decode_bytes(&[9999]),
            Err(Error::UnknownId(9999))
        ));
    }

    #[test]
    fn overlong_tokens_rejected() {
        let mut tokens: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
        tokens.push(vec![b'a'; MAX_TOKEN_LEN + 1]);
        let err = Encoder::new(tokens, vec![], Pretokenizer::new("gpt2").unwrap()).unwrap_err();
        assert!(matches!(err, Error::InvalidVocab(_)), "{err}");
    }

    #[test]
    fn duplicate_tokens_rejected() {
        let mut tokens: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
        tokens.push(b"a".to_vec());
        assert!(Encoder::new(tokens, vec![], Pretokenizer::new("gpt2").unwrap()).is_err());
    }

    #[test]
    fn derive_merges_recovers_pairs() {
        let e = toy(&[b"bc", b"ab", b"abc"]);
        assert_eq!(
            e.derive_merges().unwrap(),
            vec![(98, 99), (97, 98), (97, 256)]
        );
    }
}
