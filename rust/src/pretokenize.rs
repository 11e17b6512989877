//! Pre-tokenization: splitting text into the pieces that BPE works on.
//!
//! The named patterns are tiktoken's strings, character for character, so that a loaded
//! OpenAI vocabulary encodes exactly as tiktoken does.

use crate::error::{Error, Result};

/// GPT-2 / r50k_base.
pub const GPT2_PATTERN: &str =
    r"'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s";

/// cl100k_base (GPT-4).
pub const CL100K_PATTERN: &str = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s";

/// o200k_base (GPT-4o).
pub const O200K_PATTERN: &str = concat!(
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    "|",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    "|",
    r"\p{N}{1,3}",
    "|",
    r" ?[^\s\p{L}\p{N}]+[\r\n/]*",
    "|",
    r"\s*[\r\n]+",
    "|",
    r"\s+(?!\S)",
    "|",
    r"\s+"
);

/// Resolves a pattern name (`gpt2`/`r50k`, `cl100k`/`gpt4`, `o200k`) to its regex;
/// any other string is taken as a custom regex. Returns the regex and whether it was named.
pub fn resolve_pattern(name_or_regex: &str) -> (&str, bool) {
    match name_or_regex {
        "gpt2" | "r50k" => (GPT2_PATTERN, true),
        "cl100k" | "gpt4" => (CL100K_PATTERN, true),
        "o200k" => (O200K_PATTERN, true),
        other => (
            other,
            [GPT2_PATTERN, CL100K_PATTERN, O200K_PATTERN].contains(&other),
        ),
    }
}

/// A compiled pre-tokenization pattern.
#[derive(Debug, Clone)]
pub struct Pretokenizer {
    regex: fancy_regex::Regex,
    pattern: String,
    named: bool,
    /// A hand-written scanner equal to `regex`, where we have one (see `scan.rs`).
    scanner: Option<fn(&str, usize) -> usize>,
}

impl Pretokenizer {
    /// Compiles a named pattern or a custom regex.
    pub fn new(name_or_regex: &str) -> Result<Self> {
        let (pattern, named) = resolve_pattern(name_or_regex);
        if pattern.is_empty() {
            return Err(Error::InvalidPattern("the pattern is empty".into()));
        }
        let regex = fancy_regex::RegexBuilder::new(pattern)
            // Whitespace runs in real text are long; the default limit rejects valid input.
            .backtrack_limit(100_000_000)
            .build()
            .map_err(|e| Error::InvalidPattern(e.to_string()))?;
        let scanner: Option<fn(&str, usize) -> usize> = match pattern {
            GPT2_PATTERN => Some(crate::scan::gpt2_piece_end),
            CL100K_PATTERN => Some(crate::scan::cl100k_piece_end),
            _ => None,
        };
        Ok(Pretokenizer {
            regex,
            pattern: pattern.to_string(),
            named,
            scanner,
        })
    }

    /// The same pattern evaluated by the regex engine only (to test the scanners).
    pub fn without_scanner(mut self) -> Self {
        self.scanner = None;
        self
    }

    /// The regex source string.
    pub fn pattern(&self) -> &str {
        &self.pattern
    }

    /// Calls `f` with every piece of `text`, in order. Text between matches (possible only
    /// with custom patterns that do not cover every character) is dropped, as in tiktoken.
    pub fn for_each_piece<'t>(&self, text: &'t str, mut f: impl FnMut(&'t str)) -> Result<()> {
        if let Some(scan) = self.scanner {
            let mut i = 0;
            while i < text.len() {
                let end = scan(text, i);
                f(&text[i..end]);
                i = end;
            }
            return Ok(());
        }
        for m in self.regex.find_iter(text) {
            let m = m.map_err(|e| Error::RegexRuntime(e.to_string()))?;
            // An empty match carries no bytes; skipping it keeps custom patterns like `a*` sane.
            if !m.as_str().is_empty() {
                f(m.as_str());
            }
        }
        Ok(())
    }

