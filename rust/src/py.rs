//! Thin PyO3 bindings: argument conversion, GIL release, error mapping. No algorithm here.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;

use pyo3::exceptions::{
    PyFileNotFoundError, PyKeyboardInterrupt, PyOSError, PyRuntimeError, PyTypeError, PyValueError,
};
use pyo3::prelude::*;
use pyo3::sync::GILOnceCell;
use pyo3::types::{PyBytes, PyList, PyString};

use crate::corpus::{self, Dtype, ShardOptions, Source, SourceKind};
use crate::encoder::{Encoder, Rank, MAX_TOKENS, MAX_TOKEN_LEN};
use crate::error::Error;
use crate::lanes::map_in_lanes;
use crate::pretokenize::{
    resolve_pattern as resolve, Pretokenizer, CL100K_PATTERN, GPT2_PATTERN, O200K_PATTERN,
};
use crate::trainer::{self, PieceCounts, TrainOptions, Utf8Errors};

fn to_py(err: Error) -> PyErr {
    match err {
        Error::NotFound(p) => {
            PyFileNotFoundError::new_err(format!("no such file: {}", p.display()))
        }
        e @ Error::Io { .. } => PyOSError::new_err(e.to_string()),
        Error::Interrupted => PyKeyboardInterrupt::new_err("interrupted"),
        e => PyValueError::new_err(e.to_string()),
    }
}

/// The UTF-8 text of a Python `str`, borrowed from the object where the interpreter allows.
///
/// `PyUnicode_AsUTF8AndSize` returns the string's own UTF-8 buffer (cached in the object
/// after the first call; free for ASCII strings). It is in the limited API only from
/// Python 3.10, so under `abi3-py39` PyO3 instead encodes a fresh copy and copies it again
/// on every call, a visible cost for short texts. Every CPython 3.x exports the function
/// with this signature, so it is declared here directly; Windows links abi3 modules against
/// `python3.dll`, which lacks it before 3.10, so there the copying path stays.
/// Writes ids as little-endian u32s into `dst` (exactly `4 * ids.len()` bytes long): one
/// copy on little-endian machines, where the per-id loop did not vectorize.
fn write_le(ids: &[Rank], dst: &mut [u8]) {
    debug_assert_eq!(dst.len(), 4 * ids.len());
    #[cfg(target_endian = "little")]
    {
        // SAFETY: any initialized u32 is four initialized bytes; the view lives only for
        // this copy, and `Rank` is `u32` with no padding.
        let src = unsafe { std::slice::from_raw_parts(ids.as_ptr().cast::<u8>(), 4 * ids.len()) };
        dst.copy_from_slice(src);
    }
    #[cfg(not(target_endian = "little"))]
    for (chunk, id) in dst.chunks_exact_mut(4).zip(ids) {
        chunk.copy_from_slice(&id.to_le_bytes());
    }
}

fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type()
        .name()
        .map_or_else(|_| "?".to_string(), |n| n.to_string())
}

/// `obj` as a str, or the TypeError the Python API raises for anything else.
fn text_arg<'a, 'py>(obj: &'a Bound<'py, PyAny>) -> PyResult<&'a Bound<'py, PyString>> {
    obj.downcast::<PyString>()
        .map_err(|_| PyTypeError::new_err(format!("text must be str, got {}", type_name(obj))))
}

fn utf8<'a>(s: &'a Bound<'_, PyString>) -> PyResult<Cow<'a, str>> {
    #[cfg(not(windows))]
    {
        extern "C" {
            fn PyUnicode_AsUTF8AndSize(
                unicode: *mut pyo3::ffi::PyObject,
                size: *mut pyo3::ffi::Py_ssize_t,
            ) -> *const std::os::raw::c_char;
        }
        let mut len: pyo3::ffi::Py_ssize_t = 0;
        // SAFETY: `s` is a live str; the buffer it returns lives as long as the object, which
        // `'a` borrows, and a str is immutable. NULL (lone surrogates) sets a Python error.
        unsafe {
            let ptr = PyUnicode_AsUTF8AndSize(s.as_ptr(), &mut len);
            if ptr.is_null() {
                return Err(PyErr::fetch(s.py()));
            }
            let bytes = std::slice::from_raw_parts(ptr.cast::<u8>(), len as usize);
            Ok(Cow::Borrowed(std::str::from_utf8_unchecked(bytes)))
        }
    }
    #[cfg(windows)]
    {
        s.to_cow()
    }
}

