//! Hand-written pre-tokenizers for the GPT-2 and cl100k patterns.
//!
//! Each scanner returns exactly the matches of its regex (checked against fancy-regex here
//! and against Python's `regex` in the property tests) several times faster than the
//! backtracking engine. The Unicode classes come from `regex-syntax`, the same tables the
//! regex engine uses, so both agree on every code point.
//!
//! The comments on each scanner derive its rules from the regex, alternative by alternative:
//! at position `i` the regex tries alternatives in order and takes the first that matches.

use std::sync::OnceLock;

use regex_syntax::hir::{Class, HirKind};

const L: u8 = 1; // \p{L}
const N: u8 = 2; // \p{N}
const S: u8 = 4; // \s (White_Space)

struct Classes {
    bmp: Vec<u8>,
    astral: Vec<(u32, u32, u8)>,
}

fn ranges(class: &str) -> Vec<(u32, u32)> {
    let hir = regex_syntax::Parser::new()
        .parse(class)
        .expect("valid class");
    match hir.kind() {
        HirKind::Class(Class::Unicode(c)) => c
            .ranges()
            .iter()
            .map(|r| (r.start() as u32, r.end() as u32))
            .collect(),
        _ => unreachable!("a Unicode class"),
    }
}

fn classes() -> &'static Classes {
    static CLASSES: OnceLock<Classes> = OnceLock::new();
    CLASSES.get_or_init(|| {
        let mut bmp = vec![0u8; 0x10000];
        let mut astral: Vec<(u32, u32, u8)> = Vec::new();
        for (flag, class) in [(L, r"\p{L}"), (N, r"\p{N}"), (S, r"\s")] {
            for (a, b) in ranges(class) {
                for c in a..=b.min(0xFFFF) {
                    bmp[c as usize] |= flag;
                }
                if b > 0xFFFF {
                    astral.push((a.max(0x10000), b, flag));
                }
            }
        }
        // The three classes are disjoint, so astral ranges never overlap.
        astral.sort_unstable();
        Classes { bmp, astral }
    })
}

#[inline(always)]
fn class_of(c: char) -> u8 {
    let c = c as u32;
    if c < 0x10000 {
        return classes().bmp[c as usize];
    }
    astral_class_of(c)
}

/// Kept out of line so that [`at`], which runs once per non-ASCII character, stays small
/// enough to inline.
#[inline(never)]
fn astral_class_of(c: u32) -> u8 {
    let t = classes();
    match t.astral.binary_search_by(|&(a, b, _)| {
        if b < c {
            std::cmp::Ordering::Less
        } else if a > c {
            std::cmp::Ordering::Greater
        } else {
            std::cmp::Ordering::Equal
        }
    }) {
        Ok(k) => t.astral[k].2,
        Err(_) => 0,
    }
}

/// Classes of the ASCII characters, fixed at compile time (a test checks them against the
/// regex engine): a table probe per byte is what keeps ASCII text fast.
static ASCII: [u8; 128] = {
    let mut t = [0u8; 128];
    let mut b = 0;
    while b < 128 {
        let c = b as u8;
        t[b] = if c.is_ascii_alphabetic() {
            L
        } else if c.is_ascii_digit() {
            N
        } else if matches!(c, b'\t' | b'\n' | 0x0B | 0x0C | b'\r' | b' ') {
            S
        } else {
            0
        };
        b += 1;
    }
    t
};

/// The character at byte `i` with its class and UTF-8 length.
#[inline(always)]
fn at(s: &str, i: usize) -> Option<(char, u8, usize)> {
    let b = *s.as_bytes().get(i)?;
    if b < 0x80 {
        return Some((b as char, ASCII[b as usize], 1));
    }
    // `s` is valid UTF-8 and `i` a character boundary, so the sequence is decoded from its
    // lead byte without the re-validation of `s[i..].chars()`.
    debug_assert!(s.is_char_boundary(i));
    let bs = s.as_bytes();
    let (c, n) = if b < 0xE0 {
        (((b & 0x1F) as u32) << 6 | (bs[i + 1] & 0x3F) as u32, 2)
    } else if b < 0xF0 {
        (
            ((b & 0x0F) as u32) << 12
                | ((bs[i + 1] & 0x3F) as u32) << 6
                | (bs[i + 2] & 0x3F) as u32,
            3,
        )
    } else {
        (
            ((b & 0x07) as u32) << 18
                | ((bs[i + 1] & 0x3F) as u32) << 12
                | ((bs[i + 2] & 0x3F) as u32) << 6
                | (bs[i + 3] & 0x3F) as u32,
            4,
        )
    };
    // Never None: a valid sequence decodes to a scalar value.
    let c = char::from_u32(c)?;
    Some((c, class_of(c), n))
}

/// "Other": neither whitespace, letter nor number (the `[^\s\p{L}\p{N}]` class).
#[inline]
fn is_other(cls: u8) -> bool {
    cls == 0
}

