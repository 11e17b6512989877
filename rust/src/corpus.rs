//! Corpus → token shards: read documents, encode them in parallel, write llm.c shards.
//!
//! Memory stays bounded: documents are streamed in segments of at most `SEGMENT_BYTES`
//! (large documents are cut where the named patterns provably give the same pieces), a batch
//! holds a few segments per thread, and a shard buffer holds at most `shard_tokens` tokens.
//! Output order is the input order whatever the number of threads.
//!
//! Shard format (llm.c / modded-nanogpt): 256 little-endian int32 header words
//! `[magic, version, n_tokens, 0, ...]`, then the tokens: magic 20240520 / version 1 / uint16,
//! or magic 20240801 / version 7 / uint32 for vocabularies over 65536 ids.

use std::borrow::Cow;
use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::TrySendError;
use std::time::Duration;

use rayon::prelude::*;

use crate::encoder::{Encoder, Rank};
use crate::error::{Error, Result};
use crate::trainer::Utf8Errors;

pub const HEADER_WORDS: usize = 256;
pub const MAGIC_U16: i32 = 20240520;
pub const VERSION_U16: i32 = 1;
pub const MAGIC_U32: i32 = 20240801;
pub const VERSION_U32: i32 = 7;

/// Largest piece of a document encoded as one unit.
const SEGMENT_BYTES: usize = 1 << 20;
/// How often the reading thread checks for an interrupt while it waits for the encoder.
const POLL: Duration = Duration::from_millis(20);
/// Text gathered before a parallel encoding round.
const BATCH_BYTES: usize = 8 << 20;

/// How a file is divided into documents.
#[derive(Debug, Clone)]
pub enum SourceKind {
    /// A text file: one document, or several split by a separator string.
    Text { separator: Option<String> },
    /// JSON lines: one document per line, taken from a string field.
    Jsonl { field: String },
}

#[derive(Debug, Clone)]
pub struct Source {
    pub path: PathBuf,
    pub kind: SourceKind,
}

/// Token width in the shards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    U16,
    U32,
}

impl Dtype {
    fn header(self) -> (i32, i32) {
        match self {
            Dtype::U16 => (MAGIC_U16, VERSION_U16),
            Dtype::U32 => (MAGIC_U32, VERSION_U32),
        }
    }
    fn max_vocab(self) -> usize {
        match self {
            Dtype::U16 => 1 << 16,
            Dtype::U32 => 1 << 32,
        }
    }
}

#[derive(Debug, Clone)]
pub struct ShardOptions {
    pub out_dir: PathBuf,
    pub val_fraction: f64,
    pub shard_tokens: usize,
    pub dtype: Dtype,
    pub errors: Utf8Errors,
}

/// Counts of one split.
#[derive(Debug, Clone, Default)]
pub struct SplitStats {
    pub documents: u64,
    pub tokens: u64,
    pub bytes: u64,
    pub shards: Vec<String>,
}

#[derive(Debug, Clone, Default)]
pub struct CorpusStats {
    pub train: SplitStats,
    pub val: SplitStats,
}

/// A file's contents, read into memory.
///
/// Files are read, not memory-mapped: a mapped file that another process truncates while it
/// is read kills the process with SIGBUS, and one rewritten in place would change text that
/// was already checked to be UTF-8. Reading costs one copy (a few percent of the encoding
/// time) and memory for the file being read.
pub(crate) struct FileText {
    pub(crate) text: String,
}

pub(crate) fn open_text(path: &Path, errors: Utf8Errors) -> Result<FileText> {
    // Checked before opening: opening a FIFO waits for a writer, and a directory or a
    // device does not read as a file.
    let kind = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if !kind.is_file() {
        let what = if kind.is_dir() {
            "is a directory"
        } else {
            "is not a regular file"
        };
        return Err(Error::Io {
            path: path.to_path_buf(),
            message: format!("{what}; only regular files are read"),
        });
    }
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    // A file truncated or rewritten while it was read may read as anything (zeros where a
    // truncation raced the read): such a read is refused rather than encoded.
    let after = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if after.len() != kind.len()
        || after.len() != bytes.len() as u64
        || after.modified().ok() != kind.modified().ok()
    {
        return Err(Error::Io {
            path: path.to_path_buf(),
            message: "changed while it was being read; run again once it no longer changes".into(),
        });
    }
    let text = match String::from_utf8(bytes) {
        Ok(s) => s,
        Err(e) => match errors {
            Utf8Errors::Strict => {
                return Err(Error::InvalidUtf8 {
                    path: path.to_path_buf(),
                    offset: e.utf8_error().valid_up_to(),
                })
            }
            Utf8Errors::Replace => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        },
    };
    Ok(FileText { text })
}

