//! The stream envelope (format version 2, kind 4): a payload of any size sealed in fixed-size
//! segments, so that it can be encrypted and decrypted in bounded memory (EncryptStream,
//! DecryptStream). `docs/envelope.md` ("Kind 4: streams") is the specification and
//! `tests/vectors/envelope-stream.json` its test vectors.
//!
//! The header is the unary header with kind 4, and the per-message key and key commitment come
//! from the same version 2 derivation (so they bind the data key, the header and the context).
//! The body is the STREAM construction (Hoang, Reyhanitabar, Rogaway, Vizár 2015, as in age and
//! Tink): segment `i` is AES-256-GCM under the message key with nonce
//! `0^7 || u32be(i) || final`, where `final` is 1 for the last segment and 0 for all others.
//! Every segment but the last carries exactly [`SEGMENT_LEN`] bytes of plaintext; the last
//! carries 1 to [`SEGMENT_LEN`] bytes (0 only when the whole payload is empty).
//!
//! What this module must never do: release the plaintext of a segment before its tag verified,
//! accept a stream whose last segment was not sealed as the last one (truncation), accept bytes
//! after it (appending), or accept a segment at another position (reordering, duplication,
//! dropping): the index and the final flag are in every nonce. It holds at most one segment of
//! each direction in memory.

use std::collections::BTreeMap;

use aws_lc_rs::{aead, constant_time};
use zeroize::Zeroize;

use super::{
    COMMITMENT_LEN, FORMAT_VERSION, FormatError, MAX_COPIES, MAX_KEY_ID_LEN, MAX_NAME_LEN,
    MAX_VERSION_LEN, MAX_WRAPPED_LEN, SALT_LEN, SealError, TAG_LEN, Unauthentic, WrappedCopy,
    derive, extract, read_header, write_header_prefix,
};
use crate::secret::{SecretKey, random_fill};

/// The kind byte of a stream envelope.
pub const STREAM_KIND: u8 = 4;
/// Plaintext bytes per segment (all but the last, which may be shorter).
pub const SEGMENT_LEN: usize = 64 << 10;
/// Ciphertext bytes of a full segment.
pub const SEALED_SEGMENT_LEN: usize = SEGMENT_LEN + TAG_LEN;
/// The longest header the format allows: a parser that has this many bytes and still sees a
/// truncated header has a malformed one.
pub const MAX_HEADER_LEN: usize = 4
    + 2 * (1 + MAX_NAME_LEN)
    + 1
    + MAX_COPIES * (1 + 6 + MAX_KEY_ID_LEN + MAX_VERSION_LEN + MAX_WRAPPED_LEN)
    + SALT_LEN
    + COMMITMENT_LEN;

/// The nonce of segment `index`: seven zero bytes, the index (big-endian), the final flag.
/// Every message key is fresh (random salt), so no prefix is needed to keep nonces unique.
fn nonce(index: u32, last: bool) -> aead::Nonce {
    let mut n = [0u8; 12];
    n[7..11].copy_from_slice(&index.to_be_bytes());
    n[11] = u8::from(last);
    aead::Nonce::assume_unique_for_key(n)
}

/// The message key of a stream, from the version 2 derivation over header-up-to-the-salt and
/// the canonical context; also returns the commitment.
fn stream_key(
    data_key: &SecretKey,
    salt: &[u8; SALT_LEN],
    prefix: &[u8],
    context: &BTreeMap<String, String>,
) -> Result<(aead::LessSafeKey, [u8; COMMITMENT_LEN]), aws_lc_rs::error::Unspecified> {
    let mut bound = Vec::with_capacity(prefix.len() + 2 + context.len() * 32);
    bound.extend_from_slice(prefix);
    crate::context::encode_map(context, &mut bound);
    let prk = extract(data_key, salt);
    let material = derive(FORMAT_VERSION, &prk, &bound)?;
    let mut commitment = [0u8; COMMITMENT_LEN];
    commitment.copy_from_slice(material.commitment());
    Ok((material.aead_key()?, commitment))
}

