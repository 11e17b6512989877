//! BPE training: count pre-tokenized pieces (in parallel), then merge greedily.
//!
//! Semantics (the Python reference `smallgpt.reference_bpe.train` is the specification):
//! - ids 0..=255 are the bytes; merge k creates id 256 + k.
//! - the count of a pair is the number of adjacent occurrences over all pieces, weighted by
//!   piece counts (overlapping occurrences such as the two `aa` in `aaa` both count);
//! - each step takes the pair with the highest count, ties going to the smallest
//!   `(left_id, right_id)`; a pair whose concatenated bytes are already a token, or longer
//!   than `max_token_length` (by default the encoder's limit, 65535 bytes), is never taken
//!   (it gets no id; the encoder, which works on byte strings, still joins such neighbours
//!   into the existing token);
//! - merging replaces occurrences left to right, without overlap;
//! - training stops after `num_merges` merges or when the best pair occurs fewer than
//!   `min_frequency` times.
//!
//! Counts depend only on the multiset of pieces, and ties are broken by ids, so the result
//! does not depend on threads, chunking or hash order.

use std::cell::RefCell;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use rustc_hash::{FxHashMap, FxHashSet};

use crate::encoder::{pack_hot, prefetch, unpack_hot, HOT_LEN, MAX_TOKENS, MAX_TOKEN_LEN};
use crate::error::{Error, Result};
use crate::pretokenize::Pretokenizer;

/// Target size of the chunks a large text is cut into for parallel counting.
const CHUNK_BYTES: usize = 1 << 20;

/// How to treat invalid UTF-8 in files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Utf8Errors {
    Strict,
    Replace,
}

/// Counts of distinct pieces. Pieces of up to 15 bytes (nearly all) are keyed by their bytes
/// packed in a u128: no key allocation, no pointer to follow and no byte comparison per
/// lookup (where a map of byte strings spends its time), and a third of the memory.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct PieceCounts {
    short: FxHashMap<u128, u64>,
    long: FxHashMap<Vec<u8>, u64>,
}

impl PieceCounts {
    /// Adds `n` occurrences of `piece`.
    #[inline]
    pub fn add(&mut self, piece: &[u8], n: u64) {
        if piece.len() <= HOT_LEN {
            *self.short.entry(pack_hot(piece)).or_insert(0) += n;
        } else if let Some(c) = self.long.get_mut(piece) {
            *c += n;
        } else {
            self.long.insert(piece.to_vec(), n);
        }
    }

    fn add_text(&mut self, pretok: &Pretokenizer, text: &str) -> Result<()> {
        pretok.for_each_piece(text, |p| self.add(p.as_bytes(), 1))
    }

    /// Adds all of `other`'s counts (walking the smaller of the two maps).
    pub fn merge(&mut self, mut other: PieceCounts) {
        if self.len() < other.len() {
            std::mem::swap(self, &mut other);
        }
        for (k, c) in other.short {
            *self.short.entry(k).or_insert(0) += c;
        }
        for (k, c) in other.long {
            *self.long.entry(k).or_insert(0) += c;
        }
    }

    /// Number of distinct pieces.
    pub fn len(&self) -> usize {
        self.short.len() + self.long.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Calls `f(bytes, count)` for every distinct piece, in no particular order.
    pub fn for_each(&self, mut f: impl FnMut(&[u8], u64)) {
        for (&k, &c) in &self.short {
            let (bytes, n) = unpack_hot(k);
            f(&bytes[..n], c);
        }
        for (k, &c) in &self.long {
            f(k, c);
        }
    }

    /// The count of one piece (0 if never seen).
    pub fn get(&self, piece: &[u8]) -> u64 {
        if piece.len() <= HOT_LEN {
            self.short.get(&pack_hot(piece)).copied().unwrap_or(0)
        } else {
            self.long.get(piece).copied().unwrap_or(0)
        }
    }
}

fn merge_counts(mut a: PieceCounts, b: PieceCounts) -> PieceCounts {
    a.merge(b);
    a
}

/// The chunks of one document that can be pre-tokenized independently.
fn chunks<'t>(pretok: &Pretokenizer, text: &'t str) -> Vec<&'t str> {
    let mut out = Vec::new();
    let mut start = 0;
    for cut in pretok.split_points(text, CHUNK_BYTES) {
        out.push(&text[start..cut]);
        start = cut;
    }
    out.push(&text[start..]);
    out
}

