//! Sealing and opening streams (`keybroker::envelope::stream`) with a fixed data key, on
//! fuzzer-chosen headers, contexts, payload sizes (up to three segments, so that small inputs
//! reach the segment logic) and chunkings, then one fuzzer-chosen change to the sealed stream:
//! a byte flipped, the stream cut, a segment dropped, repeated or swapped, bytes appended, or
//! another key or context.
//!
//! What must hold: an unchanged stream opens to its payload under any chunking; a changed one
//! never finishes, and whatever it released before failing is a prefix of the payload at the
//! right offset (no segment is released out of place).

#![no_main]

use std::collections::BTreeMap;

use keybroker::envelope::WrappedCopy;
use keybroker::envelope::stream::{self, SEALED_SEGMENT_LEN, SEGMENT_LEN};
use keybroker::secret::SecretKey;
use keybroker_fuzz::bounded;
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
enum Change<'a> {
    None,
    Flip { at: u32, mask: u8 },
    Cut { at: u32 },
    DropSegment { index: u8 },
    RepeatSegment { index: u8 },
    SwapSegments { a: u8, b: u8 },
    Append { bytes: &'a [u8] },
    OtherKey,
    OtherContext,
}

#[derive(Arbitrary, Debug)]
struct Input<'a> {
    key_name: &'a str,
    caller: &'a str,
    copies: Vec<(u8, &'a str, &'a str, &'a [u8])>,
    context: Vec<(&'a str, &'a str)>,
    /// Payload length modulo three segments and a bit (the payload itself is a pattern).
    payload_len: u32,
    pattern: u8,
    salt: [u8; keybroker::envelope::SALT_LEN],
    /// Chunk sizes for sealing and for opening (0: all at once).
    seal_chunk: u16,
    open_chunk: u16,
    change: Change<'a>,
}

const DATA_KEY: [u8; 32] = *b"keybroker fuzz fixed data key 32";
const MAX_PAYLOAD: usize = 3 * SEGMENT_LEN + 2;

fn chunk(n: u16) -> usize {
    if n == 0 { usize::MAX } else { n as usize }
}