/// Starts a stream envelope with a fresh random salt: returns its header (to be sent first) and
/// the sealer for the payload.
pub fn seal_stream(
    key_name: &str,
    caller: &str,
    copies: &[WrappedCopy<'_>],
    data_key: &SecretKey,
    context: &BTreeMap<String, String>,
) -> Result<(Vec<u8>, StreamSealer), SealError> {
    let mut salt = [0u8; SALT_LEN];
    random_fill(&mut salt)?;
    seal_stream_with_salt(key_name, caller, copies, data_key, context, &salt)
}

/// [`seal_stream`] with a chosen salt: for test vectors only (a salt must never repeat under
/// one data key).
pub fn seal_stream_with_salt(
    key_name: &str,
    caller: &str,
    copies: &[WrappedCopy<'_>],
    data_key: &SecretKey,
    context: &BTreeMap<String, String>,
    salt: &[u8; SALT_LEN],
) -> Result<(Vec<u8>, StreamSealer), SealError> {
    let mut header = write_header_prefix(
        FORMAT_VERSION,
        STREAM_KIND,
        key_name,
        caller,
        copies,
        salt,
        COMMITMENT_LEN,
    )?;
    let (key, commitment) =
        stream_key(data_key, salt, &header, context).map_err(|_| SealError::Crypto)?;
    header.extend_from_slice(&commitment);
    Ok((
        header,
        StreamSealer {
            key,
            index: 0,
            buf: Vec::with_capacity(SEALED_SEGMENT_LEN),
        },
    ))
}

/// Seals a payload segment by segment. A full segment is sealed only once more input arrives
/// (only then is it known not to be the last); [`StreamSealer::finish`] seals the last.
pub struct StreamSealer {
    key: aead::LessSafeKey,
    index: u32,
    /// Plaintext of the segment being filled (at most [`SEGMENT_LEN`] bytes).
    buf: Vec<u8>,
}

impl std::fmt::Debug for StreamSealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamSealer")
            .field("index", &self.index)
            .finish()
    }
}

impl StreamSealer {
    /// Takes bytes from the front of `input` into the current segment; returns a sealed
    /// (non-final) segment when one is complete and `input` still has bytes. Call until `input`
    /// is empty: memory stays at one segment however large `input` is.
    pub fn push(&mut self, input: &mut &[u8]) -> Result<Option<Vec<u8>>, SealError> {
        if self.buf.len() == SEGMENT_LEN && !input.is_empty() {
            return self.seal_segment(false).map(Some);
        }
        let n = (SEGMENT_LEN - self.buf.len()).min(input.len());
        self.buf.extend_from_slice(&input[..n]);
        *input = &input[n..];
        Ok(None)
    }

    /// Seals the last segment (whatever the current segment holds).
    pub fn finish(mut self) -> Result<Vec<u8>, SealError> {
        self.seal_segment(true)
    }

    fn seal_segment(&mut self, last: bool) -> Result<Vec<u8>, SealError> {
        let mut seg = std::mem::replace(&mut self.buf, Vec::with_capacity(SEALED_SEGMENT_LEN));
        self.key
            .seal_in_place_append_tag(nonce(self.index, last), aead::Aad::empty(), &mut seg)
            .map_err(|_| SealError::Crypto)?;
        // 2^32 segments (256 TiB) is the format's limit.
        self.index = self
            .index
            .checked_add(1)
            .ok_or(SealError::TooLong("stream"))?;
        Ok(seg)
    }
}

impl Drop for StreamSealer {
    fn drop(&mut self) {
        self.buf.zeroize();
    }
}

/// A parsed, not yet authenticated, stream header.
#[derive(Debug)]
pub struct StreamHeader<'a> {
    pub key_name: &'a str,
    pub caller: &'a str,
    pub copies: Vec<WrappedCopy<'a>>,
    salt: &'a [u8; SALT_LEN],
    commitment: &'a [u8],
    header: &'a [u8],
}

