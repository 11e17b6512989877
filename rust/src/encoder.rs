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

/// Pieces longer than this use the heap-based merge, which is O(n log n) instead of O(n^2);
/// for runs of CJK text the quadratic scan already costs more at a few dozen bytes.
const LONG_PIECE: usize = 64;
/// Longest piece kept in each thread's cache of merged pieces.
const CACHED_PIECE: usize = 32;
/// Entries of each thread's cache of merged pieces before it is cleared.
const CACHE_ENTRIES: usize = 1 << 16;

/// log2 of the number of slots in each thread's direct-mapped cache of short pieces.
const HOT_BITS: u32 = 13;

/// Per-thread memo of pieces that needed merging: natural text repeats the same few
/// thousand words, and a hash probe is much cheaper than re-running BPE on them.
type PieceMap = FxHashMap<Box<[u8]>, Box<[Rank]>>;

/// Pieces of up to this many bytes go through the per-thread direct-mapped cache.
pub(crate) const HOT_LEN: usize = 15;
const _: () = assert!(HOT_LEN < CACHED_PIECE && HOT_LEN <= LONG_PIECE);

/// One slot of the short-piece cache: a piece of at most `HOT_LEN` bytes (packed, see
/// [`pack_hot`]; never 0, so 0 marks an empty slot) and its ids, if there are at most three.
#[derive(Clone, Copy, Default)]
struct HotSlot {
    key: u128,
    n: u32,
    ids: [Rank; 3],
}

/// Each thread's caches. The short-piece cache is small enough to stay in L2: the full
/// vocabulary tables are megabytes, and a probe there is a cache miss, while the few
/// thousand words that make up most of any text keep hitting here.
struct Scratch {
    hot: Box<[HotSlot]>,
    pieces: PieceMap,
}

