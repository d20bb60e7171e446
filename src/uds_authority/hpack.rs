//! A small HPACK (RFC 7541) decoder and a table-free encoder, for the Unix-socket `:authority`
//! repair in the parent module.
//!
//! The decoder mirrors the client's encoder: it keeps the dynamic table the client builds, so
//! every later block decodes to exactly what the client meant. The encoder writes every field as
//! a literal with a literal name and no Huffman coding, and never adds to (or resizes) the
//! dynamic table, so h2's decoder state behind us is empty forever and cannot drift from ours.
//!
//! Must never: panic or allocate without bound on any input (strings are bounded by the block,
//! the decoded list by the caller's limit, the table by the size the server advertised).

use std::collections::VecDeque;

use bytes::{BufMut, Bytes, BytesMut};

/// The dynamic table size h2 advertises (it never changes SETTINGS_HEADER_TABLE_SIZE from the
/// protocol default), so a client may never ask for more.
pub const MAX_TABLE_SIZE: usize = 4096;

/// RFC 7541 §4.1: each entry costs its name and value lengths plus 32.
const ENTRY_OVERHEAD: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HpackError {
    #[error("the header block ends inside a field")]
    Truncated,
    #[error("an integer in the header block overflows")]
    IntegerOverflow,
    #[error("a header field refers to index {0}, which does not exist")]
    BadIndex(usize),
    #[error("a Huffman-coded string is invalid")]
    BadHuffman,
    #[error("a dynamic table size update is out of place or too large")]
    BadSizeUpdate,
    #[error("the decoded header list exceeds {0} bytes")]
    ListTooLarge(usize),
}

/// One decoded header field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    pub name: Bytes,
    pub value: Bytes,
    /// Sent as "never indexed" (RFC 7541 §6.2.3): kept so on re-encoding.
    pub never_indexed: bool,
}

/// The HPACK decoding context of one connection (one direction).
#[derive(Debug)]
pub struct Decoder {
    /// Newest first (index 62 is `table[0]`).
    table: VecDeque<(Bytes, Bytes)>,
    size: usize,
    max_size: usize,
}

impl Default for Decoder {
    fn default() -> Self {
        Self {
            table: VecDeque::new(),
            size: 0,
            max_size: MAX_TABLE_SIZE,
        }
    }
}

impl Decoder {
    /// Decodes one complete header block. `max_list` bounds the decoded header list size
    /// (RFC 7540 §6.5.2 accounting: name + value + 32 per field).
    pub fn decode(&mut self, block: &[u8], max_list: usize) -> Result<Vec<Field>, HpackError> {
        let mut src = block;
        let mut fields = Vec::new();
        let mut list_size = 0usize;
        let mut may_resize = true;
        while let Some(&first) = src.first() {
            let field = if first & 0x80 != 0 {
                let index = integer(&mut src, 7)?;
                let (name, value) = self.get(index)?;
                Field {
                    name,
                    value,
                    never_indexed: false,
                }
            } else if first & 0x40 != 0 {
                let (name, value) = self.literal(&mut src, 6)?;
                self.insert(name.clone(), value.clone());
                Field {
                    name,
                    value,
                    never_indexed: false,
                }
            } else if first & 0x20 != 0 {
                let size = integer(&mut src, 5)?;
                if !may_resize || size > MAX_TABLE_SIZE {
                    return Err(HpackError::BadSizeUpdate);
                }
                self.max_size = size;
                self.evict(0);
                continue;
            } else {
                let never_indexed = first & 0x10 != 0;
                let (name, value) = self.literal(&mut src, 4)?;
                Field {
                    name,
                    value,
                    never_indexed,
                }
            };
            may_resize = false;
            list_size =
                list_size.saturating_add(field.name.len() + field.value.len() + ENTRY_OVERHEAD);
            if list_size > max_list {
                return Err(HpackError::ListTooLarge(max_list));
            }
            fields.push(field);
        }
        Ok(fields)
    }

