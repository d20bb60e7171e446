//! Micro-benchmark of the per-message envelope work (issue 21 item 12): format 2 hashes the
//! header and context into the key derivation, which format 1 did not. Seals and opens a 1 KiB
//! payload both ways in alternating rounds (so a noisy neighbour hits both alike) and prints the
//! median nanoseconds per operation and the ratio. Also times a GenerateDataKey derivation, and
//! format 2 with three wrapped copies (a key wrapped by local, AWS and GCP backends, issue 16)
//! against one copy.
//!
//! `cargo bench --bench envelope` (release profile). Not a test: nothing is asserted.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::Instant;

use keybroker::backend::BackendKind;
use keybroker::envelope::{self, FORMAT_VERSION, Kind, LEGACY_VERSION, SALT_LEN, WrappedCopy};
use keybroker::secret::{SecretKey, random_fill};

/// Many short rounds, the variants interleaved round by round: a burst of noise from a neighbour
/// then lands on both alike, and the median and minimum of the rounds are stable.
const ROUNDS: usize = 301;
const PER_ROUND: u32 = 2_000;

/// (median, minimum) of per-round ns/op.
fn stats(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[0])
}

/// Nanoseconds per call of `f`, over one round.
fn round(mut f: impl FnMut()) -> f64 {
    let start = Instant::now();
    for _ in 0..PER_ROUND {
        f();
    }
    start.elapsed().as_nanos() as f64 / f64::from(PER_ROUND)
}

fn main() {
    let dk = SecretKey::generate(32).unwrap();
    // A realistic header: a local copy (81-byte wrap), the default key and a SPIFFE caller.
    let wrapped = [0x5au8; 81];
    let copy = WrappedCopy {
        backend: BackendKind::Local,
        key_id: "default",
        key_version: "1",
        wrapped: &wrapped,
    };
    let caller = "spiffe://example.org/ns/shop/sa/api";
    let mut context = BTreeMap::new();
    context.insert("tenant".to_owned(), "acme".to_owned());
    context.insert("purpose".to_owned(), "invoice".to_owned());
    let payload = vec![0x42u8; 1024];
    let seal = |version: u8| {
        let mut salt = [0u8; SALT_LEN];
        random_fill(&mut salt).unwrap();
        envelope::seal_with_salt(
            version,
            Kind::Message,
            "default",
            caller,
            &[copy],
            &dk,
            &context,
            &payload,
            &salt,
        )
        .unwrap()
    };
    // Three copies as a multi-backend key writes them: local, AWS (key ARN, a 184-byte KMS
    // blob), GCP (the CryptoKeyVersion name, a 110-byte Cloud KMS ciphertext).
    let aws_blob = [0x6bu8; 184];
    let gcp_blob = [0x7cu8; 110];
    let arn = "arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab";
    let gcp_key = "projects/p/locations/europe-west1/keyRings/r/cryptoKeys/orders";
    let gcp_version = format!("{gcp_key}/cryptoKeyVersions/1");
    let three = [
        copy,
        WrappedCopy {
            backend: BackendKind::Aws,
            key_id: arn,
            key_version: arn,
            wrapped: &aws_blob,
        },
        WrappedCopy {
            backend: BackendKind::Gcp,
            key_id: gcp_key,
            key_version: &gcp_version,
            wrapped: &gcp_blob,
        },
    ];
    let seal_three = || {
        let mut salt = [0u8; SALT_LEN];
        random_fill(&mut salt).unwrap();
        envelope::seal_with_salt(
            FORMAT_VERSION,
            Kind::Message,
            "default",
            caller,
            &three,
            &dk,
            &context,
            &payload,
            &salt,
        )
        .unwrap()
    };
    let v3_ct = seal_three();
    let v1_ct = seal(LEGACY_VERSION);
    let v2_ct = seal(FORMAT_VERSION);
    let open = |ct: &[u8]| envelope::parse(ct).unwrap().open(&dk, &context).unwrap();
    // Warm up (the first RNG call is slow in aws-lc).
    for _ in 0..2000 {
        black_box(seal(LEGACY_VERSION));
        black_box(seal(FORMAT_VERSION));
    }
    let (mut s1, mut s2, mut o1, mut o2, mut d) = (vec![], vec![], vec![], vec![], vec![]);
    let (mut s3, mut o3) = (vec![], vec![]);
    for _ in 0..ROUNDS {
        s1.push(round(|| {
            black_box(seal(LEGACY_VERSION));
        }));
        s2.push(round(|| {
            black_box(seal(FORMAT_VERSION));
        }));
        o1.push(round(|| {
            black_box(open(&v1_ct));
        }));
        o2.push(round(|| {
            black_box(open(&v2_ct));
        }));
        s3.push(round(|| {
            black_box(seal_three());
        }));
        o3.push(round(|| {
            black_box(open(&v3_ct));
        }));
        d.push(round(|| {
            black_box(
                envelope::seal_derived_data_key("default", caller, &[copy], &dk, &context, 32)
                    .unwrap(),
            );
        }));
    }
    let (s1, s2, o1, o2, d) = (stats(s1), stats(s2), stats(o1), stats(o2), stats(d));
    let (s3, o3) = (stats(s3), stats(o3));
    println!(
        "envelope, 1 KiB payload, 2-pair context, {ROUNDS} interleaved rounds x {PER_ROUND} ops"
    );
    println!(
        "| op | format 1 ns (median / min) | format 2 ns (median / min) | 2 / 1 (median / min) |"
    );
    println!("|---|---:|---:|---:|");
    for (name, a, b) in [
        ("seal (incl. 32-byte salt)", s1, s2),
        ("parse + open", o1, o2),
    ] {
        println!(
            "| {name} | {:.0} / {:.0} | {:.0} / {:.0} | {:.3} / {:.3} |",
            a.0,
            a.1,
            b.0,
            b.1,
            b.0 / a.0,
            b.1 / a.1
        );
    }
    println!(
        "GenerateDataKey blob + derived key (format 2 only): {:.0} / {:.0} ns",
        d.0, d.1
    );
    println!(
        "format 2, three copies (local, AWS, GCP; {} vs {} bytes): seal {:.0} / {:.0} ns ({:.3} / {:.3} of one copy), parse + open {:.0} / {:.0} ns ({:.3} / {:.3})",
        v3_ct.len(),
        v2_ct.len(),
        s3.0,
        s3.1,
        s3.0 / s2.0,
        s3.1 / s2.1,
        o3.0,
        o3.1,
        o3.0 / o2.0,
        o3.1 / o2.1
    );
}