/// Counts the pieces of each document in parallel (large documents are cut at safe points).
pub fn count_texts<S: AsRef<str> + Sync>(
    pretok: &Pretokenizer,
    texts: &[S],
) -> Result<PieceCounts> {
    let parts: Vec<&str> = texts
        .iter()
        .flat_map(|t| chunks(pretok, t.as_ref()))
        .collect();
    parts
        .par_iter()
        .try_fold(PieceCounts::default, |mut acc, t| {
            acc.add_text(pretok, t)?;
            Ok(acc)
        })
        .try_reduce(PieceCounts::default, |a, b| Ok(merge_counts(a, b)))
}

/// Reads a whole file as text, each file being one document.
pub fn read_text(path: &Path, errors: Utf8Errors) -> Result<String> {
    let file = crate::corpus::open_text(path, errors)?;
    Ok(file.text)
}

/// Counts the pieces of files, each file being one document, reading and splitting in Rust.
///
/// Files are read one at a time and their chunks counted in parallel into one map
/// per thread that lives across files, so the maps are merged once at the end instead of
/// once per file.
pub fn count_files(
    pretok: &Pretokenizer,
    paths: &[PathBuf],
    errors: Utf8Errors,
) -> Result<PieceCounts> {
    // Missing files are reported before any work starts.
    for p in paths {
        if !p.exists() {
            return Err(Error::NotFound(p.clone()));
        }
    }
    let locals: thread_local::ThreadLocal<RefCell<PieceCounts>> = thread_local::ThreadLocal::new();
    for p in paths {
        let file = crate::corpus::open_text(p, errors)?;
        chunks(pretok, &file.text)
            .par_iter()
            .try_for_each(|t| locals.get_or_default().borrow_mut().add_text(pretok, t))?;
    }
    Ok(locals
        .into_iter()
        .map(RefCell::into_inner)
        .fold(PieceCounts::default(), merge_counts))
}

/// A pair's weighted count and the words holding it (stale entries allowed: checked when
/// used). One map for both: one lookup per change, and less memory than two maps.
#[derive(Default)]
struct PairInfo {
    count: i64,
    words: WordList,
}

type Pairs = FxHashMap<Pair, PairInfo>;

/// Removes `c` occurrences of a pair. A pair whose count reaches zero occurs nowhere any
/// more: it leaves the map with its (all stale) word list, which keeps memory flat over a
/// long training.
#[inline]
fn lose(pairs: &mut Pairs, q: Pair, c: i64) {
    if let Some(e) = pairs.get_mut(&q) {
        e.count -= c;
        if e.count == 0 {
            pairs.remove(&q);
        }
    }
}

/// Adds `c` occurrences of a pair in word `wi`, noting that it grew (it needs a fresh heap
/// entry).
#[inline]
fn gain(pairs: &mut Pairs, grown: &mut Vec<Pair>, q: Pair, c: i64, wi: u32) {
    let e = pairs.entry(q).or_default();
    e.count += c;
    if e.words.last() != Some(&wi) {
        e.words.push(wi);
    }
    grown.push(q);
}

/// Options of the merge loop.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    pub num_merges: usize,
    pub min_frequency: u64,
    pub max_token_length: Option<usize>,
}

/// Every piece as a sequence of token ids, all in one arena: merging only ever shortens a
/// word, so each keeps its slot, and the words a merge visits are read from one block of
/// memory instead of a heap allocation each.
struct Words {
    syms: Vec<u32>,
    meta: Vec<WordMeta>,
}

/// Where a word lives in the arena, its count, and the last merge step that rewrote it.
/// One record per word, so a merge that visits a word takes one cache miss for all of it.
#[derive(Clone, Copy)]
struct WordMeta {
    count: u64,
    start: u32,
    len: u32,
    touched: u32,
}

