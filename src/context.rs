//! The one canonical encoding of an encryption context: the bytes that are authenticated with
//! a message (envelope AAD), that bind a wrapped data key to its keybroker key and caller (the
//! backend context), and that audit digests are computed over.
//!
//! Pair count, then the pairs sorted by key bytes, each key and value length-prefixed (u16
//! big-endian). `docs/envelope.md` specifies it; the envelope's test vectors pin it.
//!
//! Must never: change (every stored ciphertext depends on these bytes), or panic on input that
//! was not checked against the format's limits (lengths saturate instead).

use std::collections::BTreeMap;

/// Appends the canonical encoding of `pairs`, which must already be in canonical order (sorted
/// by key bytes, no duplicate keys: what a `BTreeMap<String, _>` iterates in).
pub fn encode<'a>(pairs: impl ExactSizeIterator<Item = (&'a str, &'a str)>, out: &mut Vec<u8>) {
    // Limits are enforced before any sealing or opening (`envelope::check_context`); saturate so
    // an unchecked call can never panic.
    put_u16(out, pairs.len().min(u16::MAX as usize) as u16);
    for (k, v) in pairs {
        put_bytes16(out, k.as_bytes());
        put_bytes16(out, v.as_bytes());
    }
}

/// [`encode`] of a map (its iteration order is the canonical order).
pub fn encode_map(context: &BTreeMap<String, String>, out: &mut Vec<u8>) {
    encode(context.iter().map(|(k, v)| (k.as_str(), v.as_str())), out);
}

fn put_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_be_bytes());
}

fn put_bytes16(out: &mut Vec<u8>, bytes: &[u8]) {
    let len = bytes.len().min(u16::MAX as usize);
    put_u16(out, len as u16);
    out.extend_from_slice(&bytes[..len]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_and_pairs_encode_alike_in_canonical_order() {
        let map: BTreeMap<String, String> = [("b", "2"), ("a", "1")]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        let mut from_map = Vec::new();
        encode_map(&map, &mut from_map);
        let mut from_pairs = Vec::new();
        encode([("a", "1"), ("b", "2")].into_iter(), &mut from_pairs);
        assert_eq!(from_map, from_pairs);
        assert_eq!(
            from_map,
            [0, 2, 0, 1, b'a', 0, 1, b'1', 0, 1, b'b', 0, 1, b'2']
        );
        let mut empty = Vec::new();
        encode_map(&BTreeMap::new(), &mut empty);
        assert_eq!(empty, [0, 0]);
    }
}
