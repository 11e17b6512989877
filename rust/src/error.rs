//! Errors of the pure-Rust core. The Python layer maps each variant to a typed exception.

use std::fmt;
use std::path::PathBuf;

#[derive(Debug)]
pub enum Error {
    /// A custom pre-tokenization pattern failed to compile.
    InvalidPattern(String),
    /// The regex engine gave up on some input (e.g. its backtracking limit).
    RegexRuntime(String),
    /// An input file does not exist.
    NotFound(PathBuf),
    /// Any other I/O failure, with the path it concerns.
    Io { path: PathBuf, message: String },
    /// A file is not valid UTF-8; `offset` is the byte offset of the first bad byte.
    InvalidUtf8 { path: PathBuf, offset: usize },
    /// A token id that is neither a vocabulary token nor a special token.
    UnknownId(u32),
    /// The text holds special-token text that the caller did not allow.
    DisallowedSpecial(String),
    /// A vocabulary that is not a consistent byte-level BPE vocabulary.
    InvalidVocab(String),
    /// Any other invalid argument.
    Value(String),
    /// The caller asked to stop (Ctrl-C).
    Interrupted,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::InvalidPattern(m) => write!(f, "invalid pre-tokenization pattern: {m}"),
            Error::RegexRuntime(m) => write!(f, "pre-tokenization regex failed: {m}"),
            Error::NotFound(p) => write!(f, "no such file: {}", p.display()),
            Error::Io { path, message } => write!(f, "{}: {message}", path.display()),
            Error::InvalidUtf8 { path, offset } => write!(
                f,
                "{}: invalid UTF-8 at byte offset {offset} (pass errors=\"replace\" to substitute U+FFFD)",
                path.display()
            ),
            Error::UnknownId(id) => write!(f, "unknown token id {id}"),
            Error::DisallowedSpecial(s) => write!(
                f,
                "encountered text corresponding to disallowed special token {s:?}; pass it in \
                 allowed_special to encode it as a special token, or disallowed_special=() to \
                 encode it as ordinary text"
            ),
            Error::InvalidVocab(m) => write!(f, "invalid vocabulary: {m}"),
            Error::Value(m) => write!(f, "{m}"),
            Error::Interrupted => write!(f, "interrupted"),
        }
    }
}

impl std::error::Error for Error {}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, err: std::io::Error) -> Error {
        let path = path.into();
        if err.kind() == std::io::ErrorKind::NotFound {
            Error::NotFound(path)
        } else {
            Error::Io {
                path,
                message: err.to_string(),
            }
        }
    }
}
