//! smallgpt's byte-level BPE: a pure-Rust core (pre-tokenization, training, encoding) with
//! thin PyO3 bindings in `py.rs`, compiled only with the `python` feature so that
//! `cargo test` runs without Python.

pub mod corpus;
pub mod encoder;
pub mod error;
pub mod lanes;
pub mod pretokenize;
mod scan;
pub mod trainer;

#[cfg(feature = "python")]
mod py;

pub use encoder::{Encoder, Rank};
pub use error::{Error, Result};
pub use pretokenize::Pretokenizer;
pub use trainer::{
    count_files, count_texts, merge_bytes, train, PieceCounts, TrainOptions, Utf8Errors,
};