/// The texts of a list of `str`, borrowed as by [`utf8`].
fn utf8_all<'a>(texts: &'a [Bound<'_, PyString>]) -> PyResult<Vec<Cow<'a, str>>> {
    texts.iter().map(utf8).collect()
}

/// The `texts` of a batch call (any iterable of str, not a str itself), checked in the one
/// pass that collects them, with the TypeErrors the Python API documents.
fn texts_arg<'py>(texts: &Bound<'py, PyAny>) -> PyResult<Vec<Bound<'py, PyString>>> {
    if texts.is_instance_of::<PyString>() {
        return Err(PyTypeError::new_err(
            "texts must be a sequence of str, not a single string",
        ));
    }
    let item = |t: Bound<'py, PyAny>| {
        t.downcast_into::<PyString>()
            .map_err(|_| PyTypeError::new_err("texts must contain only str"))
    };
    if let Ok(list) = texts.downcast::<PyList>() {
        return list.iter().map(item).collect();
    }
    let iter = texts.try_iter().map_err(|_| {
        PyTypeError::new_err(format!(
            "texts must be a sequence of str, got {}",
            type_name(texts)
        ))
    })?;
    iter.map(|t| item(t?)).collect()
}

thread_local! {
    /// Each thread's buffer for the ids of one text, reused from call to call: allocating
    /// (and growing) a vector per call showed on short texts.
    static IDS: std::cell::Cell<Vec<Rank>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Runs `f` with this thread's empty id buffer; `f` hands the buffer back with its result
/// (a buffer lost to an error is simply allocated again next time).
fn with_buffer<T>(f: impl FnOnce(Vec<Rank>) -> PyResult<(T, Vec<Rank>)>) -> PyResult<T> {
    let mut ids = IDS.take();
    ids.clear();
    let (out, ids) = f(ids)?;
    // Keep at most 1M ids (4 MB) between calls.
    if ids.capacity() <= 1 << 20 {
        IDS.set(ids);
    }
    Ok(out)
}

/// Runs `f` without the GIL; a Rust panic becomes a RuntimeError instead of crossing into
/// Python as a PanicException.
fn run<T: Send>(py: Python<'_>, f: impl FnOnce() -> crate::Result<T> + Send) -> PyResult<T> {
    py.allow_threads(|| std::panic::catch_unwind(AssertUnwindSafe(f)))
        .map_err(|_| PyRuntimeError::new_err("internal error in smallgpt._bpe (please report it)"))?
        .map_err(to_py)
}

/// Most threads a call may ask for: spawning hundreds of thousands of them took minutes
/// before failing, and no machine has that many cores.
const MAX_THREADS: usize = 1024;

fn pool(num_threads: Option<usize>) -> PyResult<Option<rayon::ThreadPool>> {
    match num_threads {
        None => Ok(None),
        Some(n) if n == 0 || n > MAX_THREADS => Err(PyValueError::new_err(format!(
            "num_threads must be from 1 to {MAX_THREADS}, got {n}"
        ))),
        Some(n) => rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build()
            .map(Some)
            .map_err(|e| PyRuntimeError::new_err(e.to_string())),
    }
}

fn in_pool<T: Send>(pool: &Option<rayon::ThreadPool>, f: impl FnOnce() -> T + Send) -> T {
    match pool {
        Some(p) => p.install(f),
        None => f(),
    }
}

/// The Rust tokenizer: a vocabulary, its pre-tokenizer and special tokens.
#[pyclass(module = "smallgpt._bpe", frozen)]
struct CoreTokenizer {
    enc: Encoder,
    /// Merges as recorded by training (None for loaded vocabularies: derived on demand).
    merges: Option<Vec<(Rank, Rank)>>,
    /// A Python int for every ordinary id, made on the first call that returns lists.
    /// Making (and later freeing) one int object per token was most of the cost of a call
    /// returning a list; sharing them costs ~40 bytes per vocabulary entry, once.
    ints: GILOnceCell<Vec<PyObject>>,
}

#[pymethods]
impl CoreTokenizer {
    /// Builds a tokenizer whose ids 0..255 are the bytes and whose token 256+k is merge k.
    #[staticmethod]
    #[pyo3(signature = (merges, pattern, special_tokens, byte_order=None))]
    fn from_merges(
        py: Python<'_>,
        merges: Vec<(Rank, Rank)>,
        pattern: &str,
        special_tokens: Vec<(String, Rank)>,
        byte_order: Option<Vec<u8>>,
    ) -> PyResult<Self> {
        let pretok = Pretokenizer::new(pattern).map_err(to_py)?;
        run(py, move || {
            let mut tokens = trainer::merge_bytes(&merges)?;
            if let Some(order) = byte_order {
                // Loaded vocabularies number the byte tokens in their own order.
                if order.len() != 256 || order.iter().collect::<HashSet<_>>().len() != 256 {
                    return Err(Error::InvalidVocab(
                        "byte_order must be a permutation of 0..=255".into(),
                    ));
                }
                let base: Vec<Vec<u8>> = order.iter().map(|&b| vec![b]).collect();
                let mut rebuilt = base.clone();
                for &(l, r) in &merges {
                    let mut b = rebuilt[l as usize].clone();
                    b.extend_from_slice(&rebuilt[r as usize]);
                    rebuilt.push(b);
                }
                tokens = rebuilt;
            }
            let enc = Encoder::new(tokens, special_tokens, pretok)?;
            Ok(CoreTokenizer {
                enc,
                merges: Some(merges),
                ints: GILOnceCell::new(),
            })
        })
    }

    /// Builds a tokenizer from token byte strings indexed by id (rank = id).
    #[staticmethod]
    fn from_tokens(
        py: Python<'_>,
        tokens: Vec<Vec<u8>>,
        pattern: &str,
        special_tokens: Vec<(String, Rank)>,
    ) -> PyResult<Self> {
        let pretok = Pretokenizer::new(pattern).map_err(to_py)?;
        run(py, move || {
            Ok(CoreTokenizer {
                enc: Encoder::new(tokens, special_tokens, pretok)?,
                merges: None,
                ints: GILOnceCell::new(),
            })
        })
    }

    /// Encodes text, treating special-token text as ordinary text.
    ///
    /// `Tokenizer.encode_ordinary` is this method itself (bound in `Tokenizer.__init__`), so it
    /// checks its argument the way the Python API does.
    fn encode_ordinary<'py>(
        &self,
        py: Python<'py>,
        text: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyList>> {
        let text = text_arg(text)?;
        self.list_of(py, text, |t, ids| self.enc.encode_ordinary_into(t, ids))
    }

    /// `encode` with no special token allowed and all of them disallowed (the default).
    fn encode_strict<'py>(
        &self,
        py: Python<'py>,
        text: &Bound<'py, PyString>,
    ) -> PyResult<Bound<'py, PyList>> {
        self.list_of(py, text, |t, ids| self.enc.encode_strict_into(t, ids))
    }

    #[pyo3(signature = (text, allowed, disallowed=None))]
    fn encode<'py>(
        &self,
        py: Python<'py>,
        text: &Bound<'py, PyString>,
        allowed: HashSet<String>,
        disallowed: Option<HashSet<String>>,
    ) -> PyResult<Bound<'py, PyList>> {
        let disallowed = disallowed.as_ref();
        self.list_of(py, text, |t, ids| {
            self.enc.encode_into(t, &allowed, disallowed, ids)
        })
    }

    /// `encode` as one little-endian uint32 buffer (for `encode_to_numpy`).
    #[pyo3(signature = (text, allowed, disallowed=None))]
    fn encode_flat<'py>(
        &self,
        py: Python<'py>,
        text: &Bound<'py, PyString>,
        allowed: HashSet<String>,
        disallowed: Option<HashSet<String>>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let text = utf8(text)?;
        let ids = run(py, || self.enc.encode(&text, &allowed, disallowed.as_ref()))?;
        PyBytes::new_with(py, ids.len() * 4, |buf| {
            write_le(&ids, buf);
            Ok(())
        })
    }

    #[pyo3(signature = (texts, allowed, disallowed=None, num_threads=None))]
    fn encode_batch<'py>(
        &self,
        py: Python<'py>,
        texts: &Bound<'py, PyAny>,
        allowed: HashSet<String>,
        disallowed: Option<HashSet<String>>,
        num_threads: Option<usize>,
    ) -> PyResult<Bound<'py, PyList>> {
        let texts = texts_arg(texts)?;
        let texts = utf8_all(&texts)?;
        let runs = self.encode_runs(py, &texts, &allowed, disallowed.as_ref(), num_threads)?;
        let mut lists = Vec::with_capacity(texts.len());
        for (ids, lens) in &runs {
            let mut at = 0;
            for &len in lens {
                lists.push(self.id_list(py, &ids[at..at + len])?);
                at += len;
            }
        }
        PyList::new(py, lists)
    }

    /// Like `encode_batch`, but returns all ids as one little-endian uint32 buffer plus
    /// int64 offsets (`len(texts) + 1` of them): no Python int per token, which is most of
    /// the cost of a list of lists.
    #[pyo3(signature = (texts, allowed, disallowed=None, num_threads=None))]
    fn encode_batch_flat<'py>(
        &self,
        py: Python<'py>,
        texts: &Bound<'py, PyAny>,
        allowed: HashSet<String>,
        disallowed: Option<HashSet<String>>,
        num_threads: Option<usize>,
    ) -> PyResult<(Bound<'py, PyBytes>, Bound<'py, PyBytes>)> {
        let texts = texts_arg(texts)?;
        let texts = utf8_all(&texts)?;
        let runs = self.encode_runs(py, &texts, &allowed, disallowed.as_ref(), num_threads)?;
        let total: usize = runs.iter().map(|(ids, _)| ids.len()).sum();
        let tokens = PyBytes::new_with(py, total * 4, |buf| {
            let mut at = 0;
            for (ids, _) in &runs {
                let dst = &mut buf[at..at + 4 * ids.len()];
                write_le(ids, dst);
                at += dst.len();
            }
            Ok(())
        })?;
        let offsets = PyBytes::new_with(py, (texts.len() + 1) * 8, |buf| {
            let lens =
                std::iter::once(0).chain(runs.iter().flat_map(|(_, lens)| lens.iter().copied()));
            let mut at = 0i64;
            for (chunk, len) in buf.chunks_exact_mut(8).zip(lens) {
                at += len as i64;
                chunk.copy_from_slice(&at.to_le_bytes());
            }
            Ok(())
        })?;
        Ok((tokens, offsets))
    }

    fn decode_bytes<'py>(&self, py: Python<'py>, ids: Vec<Rank>) -> PyResult<Bound<'py, PyBytes>> {
        let bytes = run(py, || self.enc.decode_bytes(&ids))?;
        Ok(PyBytes::new(py, &bytes))
    }

    /// The bytes of every ordinary token, indexed by id.
    fn token_bytes<'py>(&self, py: Python<'py>) -> Vec<Bound<'py, PyBytes>> {
        self.enc
            .tokens()
            .iter()
            .map(|t| PyBytes::new(py, t))
            .collect()
    }

    fn merges(&self, py: Python<'_>) -> PyResult<Vec<(Rank, Rank)>> {
        match &self.merges {
            Some(m) => Ok(m.clone()),
            None => run(py, || self.enc.derive_merges()),
        }
    }

    /// The id of each single byte value (identity for trained vocabularies).
    fn byte_order(&self) -> Vec<u8> {
        self.enc.tokens().iter().take(256).map(|t| t[0]).collect()
    }

    #[getter]
    fn n_tokens(&self) -> usize {
        self.enc.n_tokens()
    }

    #[getter]
    fn vocab_size(&self) -> usize {
        self.enc.vocab_size()
    }

    #[getter]
    fn pattern(&self) -> &str {
        self.enc.pretokenizer().pattern()
    }

    #[getter]
    fn special_tokens(&self) -> HashMap<String, Rank> {
        self.enc
            .specials()
            .iter()
            .map(|(k, &v)| (k.clone(), v))
            .collect()
    }
}