/// End of the run of characters from `i` whose class is exactly `kind` (the three classes
/// are disjoint, so "letter", "number", "whitespace" and "other" are each one value). ASCII
/// bytes are checked in a tight byte loop; only non-ASCII characters are decoded.
#[inline]
fn run_of(s: &str, mut i: usize, kind: u8) -> usize {
    let b = s.as_bytes();
    loop {
        while let Some(&x) = b.get(i) {
            if x >= 0x80 {
                break;
            }
            if ASCII[x as usize] != kind {
                return i;
            }
            i += 1;
        }
        match at(s, i) {
            Some((_, k, n)) if k == kind => i += n,
            _ => return i,
        }
    }
}

/// End of the run of `\r`/`\n` bytes from `i`.
#[inline]
fn newlines_end(s: &str, mut i: usize) -> usize {
    let b = s.as_bytes();
    while matches!(b.get(i), Some(b'\r' | b'\n')) {
        i += 1;
    }
    i
}

/// Length of a contraction suffix (`s d m t ll ve re`) at the start of `s`.
/// `fold`: case-insensitive, using Unicode simple case folding as the regex engines do
/// (so `ſ`, U+017F LATIN SMALL LETTER LONG S, matches `s`).
#[inline]
fn contraction(s: &str, fold: bool) -> Option<usize> {
    let mut it = s.chars();
    let c1 = it.next()?;
    let eq = |c: char, want: char| -> bool {
        c == want || (fold && (c.to_ascii_lowercase() == want || (want == 's' && c == '\u{17F}')))
    };
    for one in ['s', 'd', 'm', 't'] {
        if eq(c1, one) {
            return Some(c1.len_utf8());
        }
    }
    let c2 = it.next()?;
    for (a, b) in [('l', 'l'), ('v', 'e'), ('r', 'e')] {
        if eq(c1, a) && eq(c2, b) {
            return Some(c1.len_utf8() + c2.len_utf8());
        }
    }
    None
}

/// The most common piece in any text, an ASCII letter or a space then an ASCII letter, and
/// the letters after it: both patterns take exactly that as one piece (GPT-2's ` ?\p{L}++`,
/// cl100k's `[^\r\n\p{L}\p{N}]?+\p{L}++`; no earlier alternative starts with a letter or a
/// space). `None` sends every other start to the general code.
#[inline(always)]
fn ascii_word(s: &str, i: usize) -> Option<usize> {
    let b = s.as_bytes();
    let is_letter = |x: u8| (x | 0x20).wrapping_sub(b'a') < 26;
    let start = match b.get(i) {
        Some(&x) if is_letter(x) => i + 1,
        Some(b' ') if b.get(i + 1).is_some_and(|&x| is_letter(x)) => i + 2,
        _ => return None,
    };
    let mut j = start;
    while j < b.len() && is_letter(b[j]) {
        j += 1;
    }
    // A non-ASCII byte may continue the run with a non-ASCII letter.
    Some(if j < b.len() && b[j] >= 0x80 {
        run_of(s, j, L)
    } else {
        j
    })
}

/// The end of the whitespace handling shared by both patterns once no earlier alternative
/// matched at whitespace `i` whose run ends at `r`: `\s++$` takes the run if it ends the text;
/// `\s+(?!\S)` takes all but the last whitespace character if the run has two or more;
/// otherwise `\s` takes the single character.
#[inline]
fn whitespace_tail(s: &str, i: usize, r: usize, first_len: usize) -> usize {
    if r == s.len() {
        return r;
    }
    let last = s[..r].chars().next_back().map_or(0, char::len_utf8);
    if r - last > i {
        r - last
    } else {
        i + first_len
    }
}

/// `'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s`
pub fn gpt2_piece_end(s: &str, i: usize) -> usize {
    if let Some(end) = ascii_word(s, i) {
        return end;
    }
    let Some((c, cls, n)) = at(s, i) else {
        return i;
    };
    // Alternative 1: an apostrophe contraction.
    if c == '\'' {
        if let Some(k) = contraction(&s[i + 1..], false) {
            return i + 1 + k;
        }
    }
    // Alternatives 2-4: an optional space, then a run of one kind (letters, numbers or
    // other). A space followed by any non-space character always takes one of them.
    let (start, kind) = if c == ' ' {
        match at(s, i + 1) {
            Some((_, next, _)) if next & S == 0 => (i + 1, next),
            _ => (i, cls),
        }
    } else {
        (i, cls)
    };
    if kind & S == 0 {
        return run_of(s, start, kind);
    }
    // Alternatives 5-7 on a whitespace run.
    let r = run_of(s, i, S);
    whitespace_tail(s, i, r, n)
}