impl Words {
    fn ids(&self, w: usize) -> &[u32] {
        let m = self.meta[w];
        &self.syms[m.start as usize..(m.start + m.len) as usize]
    }

    /// Asks the cache for what visiting word `w` will read: its record now, and its ids once
    /// the record is likely in (`ahead` occurrences later). The words of a pair are spread
    /// over the whole arena, so without this every visit waits on memory twice.
    #[inline(always)]
    fn prefetch(&self, list: &[u32], i: usize) {
        if let Some(&w) = list.get(i + 16) {
            prefetch(self.meta.as_ptr().wrapping_add(w as usize));
        }
        if let Some(&w) = list.get(i + 8) {
            let m = &self.meta[w as usize];
            prefetch(self.syms.as_ptr().wrapping_add(m.start as usize));
        }
    }
}

type Pair = (u32, u32);

/// The words holding a pair. Most pairs a merge creates occur in one or two words: four
/// fit inline (the list is as big as a `Vec`), so those need no heap allocation.
type WordList = smallvec::SmallVec<[u32; 4]>;

/// Learns up to `opts.num_merges` merges from piece counts. `progress` is called after each
/// merge with the number done so far.
///
/// Fails (before any large allocation) when `num_merges` would make more tokens than an
/// encoder holds, when `max_token_length` exceeds [`MAX_TOKEN_LEN`], or when the distinct
/// pieces exceed the arena's 32-bit offsets. Without a `max_token_length`, tokens stop at
/// [`MAX_TOKEN_LEN`] bytes, so every result can be loaded by the encoder.
pub fn train(
    counts: PieceCounts,
    opts: &TrainOptions,
    mut progress: impl FnMut(usize),
) -> Result<Vec<Pair>> {
    let max_len = opts.check()?;
    let mut words = build_words(counts)?;
    let mut pairs = count_pairs(&words);
    // Pairs below `min_frequency` can never be chosen while they stay there, so they get no
    // heap entry (most pairs a merge creates occur once); a pair only grows when a merge
    // creates more of it, and it is pushed then. That keeps the lazy heap several times
    // smaller.
    let min_count = opts.min_frequency.max(1);
    let mut heap: BinaryHeap<(u64, Reverse<Pair>)> = pairs
        .iter()
        .filter(|(_, e)| e.count as u64 >= min_count)
        .map(|(&p, e)| (e.count as u64, Reverse(p)))
        .collect();
    let mut vocab = Vocab::new(max_len);
    // Grown as merges are made: `num_merges` is a caller's upper bound, not a size.
    let mut merges: Vec<Pair> = Vec::new();
    let mut grown: Vec<Pair> = Vec::new();

    while merges.len() < opts.num_merges {
        let Some((pair, count, bytes)) = vocab.pop_best(&mut heap, &pairs, min_count) else {
            break;
        };
        if count < opts.min_frequency {
            break;
        }
        let step = merges.len() as u32;
        merges.push(pair);
        vocab.add(bytes);
        grown.clear();
        merge_pair(&mut words, &mut pairs, &mut grown, pair, 256 + step, step);
        grown.sort_unstable();
        grown.dedup();
        for &q in &grown {
            if let Some(cnt) = pairs.get(&q).map(|e| e.count) {
                if cnt as u64 >= min_count {
                    heap.push((cnt as u64, Reverse(q)));
                }
            }
        }
        progress(merges.len());
    }
    Ok(merges)
}

impl TrainOptions {
    /// Checks the options against what an encoder can hold; returns the longest token
    /// allowed.
    fn check(&self) -> Result<usize> {
        if self.num_merges > MAX_TOKENS - 256 {
            return Err(Error::Value(format!(
                "{} merges asked for; a vocabulary holds at most {} (ids are 32-bit)",
                self.num_merges,
                MAX_TOKENS - 256
            )));
        }
        match self.max_token_length {
            Some(m) if m > MAX_TOKEN_LEN => Err(Error::Value(format!(
                "max_token_length {m} is over the {MAX_TOKEN_LEN} bytes a token can have"
            ))),
            Some(m) => Ok(m),
            None => Ok(MAX_TOKEN_LEN),
        }
    }
}