    /// The pieces of `text` as a vector (convenience for tests and small inputs).
    pub fn pieces<'t>(&self, text: &'t str) -> Result<Vec<&'t str>> {
        let mut out = Vec::new();
        self.for_each_piece(text, |p| out.push(p))?;
        Ok(out)
    }

    /// Splits `text` into chunks of roughly `target` bytes whose pieces, taken chunk by chunk,
    /// are exactly the pieces of the whole text. Only the named patterns are split (custom
    /// patterns come back whole), at a position `p` where the character before `p` is `\n`,
    /// the one before that is not whitespace, and the one at `p` is neither whitespace nor `/`.
    ///
    /// Why that is safe for all three named patterns: no alternative lets a match run from a
    /// `\n` into a following character other than whitespace or `/` (the optional
    /// one-character prefixes exclude `\r\n`; the alternatives that take `\n` take only
    /// whitespace after it, except o200k's punctuation run, which ends in `[\r\n/]*`), and a
    /// lone `\n` after a non-space is a piece of its own (or ends a punctuation piece) both in
    /// the whole text and at the end of a chunk, since `\s++$`, `\s*[\r\n]` and `\s*[\r\n]+`
    /// take exactly that `\n` there. Property tests check this against the regex.
    pub fn split_points(&self, text: &str, target: usize) -> Vec<usize> {
        let mut cuts = Vec::new();
        if !self.named || target == 0 {
            return cuts;
        }
        let bytes = text.as_bytes();
        let mut from = target;
        while from < bytes.len() {
            match find_safe_cut(text, from) {
                Some(p) => {
                    cuts.push(p);
                    from = p + target;
                }
                None => break,
            }
        }
        cuts
    }
}

/// The first safe cut position at or after `from` (see [`Pretokenizer::split_points`]).
fn find_safe_cut(text: &str, from: usize) -> Option<usize> {
    let bytes = text.as_bytes();
    let mut i = from.max(2);
    while i < bytes.len() {
        // memchr-like scan for the newline that precedes the cut.
        let nl = i - 1 + bytes[i - 1..].iter().position(|&b| b == b'\n')?;
        let p = nl + 1;
        if p >= bytes.len() {
            return None;
        }
        let before = text[..nl].chars().next_back();
        let after = text[p..].chars().next();
        if let (Some(b), Some(a)) = (before, after) {
            if !b.is_whitespace() && !a.is_whitespace() && a != '/' {
                return Some(p);
            }
        }
        i = p + 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_patterns_compile() {
        for name in ["gpt2", "r50k", "cl100k", "gpt4", "o200k"] {
            Pretokenizer::new(name).unwrap();
        }
    }

    #[test]
    fn invalid_pattern_is_an_error() {
        assert!(matches!(
            Pretokenizer::new("(unclosed"),
            Err(Error::InvalidPattern(_))
        ));
    }

    #[test]
    fn gpt2_pieces() {
        let p = Pretokenizer::new("gpt2").unwrap();
        assert_eq!(
            p.pieces("Hello world's  123 !!\n\n").unwrap(),
            vec!["Hello", " world", "'s", " ", " 123", " !!", "\n\n"]
        );
    }

    #[test]
    fn split_points_preserve_pieces() {
        let text =
            "First line.\nSecond line here\n\n  indented\nx\ny 12345\n\u{e9}t\u{e9}\nfin!\n/x";
        for name in ["gpt2", "cl100k", "o200k"] {
            let p = Pretokenizer::new(name).unwrap();
            let whole = p.pieces(text).unwrap();
            for target in 1..text.len() {
                let cuts = p.split_points(text, target);
                let mut pieces = Vec::new();
                let mut start = 0;
                for &c in cuts.iter().chain(std::iter::once(&text.len())) {
                    pieces.extend(p.pieces(&text[start..c]).unwrap());
                    start = c;
                }
                assert_eq!(
                    pieces, whole,
                    "pattern {name}, target {target}, cuts {cuts:?}"
                );
            }
        }
    }
}