impl Default for Scratch {
    fn default() -> Self {
        Scratch {
            hot: vec![HotSlot::default(); 1 << HOT_BITS].into_boxed_slice(),
            pieces: PieceMap::default(),
        }
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
    /// ever join them (every part is a token), so BPE on each side is independent: long
    /// pieces are cut there, which keeps them linear (see `merge`).
    inner_pairs: Box<[u64]>,
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
        if tokens.len() > u32::MAX as usize / 2 {
            return Err(Error::InvalidVocab("too many tokens".into()));
        }
        let mut ranks = FxHashMap::default();
        ranks.reserve(tokens.len());
        for (id, t) in tokens.iter().enumerate() {
            if t.is_empty() {
                return Err(Error::InvalidVocab(format!("token {id} is empty")));
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
            (r != Rank::MAX).then_some(r)
        } else if bytes.len() <= 7 {
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
            let slot = &mut scratch.hot[hot_index(key)];
            if slot.key == key {
                // A loop of at most three pushes: `extend_from_slice` calls memcpy.
                for &id in &slot.ids[..slot.n as usize] {
                    out.push(id);
                }
                return;
            }
            let start = out.len();
            if let Some(id) = self.rank(piece) {
                out.push(id);
            } else if n == 1 {
                out.push(self.byte_ids[piece[0] as usize]);
            } else {
                self.merge(piece, out);
            }
            let ids = &out[start..];
            if ids.len() <= 3 {
                slot.key = key;
                slot.n = ids.len() as u32;
                slot.ids[..ids.len()].copy_from_slice(ids);
            }
        } else if let Some(&id) = self.ranks.get(piece) {
            out.push(id);
        } else if n > CACHED_PIECE {
            // Long pieces (runs of CJK text, identifiers) rarely repeat: caching them costs
            // more than it saves.
            self.merge(piece, out);
        } else {
            let cache = &mut scratch.pieces;
            if let Some(ids) = cache.get(piece) {
                out.extend_from_slice(ids);
                return;
            }
            let start = out.len();
            self.merge(piece, out);
            if cache.len() >= CACHE_ENTRIES {
                cache.clear();
            }
            cache.insert(piece.into(), out[start..].into());
        }
    }

    /// BPE on a piece of two or more bytes that is not itself a token.
    fn merge(&self, piece: &[u8], out: &mut Vec<Rank>) {
        if piece.len() <= LONG_PIECE {
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
                n if n <= LONG_PIECE => merge_short(|b| self.rank(b), seg, |r| out.push(r)),
                _ => merge_long(|b| self.rank(b), seg, |r| out.push(r)),
            }
            start = i;
        }
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

    fn encode_ordinary_into(&self, text: &str, out: &mut Vec<Rank>) -> Result<()> {
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
        if let Some(dis) = disallowed {
            self.check_disallowed(text, dis)?;
        }
        let mut out = Vec::with_capacity(text.len() / 4 + 1);
        let Some(special_regex) = self.special_regex.as_ref().filter(|_| !allowed.is_empty())
        else {
            self.encode_ordinary_into(text, &mut out)?;
            return Ok(out);
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
            self.encode_ordinary_into(&text[start..end], &mut out)?;
            match next {
                Some(m) => {
                    out.push(self.specials[m.as_str()]);
                    start = m.end();
                }
                None => return Ok(out),
            }
        }
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

/// The bytes [`pack_hot`] packed.
pub(crate) fn unpack_hot(key: u128) -> Vec<u8> {
    let (lo, hi) = (key as u64, (key >> 64) as u64);
    if hi == 0 {
        let n = (lo >> 56) as usize;
        lo.to_le_bytes()[..n].to_vec()
    } else {
        let n = ((hi >> 56) & 0x7F) as usize;
        let mut out = lo.to_le_bytes().to_vec();
        out.extend_from_slice(&hi.to_le_bytes()[..n]);
        out
    }
}

/// Slot of a packed piece in the per-thread cache (Fibonacci hashing of both halves).
#[inline]
fn hot_index(key: u128) -> usize {
    let h = (key as u64 ^ ((key >> 64) as u64).rotate_left(29)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (h >> (64 - HOT_BITS)) as usize
}

/// BPE on a piece of 2 to `LONG_PIECE` bytes: O(n^2) in the worst case but with tiny
/// constants. Calls `emit(rank)` for each final part.
fn merge_short(rank: impl Fn(&[u8]) -> Option<Rank>, piece: &[u8], mut emit: impl FnMut(Rank)) {
    let rank_of = |s: usize, e: usize| rank(&piece[s..e]).unwrap_or(Rank::MAX);
    // bounds[i]..bounds[i+1] is part i; pair_rank[i] is the rank of parts i and i+1 joined.
    // Fixed arrays on the stack: this runs once per uncached piece, and two heap
    // allocations per call were a visible share of the time.
    debug_assert!(piece.len() >= 2 && piece.len() <= LONG_PIECE);
    let mut bounds = [0u8; LONG_PIECE + 1];
    let mut pair_rank = [Rank::MAX; LONG_PIECE];
    let mut parts = piece.len();
    for (i, b) in bounds.iter_mut().enumerate().take(parts + 1) {
        *b = i as u8;
    }
    for (i, r) in pair_rank.iter_mut().enumerate().take(parts - 1) {
        *r = rank_of(i, i + 2);
    }
    loop {
        let mut best = Rank::MAX;
        let mut at = usize::MAX;
        for (i, &r) in pair_rank[..parts - 1].iter().enumerate() {
            if r < best {
                best = r;
                at = i;
            }
        }
        if best == Rank::MAX {
            break;
        }
        bounds.copy_within(at + 2..=parts, at + 1);
        pair_rank.copy_within(at + 1..parts - 1, at);
        parts -= 1;
        let b = |k: usize| bounds[k] as usize;
        if at + 1 < parts {
            pair_rank[at] = rank_of(b(at), b(at + 2));
        }
        if at > 0 {
            pair_rank[at - 1] = rank_of(b(at - 1), b(at + 1));
        }
    }
    for w in bounds[..=parts].windows(2) {
        // A final part is a single byte or a merged token, so it always has a rank.
        emit(rank(&piece[w[0] as usize..w[1] as usize]).unwrap_or(Rank::MAX));
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
    // end[s]: end of the part starting at s; prev[s]: start of the part before it.
    let mut end: Vec<u32> = (1..=n as u32).collect();
    let mut prev: Vec<u32> = (0..n as u32).map(|i| i.wrapping_sub(1)).collect();
    let mut pair_rank: Vec<Rank> = (0..n)
        .map(|i| {
            if i + 1 < n {
                rank_of(i, i + 2)
            } else {
                Rank::MAX
            }
        })
        .collect();
    let mut buckets: FxHashMap<Rank, Vec<u32>> = FxHashMap::default();
    let mut queue: BinaryHeap<Reverse<Rank>> = BinaryHeap::new();
    let enqueue = |buckets: &mut FxHashMap<Rank, Vec<u32>>,
                   queue: &mut BinaryHeap<Reverse<Rank>>,
                   r: Rank,
                   s: usize| {
        buckets
            .entry(r)
            .or_insert_with(|| {
                queue.push(Reverse(r));
                Vec::new()
            })
            .push(s as u32);
    };
    for (s, &r) in pair_rank.iter().enumerate() {
        if r != Rank::MAX {
            enqueue(&mut buckets, &mut queue, r, s);
        }
    }
    while let Some(Reverse(r)) = queue.pop() {
        let Some(mut list) = buckets.remove(&r) else {
            continue;
        };
        sort_positions(&mut list);
        let mut k = 0;
        while k < list.len() {
            let s = list[k] as usize;
            k += 1;
            if pair_rank[s] != r {
                continue; // stale: the part or its neighbour changed
            }
            // Join the part at s with the next one.
            let mid = end[s] as usize;
            let e = end[mid] as usize;
            end[s] = e as u32;
            pair_rank[mid] = Rank::MAX;
            if e < n {
                prev[e] = s as u32;
            }
            let mut lower = false;
            pair_rank[s] = if e < n {
                rank_of(s, end[e] as usize)
            } else {
                Rank::MAX
            };
            if pair_rank[s] != Rank::MAX {
                lower |= pair_rank[s] < r;
                enqueue(&mut buckets, &mut queue, pair_rank[s], s);
            }
            if s > 0 {
                let p = prev[s] as usize;
                pair_rank[p] = rank_of(p, e);
                if pair_rank[p] != Rank::MAX {
                    lower |= pair_rank[p] < r;
                    enqueue(&mut buckets, &mut queue, pair_rank[p], p);
                }
            }
            if lower {
                // A lower rank must go first: requeue what is left of this one.
                for &s in &list[k..] {
                    enqueue(&mut buckets, &mut queue, r, s as usize);
                }
                break;
            }
        }
    }
    let mut s = 0;
    while s < n {
        let e = end[s] as usize;
        emit(rank(&piece[s..e]).unwrap_or(Rank::MAX));
        s = e;
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
                assert_eq!(unpack_hot(pack_hot(b)), b, "{b:?}");
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