/// The arena of words, sorted for locality. Word order does not change the merges (counts
/// are sums, ties go by pair ids), but it matters for speed: words sorted by their first
/// bytes keep the words a merge touches close together in memory. A sort on an 8-byte
/// prefix key gets most of that for a fraction of the cost of sorting the byte strings.
fn build_words(counts: PieceCounts) -> Result<Words> {
    let mut bytes: Vec<u8> = Vec::new();
    let mut entries: Vec<(u64, usize, u32, u64)> = Vec::with_capacity(counts.len());
    let mut too_big = false;
    counts.for_each(|k, c| {
        // Checked as it grows: the arena's offsets are u32.
        if too_big || bytes.len() + k.len() >= u32::MAX as usize {
            too_big = true;
            return;
        }
        let mut key = [0u8; 8];
        let n = k.len().min(8);
        key[..n].copy_from_slice(&k[..n]);
        entries.push((u64::from_be_bytes(key), bytes.len(), k.len() as u32, c));
        bytes.extend_from_slice(k);
    });
    if too_big {
        return Err(Error::Value(
            "the distinct pre-tokenized pieces add up to 4 GiB or more, more than training \
             supports; train on a sample of the corpus"
                .into(),
        ));
    }
    // The counts are no longer needed: free them before the pair structures are built.
    drop(counts);
    entries.par_sort_unstable_by_key(|e| e.0);
    let mut words = Words {
        syms: Vec::with_capacity(bytes.len()),
        meta: Vec::with_capacity(entries.len()),
    };
    for (_, at, n, c) in entries {
        words.meta.push(WordMeta {
            count: c,
            start: words.syms.len() as u32,
            len: n,
            touched: u32::MAX,
        });
        let k = &bytes[at..at + n as usize];
        words.syms.extend(k.iter().map(|&b| b as u32));
    }
    Ok(words)
}

/// Every adjacent pair of every word, with its weighted count and the words holding it.
fn count_pairs(words: &Words) -> Pairs {
    let mut pairs: Pairs = FxHashMap::default();
    for wi in 0..words.meta.len() {
        let c = words.meta[wi].count as i64;
        for p in words.ids(wi).windows(2) {
            let e = pairs.entry((p[0], p[1])).or_default();
            e.count += c;
            if e.words.last() != Some(&(wi as u32)) {
                e.words.push(wi as u32);
            }
        }
    }
    pairs
}

/// The bytes of the tokens made so far, and the pairs that may never be merged.
struct Vocab {
    token_bytes: Vec<Vec<u8>>,
    existing: FxHashSet<Vec<u8>>,
    banned: FxHashSet<Pair>,
    max_len: usize,
}

impl Vocab {
    fn new(max_len: usize) -> Self {
        let token_bytes: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
        let existing = token_bytes.iter().cloned().collect();
        Vocab {
            token_bytes,
            existing,
            banned: FxHashSet::default(),
            max_len,
        }
    }

    /// Pops heap entries until the top one is current and allowed: its pair, count and
    /// the bytes of the token it makes.
    fn pop_best(
        &mut self,
        heap: &mut BinaryHeap<(u64, Reverse<Pair>)>,
        pairs: &Pairs,
        min_count: u64,
    ) -> Option<(Pair, u64, Vec<u8>)> {
        loop {
            let (c, Reverse(pair)) = heap.pop()?;
            if self.banned.contains(&pair) {
                continue;
            }
            let cur = pairs.get(&pair).map_or(0, |e| e.count);
            if cur as u64 != c {
                if cur as u64 >= min_count {
                    heap.push((cur as u64, Reverse(pair)));
                }
                continue;
            }
            let (l, r) = (
                &self.token_bytes[pair.0 as usize],
                &self.token_bytes[pair.1 as usize],
            );
            if l.len() + r.len() > self.max_len {
                self.banned.insert(pair);
                continue;
            }
            let mut bytes = l.clone();
            bytes.extend_from_slice(r);
            if self.existing.contains(&bytes) {
                self.banned.insert(pair);
                continue;
            }
            return Some((pair, c, bytes));
        }
    }