/// Accumulates piece counts from texts or files, then learns merges.
#[pyclass(module = "smallgpt._bpe")]
struct Trainer {
    pretok: Pretokenizer,
    counts: PieceCounts,
    pool: Option<rayon::ThreadPool>,
}

#[pymethods]
impl Trainer {
    #[new]
    #[pyo3(signature = (pattern, num_threads=None))]
    fn new(pattern: &str, num_threads: Option<usize>) -> PyResult<Self> {
        Ok(Trainer {
            pretok: Pretokenizer::new(pattern).map_err(to_py)?,
            counts: PieceCounts::default(),
            pool: pool(num_threads)?,
        })
    }

    /// Counts the pieces of a batch of documents (in parallel, without the GIL).
    fn feed(&mut self, py: Python<'_>, texts: Vec<Bound<'_, PyString>>) -> PyResult<()> {
        let texts = utf8_all(&texts)?;
        let (pretok, pool) = (&self.pretok, &self.pool);
        let batch = run(py, || {
            in_pool(pool, || trainer::count_texts(pretok, &texts))
        })?;
        merge_into(&mut self.counts, batch);
        Ok(())
    }

    /// Counts the pieces of files, each file one document, read and split in Rust.
    #[pyo3(signature = (paths, errors="strict"))]
    fn feed_files(&mut self, py: Python<'_>, paths: Vec<PathBuf>, errors: &str) -> PyResult<()> {
        let errors = parse_errors(errors)?;
        let (pretok, pool) = (&self.pretok, &self.pool);
        let batch = run(py, || {
            in_pool(pool, || trainer::count_files(pretok, &paths, errors))
        })?;
        merge_into(&mut self.counts, batch);
        Ok(())
    }

