//! What every keybroker fuzz target shares: a global allocator that turns "allocates more than the
//! input justifies" into a crash libFuzzer records, like a panic or a hang.
//!
//! A target runs the code under test inside [`bounded`]. While it runs, the live heap may grow by
//! at most [`PER_INPUT_BYTE`] × input length + [`FIXED`] bytes over what was live when it started
//! (one allocation that large counts too: it is checked before it is made, so a 10 GB request is
//! caught, not attempted). Past the bound the allocator prints the numbers and aborts; libFuzzer
//! saves the input as a crash. Heap that was live before the call and freed during it counts in
//! the call's favour, which only makes the check looser, never wrong.
//!
//! `KEYBROKER_FUZZ_ALLOC_STATS=1` prints every new worst case (largest growth, and largest growth
//! per input byte) instead of only failing: how the bound in docs/reliability.md was chosen.
//!
//! Must never: allocate inside the allocator, or unwind out of it (abort only).

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

/// Heap growth allowed per input byte. Parsers that build a tree (serde_json `Value`, YAML
/// events, TOML tables) hold a few node-sized allocations per input byte at their peak; see
/// docs/reliability.md for the measured worst cases.
pub const PER_INPUT_BYTE: usize = 512;
/// Heap growth allowed whatever the input: fixed tables, default settings, parser buffers.
pub const FIXED: usize = 1 << 20;

/// Bytes currently allocated through this allocator.
static LIVE: AtomicUsize = AtomicUsize::new(0);
/// `LIVE` may not exceed this (usize::MAX while no bounded call runs).
static LIMIT: AtomicUsize = AtomicUsize::new(usize::MAX);
/// `LIVE` when the running bounded call started, and its highest value since.
static BASE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
/// The running call's input length (for the report).
static INPUT_LEN: AtomicUsize = AtomicUsize::new(0);
/// 0 unknown, 1 off, 2 on.
static STATS: AtomicUsize = AtomicUsize::new(0);
static WORST_GROWTH: AtomicUsize = AtomicUsize::new(0);
static WORST_PER_BYTE: AtomicUsize = AtomicUsize::new(0);

/// The allocator every fuzz target uses (it is the global allocator of any binary linking this
/// crate).
pub struct Bounded;

#[global_allocator]
static ALLOCATOR: Bounded = Bounded;

impl Bounded {
    /// Accounts `size` more bytes; aborts (before allocating) if that crosses the bound.
    fn grow(size: usize) {
        let live = LIVE.fetch_add(size, Relaxed).saturating_add(size);
        if live > PEAK.load(Relaxed) {
            PEAK.store(live, Relaxed);
        }
        if live > LIMIT.load(Relaxed) {
            over_bound(live);
        }
    }

    fn shrink(size: usize) {
        LIVE.fetch_sub(size, Relaxed);
    }
}

// SAFETY: every method forwards to `System` with the caller's layout and pointer unchanged; the
// accounting around it only reads and writes atomics, and `over_bound` never returns.
unsafe impl GlobalAlloc for Bounded {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        Self::grow(layout.size());
        // SAFETY: forwarded unchanged (see above).
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        Self::grow(layout.size());
        // SAFETY: forwarded unchanged.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded unchanged.
        unsafe { System.dealloc(ptr, layout) };
        Self::shrink(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let old = layout.size();
        if new_size > old {
            Self::grow(new_size - old);
        }
        // SAFETY: forwarded unchanged.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if new_size < old {
            Self::shrink(old - new_size);
        } else if p.is_null() {
            Self::shrink(new_size - old);
        }
        p
    }
}