/// Calls `f` with each non-empty document of `source`, in order.
pub fn for_each_document(
    source: &Source,
    errors: Utf8Errors,
    mut f: impl FnMut(&str) -> Result<()>,
) -> Result<()> {
    let file = open_text(&source.path, errors)?;
    let text: &str = &file.text;
    match &source.kind {
        SourceKind::Text { separator: None } => {
            if !text.is_empty() {
                f(text)?;
            }
        }
        SourceKind::Text {
            separator: Some(sep),
        } => {
            for doc in text.split(sep.as_str()) {
                if !doc.is_empty() {
                    f(doc)?;
                }
            }
        }
        SourceKind::Jsonl { field } => {
            for_each_jsonl_document(&source.path, text, field, errors, f)?
        }
    }
    Ok(())
}

/// Calls `f` with the string `field` of each line of a JSON-lines text: a `null` (or empty)
/// field is an empty document and is dropped, as parquet nulls are; a missing or non-string
/// field is an error naming the line.
fn for_each_jsonl_document(
    path: &Path,
    text: &str,
    field: &str,
    errors: Utf8Errors,
    mut f: impl FnMut(&str) -> Result<()>,
) -> Result<()> {
    // A byte-order mark is no part of the first line's JSON.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    for (lineno, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |why: &str| Error::Value(format!("{}:{}: {why}", path.display(), lineno + 1));
        let value = parse_json_line(line, errors).map_err(|e| bad(&e))?;
        match value.get(field) {
            None => return Err(bad(&format!("no field {field:?}"))),
            Some(serde_json::Value::Null) => {}
            Some(serde_json::Value::String(doc)) => {
                if !doc.is_empty() {
                    f(doc)?;
                }
            }
            Some(_) => return Err(bad(&format!("field {field:?} is not a string"))),
        }
    }
    Ok(())
}

/// One JSON line's value. A `\uXXXX` escape of a lone surrogate is no Unicode character:
/// strict mode says so, replace mode reads it as U+FFFD (as invalid UTF-8 bytes are read).
fn parse_json_line(
    line: &str,
    errors: Utf8Errors,
) -> std::result::Result<serde_json::Value, String> {
    let e = match serde_json::from_str(line) {
        Ok(v) => return Ok(v),
        Err(e) => e,
    };
    let Cow::Owned(fixed) = replace_lone_surrogates(line) else {
        return Err(format!("invalid JSON ({e})"));
    };
    match errors {
        Utf8Errors::Strict => Err(
            "a \\u escape of a lone surrogate, which is not a Unicode character (pass \
             errors=\"replace\" to substitute U+FFFD)"
                .into(),
        ),
        Utf8Errors::Replace => {
            serde_json::from_str(&fixed).map_err(|e| format!("invalid JSON ({e})"))
        }
    }
}

/// `line` with every `\uXXXX` escape of a lone surrogate (one not in a high-low pair)
/// replaced by `\ufffd`; borrowed if there is none.
fn replace_lone_surrogates(line: &str) -> Cow<'_, str> {
    let b = line.as_bytes();
    let hex4 = |at: usize| -> Option<u32> {
        let s = std::str::from_utf8(b.get(at..at + 4)?).ok()?;
        u32::from_str_radix(s, 16).ok()
    };
    let escape_at = |at: usize| b.get(at) == Some(&b'\\') && b.get(at + 1) == Some(&b'u');
    let (high, low) = (0xD800..0xDC00, 0xDC00..0xE000);
    let mut out = String::new();
    let (mut last, mut i) = (0, 0);
    while i < b.len() {
        if b[i] != b'\\' {
            i += 1;
            continue;
        }
        // Other escapes (`\\` included) are two bytes long.
        let Some(u) = escape_at(i).then(|| hex4(i + 2)).flatten() else {
            i += 2;
            continue;
        };
        let paired =
            high.contains(&u) && escape_at(i + 6) && hex4(i + 8).is_some_and(|l| low.contains(&l));
        if paired {
            i += 12;
        } else if high.contains(&u) || low.contains(&u) {
            out.push_str(&line[last..i]);
            out.push_str("\\ufffd");
            i += 6;
            last = i;
        } else {
            i += 6;
        }
    }
    if last == 0 {
        return Cow::Borrowed(line);
    }
    out.push_str(&line[last..]);
    Cow::Owned(out)
}

