//! The properties of the admin socket's `:authority` rewriter that the
//! `authority` fuzz target checks on every input, and that `make test`
//! checks on every file of the committed corpus (tests/fuzz_corpus.rs).
//!
//! The input's first byte seeds the chunking; the rest follows the HTTP/2
//! preface (added here, so the fuzzer spends its time on frames). Beyond
//! "never panics":
//!
//! - Feeding the input in arbitrary chunks (a byte at a time, and cut
//!   points drawn from the seed) gives the output and the error of one call
//!   on the whole input.
//! - The output is HTTP/2 the rewriter itself accepts, and rewriting it
//!   again changes nothing: it holds only literals without indexing, valid
//!   authorities, no padding or priority, header frames of at most
//!   `MAX_FRAME`.

use crate::authority::{Rewriter, ShimError, MAX_FRAME, PREFACE};

fn run(input: &[u8], sizes: &mut dyn Iterator<Item = usize>) -> (Vec<u8>, Option<ShimError>) {
    let mut rewriter = Rewriter::new();
    let mut out = Vec::new();
    let mut rest = input;
    while !rest.is_empty() {
        let n = sizes.next().unwrap_or(rest.len()).clamp(1, rest.len());
        let (chunk, tail) = rest.split_at(n);
        rest = tail;
        if let Err(err) = rewriter.feed(chunk, &mut out) {
            // Sticky: later input gets the same answer and adds nothing.
            let before = out.len();
            assert_eq!(rewriter.feed(rest, &mut out).err(), Some(err.clone()));
            assert_eq!(out.len(), before);
            return (out, Some(err));
        }
    }
    (out, None)
}

pub fn check(data: &[u8]) {
    let Some((&seed, body)) = data.split_first() else {
        return;
    };
    let mut input = PREFACE.to_vec();
    input.extend_from_slice(body);
    let whole = run(&input, &mut std::iter::empty());

    assert_eq!(
        run(&input, &mut std::iter::repeat(1)),
        whole,
        "byte at a time"
    );
    let mut x = u64::from(seed) | 1;
    let mut lcg = std::iter::from_fn(move || {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        Some(((x >> 33) % (u64::from(seed % 64) + 2)) as usize + 1)
    });
    assert_eq!(run(&input, &mut lcg), whole, "chunks from seed {seed}");

    let (out, err) = &whole;
    assert!(out.starts_with(&input[..input.len().min(PREFACE.len())]));
    if err.is_none() {
        let again = run(out, &mut std::iter::empty());
        assert_eq!(again.1, None, "the rewriter refuses its own output");
        assert_eq!(&again.0, out, "rewriting the output changes it");
        check_header_frames(out);
    }
}

/// Every HEADERS/CONTINUATION frame of the output is at most `MAX_FRAME`
/// and has neither PADDED nor PRIORITY.
fn check_header_frames(out: &[u8]) {
    let mut rest = &out[PREFACE.len()..];
    while rest.len() >= 9 {
        let len = usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]);
        let (kind, flags) = (rest[3], rest[4]);
        if matches!(kind, 0x1 | 0x9) {
            assert!(len <= MAX_FRAME, "header frame of {len} bytes");
            assert_eq!(flags & 0x28, 0, "PADDED or PRIORITY left on a header frame");
        }
        if rest.len() < 9 + len {
            break;
        }
        rest = &rest[9 + len..];
    }
}