/// Prints what crossed the bound and aborts. Allocates nothing: the numbers are formatted into a
/// stack buffer, and the bound is lifted first in case writing to stderr allocates after all.
#[cold]
fn over_bound(live: usize) -> ! {
    LIMIT.store(usize::MAX, Relaxed);
    let growth = live.saturating_sub(BASE.load(Relaxed));
    let len = INPUT_LEN.load(Relaxed);
    let mut buf = [0u8; 256];
    let mut w = Cursor {
        buf: &mut buf,
        at: 0,
    };
    w.put(b"\nkeybroker-fuzz: allocation bound exceeded: the heap grew by ");
    w.num(growth);
    w.put(b" bytes for an input of ");
    w.num(len);
    w.put(b" bytes (bound: ");
    w.num(PER_INPUT_BYTE);
    w.put(b" x len + ");
    w.num(FIXED);
    w.put(b")\n");
    let end = w.at;
    let _ = std::io::stderr().write_all(&buf[..end]);
    std::process::abort();
}

/// A fixed buffer to format into without allocating.
struct Cursor<'a> {
    buf: &'a mut [u8],
    at: usize,
}

impl Cursor<'_> {
    fn put(&mut self, s: &[u8]) {
        let n = s.len().min(self.buf.len() - self.at);
        self.buf[self.at..self.at + n].copy_from_slice(&s[..n]);
        self.at += n;
    }

    fn num(&mut self, mut n: usize) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        self.put(&digits[i..]);
    }
}

/// The most the heap may grow while code runs on an input of `len` bytes.
pub fn bound_for(len: usize) -> usize {
    len.saturating_mul(PER_INPUT_BYTE).saturating_add(FIXED)
}

/// Runs `f` (the code under test, for an input of `input_len` bytes) under the allocation bound.
/// Not reentrant; fuzz targets are single-threaded.
pub fn bounded<R>(input_len: usize, f: impl FnOnce() -> R) -> R {
    let stats = match STATS.load(Relaxed) {
        0 => {
            let on = std::env::var_os("KEYBROKER_FUZZ_ALLOC_STATS").is_some_and(|v| v == "1");
            STATS.store(if on { 2 } else { 1 }, Relaxed);
            on
        }
        s => s == 2,
    };
    let base = LIVE.load(Relaxed);
    BASE.store(base, Relaxed);
    PEAK.store(base, Relaxed);
    INPUT_LEN.store(input_len, Relaxed);
    if !stats {
        LIMIT.store(base.saturating_add(bound_for(input_len)), Relaxed);
    }
    let out = f();
    LIMIT.store(usize::MAX, Relaxed);
    if stats {
        report(input_len, PEAK.load(Relaxed).saturating_sub(base));
    }
    out
}

fn report(len: usize, growth: usize) {
    let per_byte = growth / len.max(1);
    let worst_growth = growth > WORST_GROWTH.load(Relaxed);
    let worst_per_byte = len >= 64 && per_byte > WORST_PER_BYTE.load(Relaxed);
    if worst_growth {
        WORST_GROWTH.store(growth, Relaxed);
    }
    if worst_per_byte {
        WORST_PER_BYTE.store(per_byte, Relaxed);
    }
    if worst_growth || worst_per_byte {
        eprintln!(
            "keybroker-fuzz: alloc stats: input {len} bytes, heap growth {growth} bytes \
             ({per_byte}/byte){}{}",
            if worst_growth {
                " [largest growth]"
            } else {
                ""
            },
            if worst_per_byte {
                " [largest per byte]"
            } else {
                ""
            },
        );
    }
}

/// Lowercase hex decoding for embedded test data (panics on bad hex: the data is ours).
/// The wrapped copies a structured target asked for (`(backend, key id, version, wrapped)`,
/// the backend picked modulo the known ones).
pub fn copies<'a>(
    fields: &[(u8, &'a str, &'a str, &'a [u8])],
) -> Vec<keybroker::envelope::WrappedCopy<'a>> {
    use keybroker::backend::BackendKind;
    fields
        .iter()
        .map(
            |&(b, key_id, key_version, wrapped)| keybroker::envelope::WrappedCopy {
                backend: BackendKind::ALL[b as usize % BackendKind::ALL.len()],
                key_id,
                key_version,
                wrapped,
            },
        )
        .collect()
}

/// The encryption context a structured target asked for (later duplicates win).
pub fn context(pairs: &[(&str, &str)]) -> std::collections::BTreeMap<String, String> {
    pairs
        .iter()
        .map(|&(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

pub fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex test data"))
        .collect()
}