/// Number of non-empty documents in all sources (the first pass, to place the val split).
pub fn count_documents(sources: &[Source], errors: Utf8Errors) -> Result<u64> {
    Ok(documents_per_source(sources, errors)?.iter().sum())
}

/// Number of non-empty documents in each source.
fn documents_per_source(sources: &[Source], errors: Utf8Errors) -> Result<Vec<u64>> {
    let mut counts = Vec::with_capacity(sources.len());
    for s in sources {
        if let SourceKind::Text { separator: None } = s.kind {
            // One document if non-empty: no need to read it (its UTF-8 is checked when it
            // is encoded, before any shard is renamed into place).
            let len = std::fs::metadata(&s.path)
                .map_err(|e| Error::io(&s.path, e))?
                .len();
            counts.push(u64::from(len > 0));
            continue;
        }
        let mut n = 0u64;
        for_each_document(s, errors, |_| {
            n += 1;
            Ok(())
        })?;
        counts.push(n);
    }
    Ok(counts)
}

/// The error for a source whose document count differs between the two passes.
fn changed_while_read(path: &Path, before: u64, now: u64) -> Error {
    Error::Io {
        path: path.to_path_buf(),
        message: format!(
            "changed while it was being read ({before} document(s) when counted, {now} when \
             encoded); run again once it no longer changes"
        ),
    }
}

/// A unit of encoding work: part of a document, owned so a batch can outlive its file.
struct Segment {
    text: String,
    starts_doc: bool,
    val: bool,
}

/// Writes consecutive shards of one split, streaming: tokens go to the open `.tmp` file as
/// they arrive (so the writing overlaps the encoding instead of coming all at the end), and
/// the header's token count is filled in when the shard is closed.
struct ShardWriter {
    dir: PathBuf,
    prefix: &'static str,
    dtype: Dtype,
    shard_tokens: usize,
    /// The shard being written: its temporary path, the file, and its token count so far.
    open: Option<(PathBuf, BufWriter<File>, usize)>,
    /// Reused buffer for the little-endian bytes of a run of tokens.
    bytes: Vec<u8>,
    /// (temporary path, final name) of each finished shard, in order.
    done: Vec<(PathBuf, String)>,
}

impl ShardWriter {
    fn new(dir: &Path, prefix: &'static str, opts: &ShardOptions) -> Self {
        ShardWriter {
            dir: dir.to_path_buf(),
            prefix,
            dtype: opts.dtype,
            shard_tokens: opts.shard_tokens,
            open: None,
            bytes: Vec::new(),
            done: Vec::new(),
        }
    }

    fn push(&mut self, tokens: &[Rank]) -> Result<()> {
        let mut rest = tokens;
        while !rest.is_empty() {
            if self.open.is_none() {
                let name = format!("{}_{:06}.bin", self.prefix, self.done.len());
                let tmp = self.dir.join(format!("{name}.tmp"));
                let file = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
                let mut w = BufWriter::with_capacity(1 << 20, file);
                // The count (word 2) is written when the shard is closed.
                let header = header_bytes(self.dtype, 0);
                w.write_all(&header).map_err(|e| Error::io(&tmp, e))?;
                self.open = Some((tmp, w, 0));
            }
            let (tmp, w, count) = self.open.as_mut().expect("a shard is open");
            let take = (self.shard_tokens - *count).min(rest.len());
            self.bytes.clear();
            match self.dtype {
                Dtype::U16 => {
                    for &t in &rest[..take] {
                        self.bytes.extend_from_slice(&(t as u16).to_le_bytes());
                    }
                }
                Dtype::U32 => {
                    for &t in &rest[..take] {
                        self.bytes.extend_from_slice(&t.to_le_bytes());
                    }
                }
            }
            w.write_all(&self.bytes).map_err(|e| Error::io(&*tmp, e))?;
            *count += take;
            rest = &rest[take..];
            if *count == self.shard_tokens {
                self.flush()?;
            }
        }
        Ok(())
    }