    fn get(&self, index: usize) -> Result<(Bytes, Bytes), HpackError> {
        match index {
            0 => Err(HpackError::BadIndex(0)),
            1..=61 => {
                let (n, v) = STATIC_TABLE[index - 1];
                Ok((
                    Bytes::from_static(n.as_bytes()),
                    Bytes::from_static(v.as_bytes()),
                ))
            }
            _ => self
                .table
                .get(index - 62)
                .cloned()
                .ok_or(HpackError::BadIndex(index)),
        }
    }

    /// A literal field whose name index has a `prefix`-bit prefix (0 means a literal name).
    fn literal(&self, src: &mut &[u8], prefix: u8) -> Result<(Bytes, Bytes), HpackError> {
        let index = integer(src, prefix)?;
        let name = if index == 0 {
            string(src)?
        } else {
            self.get(index)?.0
        };
        Ok((name, string(src)?))
    }

    fn insert(&mut self, name: Bytes, value: Bytes) {
        let size = name.len() + value.len() + ENTRY_OVERHEAD;
        if size > self.max_size {
            // RFC 7541 §4.4: an entry larger than the table empties it and is not added.
            self.table.clear();
            self.size = 0;
            return;
        }
        self.evict(size);
        self.size += size;
        self.table.push_front((name, value));
    }

    /// Evicts the oldest entries until `room` more bytes fit.
    fn evict(&mut self, room: usize) {
        while self.size + room > self.max_size {
            match self.table.pop_back() {
                Some((n, v)) => self.size -= n.len() + v.len() + ENTRY_OVERHEAD,
                None => break,
            }
        }
    }
}

/// Encodes `fields` as literals with literal names, not indexed, not Huffman-coded.
pub fn encode(fields: &[Field], out: &mut BytesMut) {
    for f in fields {
        // 0000 0000: without indexing; 0001 0000: never indexed. Name index 0: a literal name.
        out.put_u8(if f.never_indexed { 0x10 } else { 0x00 });
        put_string(out, &f.name);
        put_string(out, &f.value);
    }
}

fn put_string(out: &mut BytesMut, s: &[u8]) {
    put_integer(out, s.len(), 7, 0x00);
    out.put_slice(s);
}

/// RFC 7541 §5.1, with `flags` in the bits above the prefix of the first byte.
fn put_integer(out: &mut BytesMut, mut value: usize, prefix: u8, flags: u8) {
    let max = (1usize << prefix) - 1;
    if value < max {
        out.put_u8(flags | value as u8);
        return;
    }
    out.put_u8(flags | max as u8);
    value -= max;
    while value >= 0x80 {
        out.put_u8((value & 0x7f) as u8 | 0x80);
        value >>= 7;
    }
    out.put_u8(value as u8);
}

/// RFC 7541 §5.1. Values above 2^28 are refused (no header block needs them).
fn integer(src: &mut &[u8], prefix: u8) -> Result<usize, HpackError> {
    let (&first, rest) = src.split_first().ok_or(HpackError::Truncated)?;
    *src = rest;
    let max = (1usize << prefix) - 1;
    let mut value = (first as usize) & max;
    if value < max {
        return Ok(value);
    }
    let mut shift = 0u32;
    loop {
        let (&b, rest) = src.split_first().ok_or(HpackError::Truncated)?;
        *src = rest;
        if shift > 21 {
            return Err(HpackError::IntegerOverflow);
        }
        value += ((b & 0x7f) as usize) << shift;
        shift += 7;
        if b & 0x80 == 0 {
            return Ok(value);
        }
    }
}