    /// Counts the documents of corpus sources (see `tokenize_corpus` for their form).
    #[pyo3(signature = (sources, errors="strict"))]
    fn feed_sources(
        &mut self,
        py: Python<'_>,
        sources: Vec<(PathBuf, String, Option<String>)>,
        errors: &str,
    ) -> PyResult<()> {
        let errors = parse_errors(errors)?;
        let sources = parse_sources(sources)?;
        let (pretok, pool) = (&self.pretok, &self.pool);
        let batch = run(py, || {
            in_pool(pool, || {
                let mut total = PieceCounts::default();
                let mut docs: Vec<String> = Vec::new();
                let mut size = 0;
                for s in &sources {
                    corpus::for_each_document(s, errors, |d| {
                        docs.push(d.to_owned());
                        size += d.len();
                        if size > 64 << 20 {
                            merge_into(&mut total, trainer::count_texts(pretok, &docs)?);
                            docs.clear();
                            size = 0;
                        }
                        Ok(())
                    })?;
                }
                merge_into(&mut total, trainer::count_texts(pretok, &docs)?);
                Ok(total)
            })
        })?;
        merge_into(&mut self.counts, batch);
        Ok(())
    }

    /// Number of distinct pieces counted so far.
    fn n_pieces(&self) -> usize {
        self.counts.len()
    }

