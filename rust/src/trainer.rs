//! BPE training: count pre-tokenized pieces (in parallel), then merge greedily.
//!
//! Semantics (the Python reference `smallgpt.reference_bpe.train` is the specification):
//! - ids 0..=255 are the bytes; merge k creates id 256 + k.
//! - the count of a pair is the number of adjacent occurrences over all pieces, weighted by
//!   piece counts (overlapping occurrences such as the two `aa` in `aaa` both count);
//! - each step takes the pair with the highest count, ties going to the smallest
//!   `(left_id, right_id)`; a pair whose concatenated bytes are already a token, or longer
//!   than `max_token_length`, is never taken (it gets no id; the encoder, which works on byte
//!   strings, still joins such neighbours into the existing token);
//! - merging replaces occurrences left to right, without overlap;
//! - training stops after `num_merges` merges or when the best pair occurs fewer than
//!   `min_frequency` times.
//!
//! Counts depend only on the multiset of pieces, and ties are broken by ids, so the result
//! does not depend on threads, chunking or hash order.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use rustc_hash::{FxHashMap, FxHashSet};

use crate::error::{Error, Result};
use crate::pretokenize::Pretokenizer;

/// Piece counts. Keys are the UTF-8 bytes of pieces.
pub type PieceCounts = FxHashMap<Vec<u8>, u64>;

/// Target size of the chunks a large text is cut into for parallel counting.
const CHUNK_BYTES: usize = 1 << 20;

/// How to treat invalid UTF-8 in files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Utf8Errors {
    Strict,
    Replace,
}

fn count_into(pretok: &Pretokenizer, text: &str, counts: &mut PieceCounts) -> Result<()> {
    pretok.for_each_piece(text, |p| {
        if let Some(c) = counts.get_mut(p.as_bytes()) {
            *c += 1;
        } else {
            counts.insert(p.as_bytes().to_vec(), 1);
        }
    })
}

fn merge_counts(mut a: PieceCounts, mut b: PieceCounts) -> PieceCounts {
    if a.len() < b.len() {
        std::mem::swap(&mut a, &mut b);
    }
    for (k, v) in b {
        *a.entry(k).or_insert(0) += v;
    }
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
            count_into(pretok, t, &mut acc)?;
            Ok(acc)
        })
        .try_reduce(PieceCounts::default, |a, b| Ok(merge_counts(a, b)))
}

/// Reads a whole file as text (memory-mapped), each file being one document.
pub fn read_text(path: &Path, errors: Utf8Errors) -> Result<String> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    if len == 0 {
        return Ok(String::new());
    }
    // SAFETY: the map is read-only and only lives in this function; a file truncated by
    // another process meanwhile is outside what we guard against (as in every mmap reader).
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    match std::str::from_utf8(&map) {
        Ok(s) => Ok(s.to_owned()),
        Err(e) => match errors {
            Utf8Errors::Strict => Err(Error::InvalidUtf8 {
                path: path.to_path_buf(),
                offset: e.valid_up_to(),
            }),
            Utf8Errors::Replace => Ok(String::from_utf8_lossy(&map).into_owned()),
        },
    }
}

/// Counts the pieces of files, each file being one document, reading and splitting in Rust.
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
    let mut total = PieceCounts::default();
    for p in paths {
        let text = read_text(p, errors)?;
        total = merge_counts(total, count_texts(pretok, &[text])?);
    }
    Ok(total)
}

/// Options of the merge loop.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    pub num_merges: usize,
    pub min_frequency: u64,
    pub max_token_length: Option<usize>,
}

/// A piece as a sequence of token ids, with its count.
struct Word {
    ids: Vec<u32>,
    count: u64,
}

type Pair = (u32, u32);