/// RFC 7541 §5.2: a length-prefixed string, Huffman-coded when the top bit is set.
fn string(src: &mut &[u8]) -> Result<Bytes, HpackError> {
    let huffman = src.first().is_some_and(|b| b & 0x80 != 0);
    let len = integer(src, 7)?;
    if len > src.len() {
        return Err(HpackError::Truncated);
    }
    let (raw, rest) = src.split_at(len);
    *src = rest;
    if huffman {
        huffman_decode(raw).map(Bytes::from)
    } else {
        Ok(Bytes::copy_from_slice(raw))
    }
}

/// Canonical Huffman decoding (the HPACK code is canonical: codes of one length are
/// consecutive, in symbol order), bit by bit from the code lengths alone.
fn huffman_decode(src: &[u8]) -> Result<Vec<u8>, HpackError> {
    let mut out = Vec::with_capacity(src.len() * 8 / 5 + 1);
    // The code read so far, its length, and whether every bit of it is 1 (a prefix of EOS,
    // the only legal padding).
    let (mut code, mut len, mut all_ones) = (0u32, 0usize, true);
    for &byte in src {
        for bit in (0..8).rev() {
            let b = u32::from((byte >> bit) & 1);
            code = (code << 1) | b;
            len += 1;
            all_ones &= b == 1;
            let first = HUFFMAN.first_code[len];
            let count = HUFFMAN.count[len] as u32;
            if code >= first && code - first < count {
                let symbol =
                    HUFFMAN.symbols[HUFFMAN.offset[len] as usize + (code - first) as usize];
                if symbol == EOS {
                    return Err(HpackError::BadHuffman);
                }
                out.push(symbol as u8);
                (code, len, all_ones) = (0, 0, true);
            } else if len >= 30 {
                return Err(HpackError::BadHuffman);
            }
        }
    }
    // RFC 7541 §5.2: padding is fewer than 8 bits, all ones.
    if len > 7 || !all_ones {
        return Err(HpackError::BadHuffman);
    }
    Ok(out)
}

const EOS: u16 = 256;

/// Code lengths of RFC 7541 Appendix B, symbols 0..=255 then EOS.
const CODE_LENGTHS: [u8; 257] = [
    13, 23, 28, 28, 28, 28, 28, 28, 28, 24, 30, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28, 30, 28,
    28, 28, 28, 28, 28, 28, 28, 28, 6, 10, 10, 12, 13, 6, 8, 11, 10, 10, 8, 11, 8, 6, 6, 6, 5, 5,
    5, 6, 6, 6, 6, 6, 6, 6, 7, 8, 15, 6, 12, 10, 13, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7,
    7, 7, 7, 7, 7, 7, 7, 7, 8, 7, 8, 13, 19, 13, 14, 6, 15, 5, 6, 5, 6, 5, 6, 6, 6, 5, 7, 7, 6, 6,
    6, 5, 6, 7, 6, 5, 5, 6, 7, 7, 7, 7, 7, 15, 11, 14, 13, 28, 20, 22, 20, 20, 22, 22, 22, 23, 22,
    23, 23, 23, 23, 23, 24, 23, 24, 24, 22, 23, 24, 23, 23, 23, 23, 21, 22, 23, 22, 23, 23, 24, 22,
    21, 20, 22, 22, 23, 23, 21, 23, 22, 22, 24, 21, 22, 23, 23, 21, 21, 22, 21, 23, 22, 23, 23, 20,
    22, 22, 22, 23, 22, 22, 23, 26, 26, 20, 19, 22, 23, 22, 25, 26, 26, 26, 27, 27, 26, 24, 25, 19,
    21, 26, 27, 27, 26, 27, 24, 21, 21, 26, 26, 28, 27, 27, 27, 20, 24, 20, 21, 22, 21, 21, 23, 22,
    22, 25, 25, 24, 24, 26, 23, 26, 27, 26, 26, 27, 27, 27, 27, 27, 28, 27, 27, 27, 27, 27, 26, 30,
];