/// Parses a stream header from the first bytes of a stream. `Ok(None)`: more bytes are needed
/// (the input is a prefix of a header that may still be well formed). `Ok(Some((h, n)))`: the
/// header is the first `n` bytes. A unary envelope is refused with the kind's error.
pub fn parse_header(input: &[u8]) -> Result<Option<(StreamHeader<'_>, usize)>, FormatError> {
    // The fixed start (magic, version, kind), as far as it has arrived.
    let start = [
        super::MAGIC[0],
        super::MAGIC[1],
        FORMAT_VERSION,
        STREAM_KIND,
    ];
    let seen = input.len().min(start.len());
    if input[..seen] != start[..seen] {
        return Err(if input[..seen.min(2)] != start[..seen.min(2)] {
            FormatError::BadMagic
        } else {
            FormatError::NotAStream
        });
    }
    if seen < start.len() {
        return Ok(None);
    }
    let raw = match read_header(input) {
        Ok(raw) => raw,
        Err(FormatError::Truncated(_)) if input.len() < MAX_HEADER_LEN => return Ok(None),
        Err(e) => return Err(e),
    };
    let n = raw.header_end;
    Ok(Some((
        StreamHeader {
            key_name: raw.key_name,
            caller: raw.caller,
            copies: raw.copies,
            salt: raw.salt,
            commitment: raw.commitment,
            header: &input[..n],
        },
        n,
    )))
}

impl StreamHeader<'_> {
    /// Checks the key commitment (in constant time) and returns the opener for the segments.
    /// Fails, opaquely, for a wrong data key, a wrong context or a tampered header.
    pub fn opener(
        &self,
        data_key: &SecretKey,
        context: &BTreeMap<String, String>,
    ) -> Result<StreamOpener, Unauthentic> {
        let prefix = &self.header[..self.header.len() - COMMITMENT_LEN];
        let (key, commitment) =
            stream_key(data_key, self.salt, prefix, context).map_err(|_| Unauthentic)?;
        constant_time::verify_slices_are_equal(&commitment, self.commitment)
            .map_err(|_| Unauthentic)?;
        Ok(StreamOpener {
            key,
            index: 0,
            buf: Vec::with_capacity(SEALED_SEGMENT_LEN),
        })
    }
}

/// Opens a stream's segments in order, releasing each segment's plaintext only after its tag
/// verified. A full-size segment is opened only once more input arrives (only then is it known
/// not to be the last); [`StreamOpener::finish`] opens the last.
pub struct StreamOpener {
    key: aead::LessSafeKey,
    index: u32,
    /// Ciphertext of the segment being filled (at most [`SEALED_SEGMENT_LEN`] bytes).
    buf: Vec<u8>,
}

impl std::fmt::Debug for StreamOpener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamOpener")
            .field("index", &self.index)
            .finish()
    }
}

impl StreamOpener {
    /// Takes bytes from the front of `input`; returns the plaintext of a (non-final) segment
    /// when one is complete, authentic, and `input` still has bytes. Call until `input` is empty.
    pub fn push(&mut self, input: &mut &[u8]) -> Result<Option<Vec<u8>>, Unauthentic> {
        if self.buf.len() == SEALED_SEGMENT_LEN && !input.is_empty() {
            return self.open_segment(false).map(Some);
        }
        let n = (SEALED_SEGMENT_LEN - self.buf.len()).min(input.len());
        self.buf.extend_from_slice(&input[..n]);
        *input = &input[n..];
        Ok(None)
    }

    /// Opens the last segment: the stream ended. Fails if what is left is not a segment sealed
    /// as the last one at this position (a stream cut at a segment boundary, or extended).
    pub fn finish(mut self) -> Result<Vec<u8>, Unauthentic> {
        let index = self.index;
        let out = self.open_segment(true)?;
        // Only an empty payload has an empty last segment: one encoding per payload.
        if out.is_empty() && index > 0 {
            return Err(Unauthentic);
        }
        Ok(out)
    }