/// Learns up to `opts.num_merges` merges from piece counts. `progress` is called after each
/// merge with the number done so far.
pub fn train(
    counts: &PieceCounts,
    opts: &TrainOptions,
    mut progress: impl FnMut(usize),
) -> Vec<Pair> {
    // Sorting makes the word order (and so every internal list) deterministic.
    let mut entries: Vec<(&Vec<u8>, &u64)> = counts.iter().collect();
    entries.sort_unstable();
    let mut words: Vec<Word> = entries
        .into_iter()
        .map(|(k, &c)| Word {
            ids: k.iter().map(|&b| b as u32).collect(),
            count: c,
        })
        .collect();

    let mut pair_counts: FxHashMap<Pair, i64> = FxHashMap::default();
    let mut where_: FxHashMap<Pair, Vec<u32>> = FxHashMap::default();
    for (wi, w) in words.iter().enumerate() {
        for p in w.ids.windows(2) {
            let pair = (p[0], p[1]);
            *pair_counts.entry(pair).or_insert(0) += w.count as i64;
            let list = where_.entry(pair).or_default();
            if list.last() != Some(&(wi as u32)) {
                list.push(wi as u32);
            }
        }
    }
    let mut heap: BinaryHeap<(u64, Reverse<Pair>)> = pair_counts
        .iter()
        .map(|(&p, &c)| (c as u64, Reverse(p)))
        .collect();

    let mut token_bytes: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
    let mut existing: FxHashSet<Vec<u8>> = token_bytes.iter().cloned().collect();
    let mut banned: FxHashSet<Pair> = FxHashSet::default();
    let mut merges: Vec<Pair> = Vec::with_capacity(opts.num_merges);
    let mut touched_at: Vec<usize> = vec![usize::MAX; words.len()];
    let mut deltas: FxHashMap<Pair, i64> = FxHashMap::default();

    while merges.len() < opts.num_merges {
        // Pop until the top entry is current and allowed.
        let best = loop {
            let Some((c, Reverse(pair))) = heap.pop() else {
                break None;
            };
            if banned.contains(&pair) {
                continue;
            }
            let cur = pair_counts.get(&pair).copied().unwrap_or(0);
            if cur as u64 != c {
                if cur > 0 {
                    heap.push((cur as u64, Reverse(pair)));
                }
                continue;
            }
            let mut bytes = token_bytes[pair.0 as usize].clone();
            bytes.extend_from_slice(&token_bytes[pair.1 as usize]);
            if existing.contains(&bytes) || opts.max_token_length.is_some_and(|m| bytes.len() > m) {
                banned.insert(pair);
                continue;
            }
            break Some((pair, c, bytes));
        };
        let Some((pair, count, bytes)) = best else {
            break;
        };
        if count < opts.min_frequency {
            break;
        }
        let step = merges.len();
        let new_id = 256 + step as u32;
        merges.push(pair);
        existing.insert(bytes.clone());
        token_bytes.push(bytes);

        deltas.clear();
        let occurrences = where_.remove(&pair).unwrap_or_default();
        for &wi in &occurrences {
            if touched_at[wi as usize] == step {
                continue;
            }
            touched_at[wi as usize] = step;
            let w = &mut words[wi as usize];
            if !w.ids.windows(2).any(|p| (p[0], p[1]) == pair) {
                continue; // stale occurrence
            }
            let c = w.count as i64;
            for p in w.ids.windows(2) {
                *deltas.entry((p[0], p[1])).or_insert(0) -= c;
            }
            let mut merged = Vec::with_capacity(w.ids.len());
            let mut i = 0;
            while i < w.ids.len() {
                if i + 1 < w.ids.len() && (w.ids[i], w.ids[i + 1]) == pair {
                    merged.push(new_id);
                    i += 2;
                } else {
                    merged.push(w.ids[i]);
                    i += 1;
                }
            }
            for p in merged.windows(2) {
                let q = (p[0], p[1]);
                *deltas.entry(q).or_insert(0) += c;
                if q.0 == new_id || q.1 == new_id {
                    let list = where_.entry(q).or_default();
                    if list.last() != Some(&wi) {
                        list.push(wi);
                    }
                }
            }
            w.ids = merged;
        }
        for (&q, &d) in deltas.iter() {
            if d == 0 {
                continue;
            }
            let e = pair_counts.entry(q).or_insert(0);
            *e += d;
            if *e > 0 && d > 0 {
                heap.push((*e as u64, Reverse(q)));
            }
            if *e == 0 {
                pair_counts.remove(&q);
            }
        }
        progress(merges.len());
    }
    merges
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
        let m = train(&c, &opts, |_| {});
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
        let m = train(&c, &opts, |_| {});
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
        assert!(train(&c, &opts, |_| {}).is_empty());
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
        let m = train(&c, &opts, |_| {});
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
        assert_eq!(train(&one, &opts, |_| {}), train(&serial, &opts, |_| {}));
        assert!(merge_bytes(&train(&one, &opts, |_| {}))
            .unwrap()
            .iter()
            .all(|t| t.len() <= 6));
    }
}