/// Seals `payload` as a stream, pushing it in chunks of `chunk_len`.
fn seal(
    input: &Input<'_>,
    copies: &[WrappedCopy<'_>],
    context: &BTreeMap<String, String>,
    payload: &[u8],
) -> Option<(Vec<u8>, usize)> {
    let key = SecretKey::from_slice(&DATA_KEY);
    let (mut out, mut sealer) = stream::seal_stream_with_salt(
        input.key_name,
        input.caller,
        copies,
        &key,
        context,
        &input.salt,
    )
    .ok()?;
    let header_len = out.len();
    for mut piece in payload.chunks(chunk(input.seal_chunk)) {
        while !piece.is_empty() {
            if let Some(segment) = sealer.push(&mut piece).expect("sealing a segment") {
                assert_eq!(segment.len(), SEALED_SEGMENT_LEN);
                out.extend_from_slice(&segment);
            }
        }
    }
    out.extend_from_slice(&sealer.finish().expect("sealing the last segment"));
    Some((out, header_len))
}

/// Opens `bytes` in chunks of `chunk_len`: the plaintext released, and whether it finished.
fn open(
    bytes: &[u8],
    key: &SecretKey,
    context: &BTreeMap<String, String>,
    chunk_len: usize,
) -> (Vec<u8>, bool) {
    let mut released = Vec::new();
    let Ok(Some((header, n))) = stream::parse_header(bytes) else {
        return (released, false);
    };
    let Ok(mut opener) = header.opener(key, context) else {
        return (released, false);
    };
    for mut piece in bytes[n..].chunks(chunk_len) {
        while !piece.is_empty() {
            match opener.push(&mut piece) {
                Ok(Some(segment)) => released.extend_from_slice(&segment),
                Ok(None) => {}
                Err(_) => return (released, false),
            }
        }
    }
    match opener.finish() {
        Ok(last) => {
            released.extend_from_slice(&last);
            (released, true)
        }
        Err(_) => (released, false),
    }
}

/// The unchanged stream opens to its payload.
fn check_unchanged(
    sealed: &[u8],
    payload: &[u8],
    context: &BTreeMap<String, String>,
    chunk_len: usize,
) {
    let (opened, finished) = open(
        sealed,
        &SecretKey::from_slice(&DATA_KEY),
        context,
        chunk_len,
    );
    assert!(
        finished && opened == payload,
        "an unchanged stream did not open"
    );
}

fuzz_target!(|input: Input<'_>| {
    let payload_len = input.payload_len as usize % (MAX_PAYLOAD + 1);
    let fields = input.key_name.len()
        + input.caller.len()
        + input
            .copies
            .iter()
            .map(|c| c.1.len() + c.2.len() + c.3.len() + 1)
            .sum::<usize>()
        + input
            .context
            .iter()
            .map(|(k, v)| k.len() + v.len())
            .sum::<usize>();
    // The payload is generated, so it counts as input: a few copies of it are live at once
    // (payload, stream, changed stream, released plaintext).
    bounded(fields + 64 + payload_len, || {
        let payload: Vec<u8> = (0..payload_len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(input.pattern))
            .collect();
        let copies = keybroker_fuzz::copies(&input.copies);
        let context = keybroker_fuzz::context(&input.context);
        let Some((sealed, header_len)) = seal(&input, &copies, &context, &payload) else {
            return;
        };
        let segments = sealed[header_len..].len().div_ceil(SEALED_SEGMENT_LEN);
        assert_eq!(segments, payload_len.div_ceil(SEGMENT_LEN).max(1));

        let key = SecretKey::from_slice(&DATA_KEY);
        let open_chunk = chunk(input.open_chunk);
        let (opened, finished) = open(&sealed, &key, &context, open_chunk);
        assert!(finished, "a sealed stream did not open");
        assert!(
            opened == payload,
            "a sealed stream opened to another payload"
        );

        // The segment ranges of the sealed stream, for the segment-level changes.
        let segment = |i: usize| {
            let start = header_len + i * SEALED_SEGMENT_LEN;
            start..(start + SEALED_SEGMENT_LEN).min(sealed.len())
        };
        let mut key_used = key;
        let mut context_used = context.clone();
        let changed: Vec<u8> = match input.change {
            Change::None => sealed.clone(),
            Change::Flip { at, mask } => {
                let mut c = sealed.clone();
                let at = at as usize % c.len();
                c[at] ^= if mask == 0 { 1 } else { mask };
                c
            }
            Change::Cut { at } => sealed[..at as usize % sealed.len()].to_vec(),
            Change::DropSegment { index } => {
                let mut c = sealed.clone();
                c.drain(segment(index as usize % segments));
                c
            }
            Change::RepeatSegment { index } => {
                let r = segment(index as usize % segments);
                let mut c = sealed[..r.end].to_vec();
                c.extend_from_slice(&sealed[r.clone()]);
                c.extend_from_slice(&sealed[r.end..]);
                c
            }
            Change::SwapSegments { a, b } => {
                let (a, b) = (a as usize % segments, b as usize % segments);
                let (lo, hi) = (a.min(b), a.max(b));
                if lo == hi {
                    // Swapping a segment with itself changes nothing (checked as unchanged).
                    return check_unchanged(&sealed, &payload, &context, open_chunk);
                }
                let (lo, hi) = (segment(lo), segment(hi));
                let mut c = sealed[..lo.start].to_vec();
                c.extend_from_slice(&sealed[hi.clone()]);
                c.extend_from_slice(&sealed[lo.end..hi.start]);
                c.extend_from_slice(&sealed[lo.clone()]);
                c.extend_from_slice(&sealed[hi.end..]);
                c
            }
            Change::Append { bytes } => {
                let mut c = sealed.clone();
                c.extend_from_slice(if bytes.is_empty() { &[0] } else { bytes });
                c
            }
            Change::OtherKey => {
                key_used = SecretKey::from_slice(&[0x5a; 32]);
                sealed.clone()
            }
            Change::OtherContext => {
                context_used.insert("fuzz".to_owned(), "other".to_owned());
                sealed.clone()
            }
        };
        let unchanged =
            changed == sealed && key_used.as_ref() == &DATA_KEY[..] && context_used == context;
        if unchanged {
            check_unchanged(&sealed, &payload, &context, open_chunk);
        } else {
            let (opened, finished) = open(&changed, &key_used, &context_used, open_chunk);
            assert!(!finished, "a changed stream opened: {:?}", input.change);
            assert!(
                payload.starts_with(&opened),
                "a changed stream released plaintext out of place"
            );
        }
    });
});