    /// Closes the open shard, if any: fills in its token count and syncs it to disk.
    fn flush(&mut self) -> Result<()> {
        let Some((tmp, w, count)) = self.open.take() else {
            return Ok(());
        };
        let finish = || -> std::io::Result<()> {
            let mut file = w.into_inner().map_err(|e| e.into_error())?;
            file.seek(SeekFrom::Start(8))?;
            file.write_all(&(count as i32).to_le_bytes())?;
            file.sync_all()
        };
        if let Err(e) = finish() {
            let _ = std::fs::remove_file(&tmp);
            return Err(Error::io(&tmp, e));
        }
        let name = format!("{}_{:06}.bin", self.prefix, self.done.len());
        self.done.push((tmp, name));
        Ok(())
    }
}

impl Drop for ShardWriter {
    /// A shard still open here belongs to a failed run: remove its temporary file.
    fn drop(&mut self) {
        if let Some((tmp, w, _)) = self.open.take() {
            drop(w);
            let _ = std::fs::remove_file(tmp);
        }
    }
}

/// The 256-word llm.c header for `n` tokens.
fn header_bytes(dtype: Dtype, n: i32) -> Vec<u8> {
    let (magic, version) = dtype.header();
    let mut header = [0i32; HEADER_WORDS];
    header[0] = magic;
    header[1] = version;
    header[2] = n;
    header.iter().flat_map(|h| h.to_le_bytes()).collect()
}