    /// Learns merges from the counts fed so far, which it consumes (their memory is freed
    /// while the merge structures are built; feed again to train again).
    #[pyo3(signature = (num_merges, min_frequency=2, max_token_length=None, progress=false))]
    fn train(
        &mut self,
        py: Python<'_>,
        num_merges: usize,
        min_frequency: u64,
        max_token_length: Option<usize>,
        progress: bool,
    ) -> PyResult<Vec<(Rank, Rank)>> {
        let opts = TrainOptions {
            num_merges,
            min_frequency,
            max_token_length,
        };
        let counts = std::mem::take(&mut self.counts);
        run(py, move || {
            let bar = if progress {
                let b = indicatif::ProgressBar::new(num_merges as u64);
                b.set_style(
                    indicatif::ProgressStyle::with_template(
                        "merges {pos}/{len} [{elapsed_precise}] {wide_bar} {eta}",
                    )
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
                );
                b
            } else {
                indicatif::ProgressBar::hidden()
            };
            let merges = trainer::train(counts, &opts, |n| {
                if n % 64 == 0 {
                    bar.set_position(n as u64);
                }
            })?;
            bar.finish_and_clear();
            Ok(merges)
        })
    }
}

impl CoreTokenizer {
    /// Encodes one text with `encode` (without the GIL, into this thread's reused id
    /// buffer) and returns its ids as a list.
    fn list_of<'py>(
        &self,
        py: Python<'py>,
        text: &Bound<'py, PyString>,
        encode: impl FnOnce(&str, &mut Vec<Rank>) -> crate::Result<()> + Send,
    ) -> PyResult<Bound<'py, PyList>> {
        let text = utf8(text)?;
        with_buffer(|mut ids| {
            ids = run(py, || encode(&text, &mut ids).map(|_| ids))?;
            Ok((self.id_list(py, &ids)?, ids))
        })
    }

    /// A list of Python ints from ids, built directly from the shared int objects (PyO3's
    /// generic conversion makes a new object per element through a trait object).
    fn id_list<'py>(&self, py: Python<'py>, ids: &[Rank]) -> PyResult<Bound<'py, PyList>> {
        let ints = self.ints.get_or_try_init(py, || {
            (0..self.enc.n_tokens() as u64)
                .map(|i| Ok(i.into_pyobject(py)?.into_any().unbind()))
                .collect::<PyResult<Vec<_>>>()
        })?;
        // SAFETY: the list is created with `ids.len()` slots, each filled exactly once with a
        // new reference (which PyList_SetItem steals) before the list is handed to Python; a
        // list with unfilled (NULL) slots is freed correctly on the error path.
        unsafe {
            let list = pyo3::ffi::PyList_New(ids.len() as pyo3::ffi::Py_ssize_t);
            if list.is_null() {
                return Err(PyErr::fetch(py));
            }
            let list = Bound::from_owned_ptr(py, list).downcast_into_unchecked::<PyList>();
            for (i, &id) in ids.iter().enumerate() {
                let item = match ints.get(id as usize) {
                    Some(int) => int.clone_ref(py).into_ptr(),
                    // Special tokens.
                    None => pyo3::ffi::PyLong_FromUnsignedLong(id as std::os::raw::c_ulong),
                };
                if item.is_null() {
                    return Err(PyErr::fetch(py));
                }
                pyo3::ffi::PyList_SetItem(list.as_ptr(), i as pyo3::ffi::Py_ssize_t, item);
            }
            Ok(list)
        }
    }

    /// Encodes texts in parallel without the GIL (on a pool of `num_threads` if given).
    /// Texts go to the threads in runs, each run's ids back to back in one buffer with the
    /// length of each text: a vector per text cost an allocation and a copy per text, which
    /// on batches of short lines was a third of the time.
    fn encode_runs(
        &self,
        py: Python<'_>,
        texts: &[Cow<'_, str>],
        allowed: &HashSet<String>,
        disallowed: Option<&HashSet<String>>,
        num_threads: Option<usize>,
    ) -> PyResult<Vec<(Vec<Rank>, Vec<usize>)>> {
        let pool = pool(num_threads)?;
        run(py, || {
            in_pool(&pool, || {
                let run_len = texts
                    .len()
                    .div_ceil(16 * rayon::current_num_threads())
                    .max(1);
                let runs: Vec<&[Cow<'_, str>]> = texts.chunks(run_len).collect();
                // In lanes, not `par_iter`: the same thread gets the same texts on every
                // call, which keeps its caches warm for a batch seen again.
                map_in_lanes(runs.len(), |r| {
                    let run = runs[r];
                    // About one id per two bytes covers most text (English needs one per
                    // four, CJK one per two to three): growing the buffer from empty
                    // copied it over and over.
                    let bytes: usize = run.iter().map(|t| t.len()).sum();
                    let mut ids = Vec::with_capacity(bytes / 2 + 16);
                    let mut lens = Vec::with_capacity(run.len());
                    for t in run {
                        let start = ids.len();
                        self.enc.encode_into(t, allowed, disallowed, &mut ids)?;
                        lens.push(ids.len() - start);
                    }
                    Ok((ids, lens))
                })
                .into_iter()
                .collect()
            })
        })
    }
}

fn merge_into(total: &mut PieceCounts, batch: PieceCounts) {
    total.merge(batch);
}

fn parse_errors(errors: &str) -> PyResult<Utf8Errors> {
    match errors {
        "strict" => Ok(Utf8Errors::Strict),
        "replace" => Ok(Utf8Errors::Replace),
        other => Err(PyValueError::new_err(format!(
            "errors must be 'strict' or 'replace', not {other:?}"
        ))),
    }
}

/// (documents, tokens, UTF-8 bytes, shard file names) of one split.
type SplitSummary = (u64, u64, u64, Vec<String>);

fn parse_sources(sources: Vec<(PathBuf, String, Option<String>)>) -> PyResult<Vec<Source>> {
    sources
        .into_iter()
        .map(|(path, kind, arg)| {
            let kind = match kind.as_str() {
                "text" => SourceKind::Text { separator: arg },
                "jsonl" => SourceKind::Jsonl {
                    field: arg.unwrap_or_else(|| "text".into()),
                },
                other => {
                    return Err(PyValueError::new_err(format!(
                        "unknown source kind {other:?}"
                    )))
                }
            };
            Ok(Source { path, kind })
        })
        .collect()
}

/// Tokenizes corpus files into llm.c shards in `out_dir`. `sources` are
/// `(path, "text" | "jsonl", separator-or-field)`. Returns per-split statistics.
#[pyfunction]
#[pyo3(signature = (tokenizer, eot, sources, out_dir, val_fraction, shard_tokens, dtype_bits, errors="strict", progress=false, num_threads=None))]
#[allow(clippy::too_many_arguments)]
fn tokenize_corpus(
    py: Python<'_>,
    tokenizer: &CoreTokenizer,
    eot: Rank,
    sources: Vec<(PathBuf, String, Option<String>)>,
    out_dir: PathBuf,
    val_fraction: f64,
    shard_tokens: usize,
    dtype_bits: u32,
    errors: &str,
    progress: bool,
    num_threads: Option<usize>,
) -> PyResult<HashMap<String, SplitSummary>> {
    let pool = pool(num_threads)?;
    let opts = ShardOptions {
        out_dir,
        val_fraction,
        shard_tokens,
        dtype: match dtype_bits {
            16 => Dtype::U16,
            32 => Dtype::U32,
            _ => return Err(PyValueError::new_err("dtype_bits must be 16 or 32")),
        },
        errors: parse_errors(errors)?,
    };
    let sources = parse_sources(sources)?;
    let total: u64 = sources
        .iter()
        .map(|s| std::fs::metadata(&s.path).map(|m| m.len()).unwrap_or(0))
        .sum();
    let stats = run(py, || {
        let bar = if progress {
            let b = indicatif::ProgressBar::new(total);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bytes}/{total_bytes} [{elapsed_precise}] {wide_bar} {binary_bytes_per_sec} ETA {eta}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            b
        } else {
            indicatif::ProgressBar::hidden()
        };
        // Signals are only seen on the main thread, so the loop must not move to the pool.
        let interrupted = || Python::with_gil(|py| py.check_signals().is_err());
        let r = corpus::tokenize_corpus(
            &tokenizer.enc,
            eot,
            &sources,
            &opts,
            pool.as_ref(),
            |done| bar.set_position(done),
            interrupted,
        );
        bar.finish_and_clear();
        r
    })?;
    let mut out = HashMap::new();
    for (name, s) in [("train", stats.train), ("val", stats.val)] {
        out.insert(name.to_string(), (s.documents, s.tokens, s.bytes, s.shards));
    }
    Ok(out)
}