    /// Segments opened so far.
    pub fn segments(&self) -> u32 {
        self.index
    }

    fn open_segment(&mut self, last: bool) -> Result<Vec<u8>, Unauthentic> {
        let mut seg = std::mem::replace(&mut self.buf, Vec::with_capacity(SEALED_SEGMENT_LEN));
        if seg.len() < TAG_LEN {
            return Err(Unauthentic);
        }
        let len =
            match self
                .key
                .open_in_place(nonce(self.index, last), aead::Aad::empty(), &mut seg)
            {
                Ok(plain) => plain.len(),
                Err(_) => {
                    seg.zeroize();
                    return Err(Unauthentic);
                }
            };
        seg.truncate(len);
        self.index = self.index.checked_add(1).ok_or(Unauthentic)?;
        Ok(seg)
    }
}

impl Drop for StreamOpener {
    fn drop(&mut self) {
        self.buf.zeroize();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend_kind::BackendKind;

    fn copy() -> WrappedCopy<'static> {
        WrappedCopy {
            backend: BackendKind::Local,
            key_id: "default",
            key_version: "1",
            wrapped: b"wrapped",
        }
    }

    /// Seals `payload`, feeding it in `feed`-byte pieces; returns header and segments.
    fn seal_all(dk: &SecretKey, payload: &[u8], feed: usize) -> (Vec<u8>, Vec<Vec<u8>>) {
        let (header, mut sealer) =
            seal_stream("k", "anonymous", &[copy()], dk, &BTreeMap::new()).unwrap();
        let mut segs = Vec::new();
        for piece in payload.chunks(feed.max(1)) {
            let mut input = piece;
            while !input.is_empty() {
                if let Some(s) = sealer.push(&mut input).unwrap() {
                    segs.push(s);
                }
            }
        }
        segs.push(sealer.finish().unwrap());
        (header, segs)
    }

    /// Opens header + body fed in `feed`-byte pieces; returns the released plaintext and the
    /// result.
    fn open_all(dk: &SecretKey, bytes: &[u8], feed: usize) -> (Vec<u8>, Result<(), Unauthentic>) {
        let (h, n) = parse_header(bytes).unwrap().unwrap();
        let mut opener = h.opener(dk, &BTreeMap::new()).unwrap();
        let mut released = Vec::new();
        for piece in bytes[n..].chunks(feed.max(1)) {
            let mut input = piece;
            while !input.is_empty() {
                match opener.push(&mut input) {
                    Ok(Some(p)) => released.extend_from_slice(&p),
                    Ok(None) => {}
                    Err(e) => return (released, Err(e)),
                }
            }
        }
        match opener.finish() {
            Ok(p) => {
                released.extend_from_slice(&p);
                (released, Ok(()))
            }
            Err(e) => (released, Err(e)),
        }
    }

    #[test]
    fn round_trips_at_segment_edges() {
        let dk = SecretKey::generate(32).unwrap();
        for len in [
            0,
            1,
            SEGMENT_LEN - 1,
            SEGMENT_LEN,
            SEGMENT_LEN + 1,
            3 * SEGMENT_LEN,
        ] {
            let payload: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
            for feed in [1000, SEGMENT_LEN, 5 * SEGMENT_LEN] {
                let (header, segs) = seal_all(&dk, &payload, feed);
                let expected_segs = len.div_ceil(SEGMENT_LEN).max(1);
                assert_eq!(segs.len(), expected_segs, "len {len}");
                let bytes: Vec<u8> = header
                    .iter()
                    .chain(segs.iter().flatten())
                    .copied()
                    .collect();
                let (out, r) = open_all(&dk, &bytes, 777);
                assert_eq!(r, Ok(()), "len {len} feed {feed}");
                assert_eq!(out, payload);
            }
        }
    }