/// Tokenizes `sources` into shards in `opts.out_dir`. Shards are written as `*.tmp` and only
/// renamed when everything succeeded; `progress(bytes_done)` is called after each batch and
/// `interrupted()` is polled between batches and every few milliseconds while waiting for
/// the encoder (returning true aborts and removes the temps).
/// Encoding runs on `pool` (the global rayon pool if `None`); the loop itself, and so every
/// call of `interrupted`, stays on the calling thread.
pub fn tokenize_corpus(
    enc: &Encoder,
    eot: Rank,
    sources: &[Source],
    opts: &ShardOptions,
    pool: Option<&rayon::ThreadPool>,
    mut progress: impl FnMut(u64),
    interrupted: impl Fn() -> bool,
) -> Result<CorpusStats> {
    if enc.vocab_size() > opts.dtype.max_vocab() {
        return Err(Error::Value(format!(
            "vocabulary of {} ids does not fit in {:?} tokens",
            enc.vocab_size(),
            opts.dtype
        )));
    }
    if opts.shard_tokens == 0 || opts.shard_tokens > i32::MAX as usize {
        return Err(Error::Value(
            "shard_tokens must be between 1 and 2^31-1 (the header's count is an int32)".into(),
        ));
    }
    if !(0.0..1.0).contains(&opts.val_fraction) {
        return Err(Error::Value("val_fraction must be in [0, 1)".into()));
    }
    let per_source = documents_per_source(sources, opts.errors)?;
    let n_docs: u64 = per_source.iter().sum();
    if n_docs == 0 {
        return Err(Error::Value(
            "the corpus holds no (non-empty) document".into(),
        ));
    }
    let n_val = if opts.val_fraction == 0.0 || n_docs == 1 {
        0
    } else {
        ((n_docs as f64 * opts.val_fraction).ceil() as u64).clamp(1, n_docs - 1)
    };
    // A lone document is split by characters instead: val gets its last `val_fraction`.
    let split_single = n_docs == 1 && opts.val_fraction > 0.0;

    // Two stages overlap: this thread reads files and cuts segments (and polls
    // `interrupted`, which must stay on the calling thread) while a worker encodes the
    // previous batch on the pool and appends it to the shards. Batches travel in order
    // through a channel of one slot, so memory stays at about three batches.
    let done_bytes = AtomicU64::new(0);
    // Set when the reader sees an interrupt: the worker then stops at the next segment.
    let cancel = AtomicBool::new(false);
    let (result, train, val, mut stats) = std::thread::scope(|scope| {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<Segment>>(1);
        let (done_bytes, cancel) = (&done_bytes, &cancel);
        let worker = scope.spawn(move || {
            let mut train = ShardWriter::new(&opts.out_dir, "train", opts);
            let mut val = ShardWriter::new(&opts.out_dir, "val", opts);
            let mut stats = CorpusStats::default();
            let result = (|| -> Result<()> {
                for batch in rx {
                    let encode = || -> Result<Vec<Vec<Rank>>> {
                        batch
                            .par_iter()
                            .map(|s| {
                                if cancel.load(Relaxed) {
                                    return Err(Error::Interrupted);
                                }
                                enc.encode_ordinary(&s.text)
                            })
                            .collect()
                    };
                    let encoded = match pool {
                        Some(p) => p.install(encode)?,
                        None => encode()?,
                    };
                    for (seg, ids) in batch.iter().zip(encoded) {
                        let (writer, split) = if seg.val {
                            (&mut val, &mut stats.val)
                        } else {
                            (&mut train, &mut stats.train)
                        };
                        if seg.starts_doc {
                            writer.push(&[eot])?;
                            split.documents += 1;
                            split.tokens += 1;
                        }
                        writer.push(&ids)?;
                        split.tokens += ids.len() as u64;
                        split.bytes += seg.text.len() as u64;
                        done_bytes.fetch_add(seg.text.len() as u64, Relaxed);
                    }
                }
                train.flush()?;
                val.flush()
            })();
            (result, train, val, stats)
        });
        let read_result = (|| -> Result<()> {
            let mut batch: Vec<Segment> = Vec::new();
            let mut batch_bytes = 0usize;
            let mut doc_index = 0u64;
            let pretok = enc.pretokenizer();
            // Hands a full batch to the worker, polling for interrupts while it waits; a
            // closed channel means the worker failed, and its error is the one reported.
            let mut send = |batch: &mut Vec<Segment>| -> Result<()> {
                let mut pending = std::mem::take(batch);
                loop {
                    if interrupted() {
                        cancel.store(true, Relaxed);
                        return Err(Error::Interrupted);
                    }
                    progress(done_bytes.load(Relaxed));
                    match tx.try_send(pending) {
                        Ok(()) => return Ok(()),
                        Err(TrySendError::Full(b)) => {
                            pending = b;
                            std::thread::sleep(POLL);
                        }
                        Err(TrySendError::Disconnected(_)) => {
                            return Err(Error::Value("the encoding stage stopped".into()))
                        }
                    }
                }
            };
            // Adds a document (cut into segments at safe points), sending whenever the batch
            // is full, so neither a huge document nor a huge corpus is ever held whole.
            let mut add_doc = |doc: &str, val: bool, batch: &mut Vec<Segment>| -> Result<()> {
                let mut start = 0;
                for cut in pretok
                    .split_points(doc, SEGMENT_BYTES)
                    .into_iter()
                    .chain([doc.len()])
                {
                    batch.push(Segment {
                        text: doc[start..cut].to_owned(),
                        starts_doc: start == 0,
                        val,
                    });
                    batch_bytes += cut - start;
                    start = cut;
                    if batch_bytes >= BATCH_BYTES {
                        send(batch)?;
                        batch_bytes = 0;
                    }
                }
                Ok(())
            };
            for (source, &counted) in sources.iter().zip(&per_source) {
                let first = doc_index;
                for_each_document(source, opts.errors, |doc| {
                    if doc_index - first >= counted {
                        return Err(changed_while_read(&source.path, counted, counted + 1));
                    }
                    if split_single {
                        // nanoGPT's split: train = the first int(n * (1 - f)) characters.
                        let chars = doc.chars().count();
                        let keep = (chars as f64 * (1.0 - opts.val_fraction)) as usize;
                        let at = doc.char_indices().nth(keep).map_or(doc.len(), |(i, _)| i);
                        add_doc(&doc[..at], false, &mut batch)?;
                        if at < doc.len() {
                            add_doc(&doc[at..], true, &mut batch)?;
                        }
                    } else {
                        add_doc(doc, doc_index >= n_docs - n_val, &mut batch)?;
                    }
                    doc_index += 1;
                    Ok(())
                })?;
                if doc_index - first != counted {
                    return Err(changed_while_read(&source.path, counted, doc_index - first));
                }
            }
            if !batch.is_empty() {
                send(&mut batch)?;
            }
            Ok(())
        })();
        drop(tx);
        // Keep answering interrupts until the worker has written the last batch.
        while read_result.is_ok() && !worker.is_finished() {
            if interrupted() {
                cancel.store(true, Relaxed);
                break;
            }
            progress(done_bytes.load(Relaxed));
            std::thread::sleep(POLL);
        }
        let (write_result, train, val, stats) = worker.join().expect("the encoding stage panicked");
        // A failed worker closes the channel, which the reader sees as a send error: the
        // worker's error is the cause, so it comes first.
        let result = match (write_result, read_result) {
            _ if cancel.load(Relaxed) => Err(Error::Interrupted),
            (Err(e), _) => Err(e),
            (Ok(()), r) => r,
        };
        (result, train, val, stats)
    });
    progress(done_bytes.load(Relaxed));
    let (mut train, mut val) = (train, val);
    let temps: Vec<(PathBuf, String)> = std::mem::take(&mut train.done)
        .into_iter()
        .chain(std::mem::take(&mut val.done))
        .collect();
    if let Err(e) = result {
        for (tmp, _) in &temps {
            let _ = std::fs::remove_file(tmp);
        }
        return Err(e);
    }
    for (tmp, name) in &temps {
        std::fs::rename(tmp, opts.out_dir.join(name)).map_err(|e| Error::io(tmp, e))?;
        if name.starts_with("train") {
            stats.train.shards.push(name.clone());
        } else {
            stats.val.shards.push(name.clone());
        }
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pretokenize::Pretokenizer;

    fn byte_encoder() -> Encoder {
        let tokens: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
        Encoder::new(
            tokens,
            vec![("<|endoftext|>".into(), 256)],
            Pretokenizer::new("gpt2").unwrap(),
        )
        .unwrap()
    }

    fn read_tokens(path: &Path) -> Vec<u32> {
        let bytes = std::fs::read(path).unwrap();
        let header: Vec<i32> = bytes[..1024]
            .chunks(4)
            .map(|c| i32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(header[0], MAGIC_U16);
        let toks: Vec<u32> = bytes[1024..]
            .chunks(2)
            .map(|c| u16::from_le_bytes(c.try_into().unwrap()) as u32)
            .collect();
        assert_eq!(toks.len(), header[2] as usize);
        toks
    }

    #[test]
    fn documents_round_trip_through_shards() {
        let dir = std::env::temp_dir().join(format!("sg-corpus-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let input = dir.join("in.txt");
        std::fs::write(&input, "first doc\n===\nsecond\n===\n\n===\nthird one").unwrap();
        let sources = [Source {
            path: input,
            kind: SourceKind::Text {
                separator: Some("\n===\n".into()),
            },
        }];
        let opts = ShardOptions {
            out_dir: dir.clone(),
            val_fraction: 0.3,
            shard_tokens: 7,
            dtype: Dtype::U16,
            errors: Utf8Errors::Strict,
        };
        let enc = byte_encoder();
        let stats = tokenize_corpus(&enc, 256, &sources, &opts, None, |_| {}, || false).unwrap();
        assert_eq!((stats.train.documents, stats.val.documents), (2, 1));
        let mut all = Vec::new();
        for name in stats.train.shards.iter().chain(&stats.val.shards) {
            all.extend(read_tokens(&dir.join(name)));
        }
        let text = enc.decode_bytes(&all).unwrap();
        assert_eq!(
            String::from_utf8(text).unwrap(),
            "<|endoftext|>first doc<|endoftext|>second<|endoftext|>third one"
        );
        assert!(std::fs::read_dir(&dir).unwrap().all(|e| !e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .ends_with(".tmp")));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn lone_surrogate_escapes_become_replacement_characters() {
        let cases = [
            (r#"{"text": "a\ud800b"}"#, r#"{"text": "a\ufffdb"}"#),
            (r#"{"text": "\udc00\ud83d"}"#, r#"{"text": "\ufffd\ufffd"}"#),
            (
                r#"{"text": "\ud83d\ude00 \\ud800"}"#,
                r#"{"text": "\ud83d\ude00 \\ud800"}"#,
            ),
            (r#"{"text": "\ud83d\u0041"}"#, r#"{"text": "\ufffd\u0041"}"#),
            (r#"{"text": "ok"}"#, r#"{"text": "ok"}"#),
        ];
        for (line, want) in cases {
            assert_eq!(replace_lone_surrogates(line), want, "{line}");
        }
        let v = parse_json_line(r#"{"text": "a\ud800b"}"#, Utf8Errors::Replace).unwrap();
        assert_eq!(v["text"], "a\u{fffd}b");
        let e = parse_json_line(r#"{"text": "a\ud800b"}"#, Utf8Errors::Strict).unwrap_err();
        assert!(e.contains("lone surrogate"), "{e}");
    }
}