/// The pieces that `pattern` (a name or a regex) splits `text` into; `regex_only` bypasses
/// the hand-written scanners.
#[pyfunction]
#[pyo3(signature = (pattern, text, regex_only=false))]
fn pretokenize(
    py: Python<'_>,
    pattern: &str,
    text: &str,
    regex_only: bool,
) -> PyResult<Vec<String>> {
    let mut pretok = Pretokenizer::new(pattern).map_err(to_py)?;
    if regex_only {
        pretok = pretok.without_scanner();
    }
    run(py, || {
        Ok(pretok
            .pieces(text)?
            .into_iter()
            .map(str::to_owned)
            .collect())
    })
}

/// The pieces of `text` computed chunk by chunk, cutting at the safe points the parallel
/// counter uses with chunks of about `target` bytes (to test that cutting changes nothing).
#[pyfunction]
fn pretokenize_chunked(
    py: Python<'_>,
    pattern: &str,
    text: &str,
    target: usize,
) -> PyResult<Vec<String>> {
    let pretok = Pretokenizer::new(pattern).map_err(to_py)?;
    run(py, || {
        let mut out = Vec::new();
        let mut start = 0;
        let cuts = pretok.split_points(text, target);
        for end in cuts.into_iter().chain(std::iter::once(text.len())) {
            out.extend(
                pretok
                    .pieces(&text[start..end])?
                    .into_iter()
                    .map(str::to_owned),
            );
            start = end;
        }
        Ok(out)
    })
}