    #[test]
    fn header_prefixes_ask_for_more_and_unary_envelopes_are_refused() {
        let dk = SecretKey::generate(32).unwrap();
        let (header, _) = seal_all(&dk, b"x", 1);
        for n in 0..header.len() {
            assert!(parse_header(&header[..n]).unwrap().is_none(), "prefix {n}");
        }
        assert_eq!(parse_header(&header).unwrap().unwrap().1, header.len());
        let unary = super::super::seal(
            super::super::Kind::Message,
            "k",
            "c",
            &[copy()],
            &dk,
            &BTreeMap::new(),
            b"x",
        )
        .unwrap();
        assert_eq!(parse_header(&unary).err(), Some(FormatError::NotAStream));
        assert_eq!(
            super::super::parse(&header).err(),
            Some(FormatError::StreamKind)
        );
    }

    /// Every segment dropped, duplicated, swapped with its neighbour; the stream cut at every
    /// boundary; bytes appended; the final flag moved: always an error, and nothing released
    /// beyond the segments before the damage.
    #[test]
    fn reorder_duplicate_truncate_append_are_detected() {
        let dk = SecretKey::generate(32).unwrap();
        let payload: Vec<u8> = (0..4 * SEGMENT_LEN + 100).map(|i| i as u8).collect();
        let (header, segs) = seal_all(&dk, &payload, SEGMENT_LEN);
        let join = |segs: &[Vec<u8>]| -> Vec<u8> {
            header
                .iter()
                .chain(segs.iter().flatten())
                .copied()
                .collect()
        };
        let check = |segs: Vec<Vec<u8>>, first_bad: usize, what: &str| {
            let (out, r) = open_all(&dk, &join(&segs), 4096);
            assert_eq!(r, Err(Unauthentic), "{what}");
            assert!(
                out.len() <= first_bad * SEGMENT_LEN,
                "{what}: released too much"
            );
            assert_eq!(
                out,
                payload[..out.len()],
                "{what}: released unauthentic bytes"
            );
        };
        for i in 0..segs.len() {
            let mut s = segs.clone();
            s.remove(i);
            check(s, i, &format!("drop {i}"));
            let mut s = segs.clone();
            s.insert(i, segs[i].clone());
            check(s, i + 1, &format!("duplicate {i}"));
            if i + 1 < segs.len() {
                let mut s = segs.clone();
                s.swap(i, i + 1);
                check(s, i, &format!("swap {i}"));
            }
            if i + 1 < segs.len() {
                check(segs[..=i].to_vec(), i, &format!("truncate after {i}"));
            }
            let mut s = segs.clone();
            s[i][10] ^= 1;
            check(s, i, &format!("flip in {i}"));
        }
        let mut s = segs.clone();
        s.last_mut().unwrap().push(0);
        check(s, segs.len() - 1, "one byte appended");
        let mut s = segs.clone();
        s.push(segs[0].clone());
        check(s, segs.len() - 1, "a segment appended");
        // Cut inside a segment.
        let all = join(&segs);
        let (out, r) = open_all(&dk, &all[..all.len() - 50], 4096);
        assert_eq!(r, Err(Unauthentic));
        assert_eq!(out, payload[..out.len()]);
    }

    #[test]
    fn wrong_context_or_key_fails_at_the_header() {
        let dk = SecretKey::generate(32).unwrap();
        let (header, _) = seal_all(&dk, b"x", 1);
        let (h, _) = parse_header(&header).unwrap().unwrap();
        let mut other = BTreeMap::new();
        other.insert("a".to_owned(), "b".to_owned());
        assert!(h.opener(&dk, &other).is_err());
        assert!(
            h.opener(&SecretKey::generate(32).unwrap(), &BTreeMap::new())
                .is_err()
        );
        let mut bad = header.clone();
        let n = bad.len();
        bad[n - 40] ^= 1; // in the salt
        let (h, _) = parse_header(&bad).unwrap().unwrap();
        assert!(h.opener(&dk, &BTreeMap::new()).is_err());
    }
}