/// `'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s`
pub fn cl100k_piece_end(s: &str, i: usize) -> usize {
    if let Some(end) = ascii_word(s, i) {
        return end;
    }
    let Some((c, cls, n)) = at(s, i) else {
        return i;
    };
    // Alternative 1: a contraction, case-insensitive.
    if c == '\'' {
        if let Some(k) = contraction(&s[i + 1..], true) {
            return i + 1 + k;
        }
    }
    // Alternative 2: letters, optionally preceded by one character that is not \r, \n, a
    // letter or a number (possessive: if that character is there but no letter follows,
    // the alternative fails rather than retrying without it).
    if cls == L {
        return run_of(s, i, L);
    }
    if cls & N == 0 && c != '\r' && c != '\n' {
        if let Some((_, next, _)) = at(s, i + n) {
            if next == L {
                return run_of(s, i + n, L);
            }
        }
    }
    // Alternative 3: one to three numbers.
    if cls == N {
        let mut j = i + n;
        for _ in 0..2 {
            match at(s, j) {
                Some((_, N, m)) => j += m,
                _ => break,
            }
        }
        return j;
    }
    // Alternative 4: an optional space, a run of "other" characters, then any \r/\n run.
    let start = if c == ' ' {
        match at(s, i + 1) {
            Some((_, next, _)) if is_other(next) => i + 1,
            _ => i,
        }
    } else {
        i
    };
    if let Some((_, k, _)) = at(s, start) {
        if is_other(k) {
            let j = run_of(s, start, 0);
            return newlines_end(s, j);
        }
    }
    // Here `c` is whitespace. Alternative 5 (`\s++$`) is `whitespace_tail`'s first case;
    // alternative 6 (`\s*[\r\n]`) comes before the rest of it: the greedy `\s*` backs off to
    // the last \r or \n of the run.
    let r = run_of(s, i, S);
    if r == s.len() {
        return r;
    }
    if let Some(k) = s.as_bytes()[i..r]
        .iter()
        .rposition(|&b| b == b'\r' || b == b'\n')
    {
        return i + k + 1;
    }
    whitespace_tail(s, i, r, n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pretokenize::{CL100K_PATTERN, GPT2_PATTERN};

    fn by_regex(re: &fancy_regex::Regex, s: &str) -> Vec<String> {
        re.find_iter(s)
            .map(|m| m.unwrap().as_str().to_string())
            .collect()
    }

    fn by_scan(f: fn(&str, usize) -> usize, s: &str) -> Vec<String> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < s.len() {
            let e = f(s, i);
            assert!(e > i, "no progress at {i} in {s:?}");
            out.push(s[i..e].to_string());
            i = e;
        }
        out
    }

    /// A small deterministic generator of adversarial strings (the Python property tests
    /// cover far more; this keeps `cargo test` self-contained).
    fn samples() -> Vec<String> {
        let atoms = [
            "'s", "'S", "'ll", "'LL", "'Re", "'ve", "'\u{17F}", "'x", "''", " ", "  ", "\t", "\n",
            "\r\n", "\r", " \n", "\u{a0}", "\u{3000}", "0", "12", "1234", "٣", "½", "a", "The",
            " the", "é", "e\u{301}", "😀", "中文", "!", "?!", "(", "/", "\u{0}", "\u{1b}", "𝔘",
            "𝟙", "\u{2028}",
        ];
        let mut out = Vec::new();
        let mut state = 0x9E3779B97F4A7C15u64;
        for _ in 0..4000 {
            let mut s = String::new();
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let len = (state % 12) as usize;
            for _ in 0..len {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                s.push_str(atoms[(state % atoms.len() as u64) as usize]);
            }
            out.push(s);
        }
        out
    }

    #[test]
    fn gpt2_scanner_equals_regex() {
        let re = fancy_regex::Regex::new(GPT2_PATTERN).unwrap();
        for s in samples() {
            assert_eq!(by_scan(gpt2_piece_end, &s), by_regex(&re, &s), "{s:?}");
        }
    }

    #[test]
    fn cl100k_scanner_equals_regex() {
        let re = fancy_regex::Regex::new(CL100K_PATTERN).unwrap();
        for s in samples() {
            assert_eq!(by_scan(cl100k_piece_end, &s), by_regex(&re, &s), "{s:?}");
        }
    }

    #[test]
    fn ascii_table_matches_unicode_classes() {
        for b in 0u8..128 {
            assert_eq!(ASCII[b as usize], class_of(b as char), "byte {b:#04x}");
        }
    }

    #[test]
    fn classes_match_the_regex_engine() {
        let l = regex::Regex::new(r"^\p{L}$").unwrap();
        let n = regex::Regex::new(r"^\p{N}$").unwrap();
        let w = regex::Regex::new(r"^\s$").unwrap();
        for cp in (0u32..0x110000).step_by(7) {
            if let Some(c) = char::from_u32(cp) {
                let s = c.to_string();
                let flag = |re: &regex::Regex, f: u8| if re.is_match(&s) { f } else { 0 };
                let want = flag(&l, L) | flag(&n, N) | flag(&w, S);
                assert_eq!(class_of(c), want, "U+{cp:04X}");
            }
        }
    }
}