/// The canonical code, derived from [`CODE_LENGTHS`] at compile time.
struct Canonical {
    /// Per code length: how many symbols, the first code, and where they start in `symbols`.
    count: [u16; 31],
    first_code: [u32; 31],
    offset: [u16; 31],
    /// Symbols sorted by (code length, symbol).
    symbols: [u16; 257],
}

const HUFFMAN: Canonical = canonical();

const fn canonical() -> Canonical {
    let mut count = [0u16; 31];
    let mut i = 0;
    while i < 257 {
        count[CODE_LENGTHS[i] as usize] += 1;
        i += 1;
    }
    let mut first_code = [0u32; 31];
    let mut offset = [0u16; 31];
    let (mut code, mut at) = (0u32, 0u16);
    let mut len = 1;
    while len < 31 {
        code <<= 1;
        first_code[len] = code;
        offset[len] = at;
        code += count[len] as u32;
        at += count[len];
        len += 1;
    }
    let mut symbols = [0u16; 257];
    let mut next = offset;
    let mut s = 0;
    while s < 257 {
        let l = CODE_LENGTHS[s] as usize;
        symbols[next[l] as usize] = s as u16;
        next[l] += 1;
        s += 1;
    }
    Canonical {
        count,
        first_code,
        offset,
        symbols,
    }
}