    fn add(&mut self, bytes: Vec<u8>) {
        self.existing.insert(bytes.clone());
        self.token_bytes.push(bytes);
    }
}

/// Replaces every occurrence of `pair` by `new_id` in the words holding it, updating in
/// place only the pairs around each merge site (no per-word allocation, no rehashing of
/// the word's other pairs). Pairs that gained occurrences are appended to `grown`.
fn merge_pair(
    words: &mut Words,
    pairs: &mut Pairs,
    grown: &mut Vec<Pair>,
    pair: Pair,
    new_id: u32,
    step: u32,
) {
    // Greedy left-to-right merging leaves no occurrence of the pair.
    let occurrences = pairs.remove(&pair).map(|e| e.words).unwrap_or_default();
    for (i, &wi) in occurrences.iter().enumerate() {
        words.prefetch(&occurrences, i);
        let m = &mut words.meta[wi as usize];
        if m.touched == step {
            continue;
        }
        m.touched = step;
        let c = m.count as i64;
        let (s0, n0) = (m.start as usize, m.len as usize);
        let ids = &mut words.syms[s0..s0 + n0];
        let (a, b) = pair;
        let mut read = 0;
        let mut write = 0;
        let mut hit = false;
        while read < ids.len() {
            if read + 1 < ids.len() && ids[read] == a && ids[read + 1] == b {
                hit = true;
                if write > 0 {
                    // The left neighbour (possibly a token made earlier in this word).
                    let prev = ids[write - 1];
                    lose(pairs, (prev, a), c);
                    gain(pairs, grown, (prev, new_id), c, wi);
                }
                if read + 2 < ids.len() {
                    let next = ids[read + 2];
                    lose(pairs, (b, next), c);
                    gain(pairs, grown, (new_id, next), c, wi);
                }
                ids[write] = new_id;
                read += 2;
            } else {
                ids[write] = ids[read];
                read += 1;
            }
            write += 1;
        }
        if !hit {
            continue; // a stale occurrence: the pair left this word earlier
        }
        words.meta[wi as usize].len = write as u32;
    }
    // The changes above count (prev, a) and (b, next) as lost even when prev or next
    // is itself a merge site of this step (a pair like (X, a) whose a was merged too);
    // the gains and losses of such pairs cancel exactly, so the net counts are right.
    pairs.remove(&pair);
}