/// The regex string of a pattern name; any other string is returned unchanged.
#[pyfunction]
fn resolve_pattern(name: &str) -> String {
    resolve(name).0.to_string()
}

/// Reads a text file in Rust (for tests of the UTF-8 error path).
#[pyfunction]
#[pyo3(signature = (path, errors="strict"))]
fn read_text(py: Python<'_>, path: PathBuf, errors: &str) -> PyResult<String> {
    let errors = parse_errors(errors)?;
    run(py, || trainer::read_text(&path, errors))
}

#[pymodule]
fn _bpe(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<CoreTokenizer>()?;
    m.add_class::<Trainer>()?;
    m.add_function(wrap_pyfunction!(pretokenize, m)?)?;
    m.add_function(wrap_pyfunction!(pretokenize_chunked, m)?)?;
    m.add_function(wrap_pyfunction!(resolve_pattern, m)?)?;
    m.add_function(wrap_pyfunction!(read_text, m)?)?;
    m.add_function(wrap_pyfunction!(tokenize_corpus, m)?)?;
    m.add("GPT2_PATTERN", GPT2_PATTERN)?;
    m.add("CL100K_PATTERN", CL100K_PATTERN)?;
    m.add("O200K_PATTERN", O200K_PATTERN)?;
    m.add("MAX_TOKEN_LENGTH", MAX_TOKEN_LEN)?;
    m.add("MAX_THREADS", MAX_THREADS)?;
    // Ordinary tokens plus special tokens; ids above it would not fit the encoder's u32.
    m.add("MAX_VOCAB_SIZE", MAX_TOKENS)?;
    Ok(())
}