/// RFC 7541 Appendix A.
const STATIC_TABLE: [(&str, &str); 61] = [
    (":authority", ""),
    (":method", "GET"),
    (":method", "POST"),
    (":path", "/"),
    (":path", "/index.html"),
    (":scheme", "http"),
    (":scheme", "https"),
    (":status", "200"),
    (":status", "204"),
    (":status", "206"),
    (":status", "304"),
    (":status", "400"),
    (":status", "404"),
    (":status", "500"),
    ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"),
    ("accept-language", ""),
    ("accept-ranges", ""),
    ("accept", ""),
    ("access-control-allow-origin", ""),
    ("age", ""),
    ("allow", ""),
    ("authorization", ""),
    ("cache-control", ""),
    ("content-disposition", ""),
    ("content-encoding", ""),
    ("content-language", ""),
    ("content-length", ""),
    ("content-location", ""),
    ("content-range", ""),
    ("content-type", ""),
    ("cookie", ""),
    ("date", ""),
    ("etag", ""),
    ("expect", ""),
    ("expires", ""),
    ("from", ""),
    ("host", ""),
    ("if-match", ""),
    ("if-modified-since", ""),
    ("if-none-match", ""),
    ("if-range", ""),
    ("if-unmodified-since", ""),
    ("last-modified", ""),
    ("link", ""),
    ("location", ""),
    ("max-forwards", ""),
    ("proxy-authenticate", ""),
    ("proxy-authorization", ""),
    ("range", ""),
    ("referer", ""),
    ("refresh", ""),
    ("retry-after", ""),
    ("server", ""),
    ("set-cookie", ""),
    ("strict-transport-security", ""),
    ("transfer-encoding", ""),
    ("user-agent", ""),
    ("vary", ""),
    ("via", ""),
    ("www-authenticate", ""),
];

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn pairs(fields: &[Field]) -> Vec<(String, String)> {
        fields
            .iter()
            .map(|f| {
                (
                    String::from_utf8(f.name.to_vec()).unwrap(),
                    String::from_utf8(f.value.to_vec()).unwrap(),
                )
            })
            .collect()
    }

    fn p(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    /// Codes derived from the lengths match RFC 7541 Appendix B at both ends of the table.
    #[test]
    fn canonical_code_matches_the_rfc() {
        let code_of = |sym: u16| {
            let l = CODE_LENGTHS[sym as usize] as usize;
            let pos = HUFFMAN.symbols[HUFFMAN.offset[l] as usize..]
                .iter()
                .position(|s| *s == sym)
                .unwrap();
            (HUFFMAN.first_code[l] + pos as u32, l)
        };
        assert_eq!(code_of(b'0' as u16), (0x0, 5));
        assert_eq!(code_of(b' ' as u16), (0x14, 6));
        assert_eq!(code_of(b'a' as u16), (0x3, 5));
        assert_eq!(code_of(0), (0x1ff8, 13));
        assert_eq!(code_of(255), (0x3ffffee, 26));
        assert_eq!(code_of(EOS), (0x3fffffff, 30));
    }

    /// RFC 7541 C.3 and C.4: the same three requests without and with Huffman coding, on one
    /// connection (the dynamic table carries over).
    #[test]
    fn rfc7541_request_examples() {
        let expect = [
            p(&[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":authority", "www.example.com"),
            ]),
            p(&[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":authority", "www.example.com"),
                ("cache-control", "no-cache"),
            ]),
            p(&[
                (":method", "GET"),
                (":scheme", "https"),
                (":path", "/index.html"),
                (":authority", "www.example.com"),
                ("custom-key", "custom-value"),
            ]),
        ];
        let plain = [
            "8286 8441 0f77 7777 2e65 7861 6d70 6c65 2e63 6f6d",
            "8286 84be 5808 6e6f 2d63 6163 6865",
            "8287 85bf 400a 6375 7374 6f6d 2d6b 6579 0c63 7573 746f 6d2d 7661 6c75 65",
        ];
        let huffman = [
            "8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff",
            "8286 84be 5886 a8eb 1064 9cbf",
            "8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf",
        ];
        for blocks in [plain, huffman] {
            let mut d = Decoder::default();
            for (block, want) in blocks.iter().zip(&expect) {
                assert_eq!(&pairs(&d.decode(&hex(block), 1 << 20).unwrap()), want);
            }
            assert_eq!(d.size, 164, "table size after C.3.3 / C.4.3");
        }
    }

    #[test]
    fn encode_then_decode_round_trips_without_touching_the_table() {
        let fields = vec![
            Field {
                name: Bytes::from_static(b":authority"),
                value: Bytes::from(vec![b'x'; 300]),
                never_indexed: false,
            },
            Field {
                name: Bytes::from_static(b"authorization"),
                value: Bytes::from_static(b"Bearer t"),
                never_indexed: true,
            },
        ];
        let mut out = BytesMut::new();
        encode(&fields, &mut out);
        let mut d = Decoder::default();
        assert_eq!(d.decode(&out, 1 << 20).unwrap(), fields);
        assert!(d.table.is_empty());
    }

    #[test]
    fn bad_input_is_an_error_not_a_panic() {
        let mut d = Decoder::default();
        for bad in [
            &b"\x80"[..],                    // index 0
            b"\xff\xff\xff\xff\xff\xff\x7f", // integer overflow
            b"\xbe",                         // index 62, empty dynamic table
            b"\x41\x05ab",                   // string longer than the block
            b"\x41\x81\xff",                 // Huffman: EOS prefix too long
            b"\x41\x84\xff\xff\xff\xff",     // Huffman: EOS decoded
            b"\x82\x3f\xe1\x1f",             // size update after a field
            b"\x3f\xe2\x1f",                 // size update above 4096
        ] {
            assert!(d.decode(bad, 1 << 20).is_err(), "{bad:?}");
        }
        // The decoded size is bounded even when the block is tiny (indexed repeats).
        let mut d = Decoder::default();
        let mut block = hex("418c f1e3 c2e5 f23a 6ba0 ab90 f4ff");
        block.extend(std::iter::repeat_n(0xbe, 1000));
        assert_eq!(
            d.decode(&block, 16 << 10),
            Err(HpackError::ListTooLarge(16 << 10))
        );
        // Every byte string decodes or fails cleanly.
        let mut d = Decoder::default();
        for a in 0..=255u8 {
            for b in [0u8, 1, 0x7f, 0x80, 0xff] {
                let _ = d.decode(&[a, b, a ^ b, 0x80, 0x40], 1 << 20);
            }
        }
    }
}