/// The byte strings of the tokens that `merges` create (ids 256..).
pub fn merge_bytes(merges: &[Pair]) -> Result<Vec<Vec<u8>>> {
    let mut tokens: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
    for (k, &(l, r)) in merges.iter().enumerate() {
        let id = 256 + k;
        if l as usize >= id || r as usize >= id {
            return Err(Error::InvalidVocab(format!(
                "merge {k} ({l}, {r}) uses an id that does not exist yet"
            )));
        }
        let mut b = tokens[l as usize].clone();
        b.extend_from_slice(&tokens[r as usize]);
        tokens.push(b);
    }
    Ok(tokens)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts_of(pretok: &Pretokenizer, texts: &[&str]) -> PieceCounts {
        count_texts(pretok, texts).unwrap()
    }

    #[test]
    fn merges_most_frequent_pair_with_id_tie_break() {
        let p = Pretokenizer::new("gpt2").unwrap();
        let c = counts_of(&p, &["ab ab ab cd cd cd"]);
        let opts = TrainOptions {
            num_merges: 2,
            min_frequency: 2,
            max_token_length: None,
        };
        let m = train(c.clone(), &opts, |_| {}).unwrap();
        // Pieces "ab", " ab" x2, " cd" x3: (97,98), (32,99) and (99,100) all count 3; the
        // smallest pair wins. Then " c" (256) + d and a + b tie at 3 again.
        assert_eq!(m, vec![(32, 99), (97, 98)]);
    }

    #[test]
    fn overlapping_pairs_count_but_merge_left_to_right() {
        let p = Pretokenizer::new("gpt2").unwrap();
        let c = counts_of(&p, &["aaa"]);
        let opts = TrainOptions {
            num_merges: 5,
            min_frequency: 1,
            max_token_length: None,
        };
        let m = train(c.clone(), &opts, |_| {}).unwrap();
        assert_eq!(m, vec![(97, 97), (256, 97)]);
    }

    #[test]
    fn min_frequency_stops_training() {
        let p = Pretokenizer::new("gpt2").unwrap();
        let c = counts_of(&p, &["abcdef"]);
        let opts = TrainOptions {
            num_merges: 10,
            min_frequency: 2,
            max_token_length: None,
        };
        assert!(train(c.clone(), &opts, |_| {}).unwrap().is_empty());
    }

    #[test]
    fn no_duplicate_token_bytes() {
        let p = Pretokenizer::new("gpt2").unwrap();
        let texts = ["abc abc abc bc bc bc bc xab xab", "aabcabcbcabc"];
        let c = counts_of(&p, &texts);
        let opts = TrainOptions {
            num_merges: 50,
            min_frequency: 1,
            max_token_length: None,
        };
        let m = train(c.clone(), &opts, |_| {}).unwrap();
        let tokens = merge_bytes(&m).unwrap();
        let set: FxHashSet<_> = tokens.iter().collect();
        assert_eq!(set.len(), tokens.len());
    }

    #[test]
    fn result_independent_of_chunking_and_threads() {
        let p = Pretokenizer::new("cl100k").unwrap();
        let text = "The quick brown fox.\nJumps over the lazy dog!\n".repeat(200);
        let one = counts_of(&p, &[text.as_str()]);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let serial = pool.install(|| counts_of(&p, &[text.as_str()]));
        assert_eq!(one, serial);
        let opts = TrainOptions {
            num_merges: 40,
            min_frequency: 2,
            max_token_length: Some(6),
        };
        assert_eq!(
            train(one.clone(), &opts, |_| {}).unwrap(),
            train(serial.clone(), &opts, |_| {}).unwrap()
        );
        assert!(merge_bytes(&train(one.clone(), &opts, |_| {}).unwrap())
            .unwrap()
            .iter()
            .all(|t| t.len() <= 6));
    }

    #[test]
    fn impossible_options_are_errors_not_aborts() {
        let p = Pretokenizer::new("gpt2").unwrap();
        let c = counts_of(&p, &["ab ab"]);
        let mut opts = TrainOptions {
            num_merges: 1 << 40,
            min_frequency: 1,
            max_token_length: None,
        };
        assert!(matches!(
            train(c.clone(), &opts, |_| {}),
            Err(Error::Value(_))
        ));
        opts.num_merges = 10;
        opts.max_token_length = Some(MAX_TOKEN_LEN + 1);
        assert!(matches!(
            train(c.clone(), &opts, |_| {}),
            Err(Error::Value(_))
        ));
        // The largest number of merges is accepted, and only as many as exist are made.
        opts.num_merges = MAX_TOKENS - 256;
        opts.max_token_length = None;
        assert_eq!(train(c, &opts, |_| {}).unwrap().len(), 2);
    }

    #[test]
    fn tokens_stay_within_the_encoder_limit_by_default() {
        let p = Pretokenizer::new("gpt2").unwrap();
        let text = "a".repeat(200_000);
        let c = counts_of(&p, &[text.as_str()]);
        let opts = TrainOptions {
            num_merges: 100,
            min_frequency: 1,
            max_token_length: None,
        };
        let tokens = merge_bytes(&train(c, &opts, |_| {}).unwrap()).unwrap();
        assert!(tokens.iter().any(|t| t.len() > MAX_TOKEN_LEN / 2));
        assert!(tokens.iter().all(|t| t.len() <= MAX_TOKEN_LEN));
    }
}
