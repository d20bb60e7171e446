//! Small helpers shared by several modules: RFC 3339 timestamps, human durations and sizes,
//! atomic durable file writes, and key/caller name rules.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Formats a time as RFC 3339 UTC with microseconds, e.g. `2026-11-29T23:45:08.123456Z`.
pub fn rfc3339(t: SystemTime) -> String {
    let mut out = Vec::with_capacity(27);
    write_rfc3339(t, &mut out);
    String::from_utf8(out).unwrap_or_default()
}

/// [`rfc3339`] appended to a buffer, digit by digit (it runs once per audit record).
pub fn write_rfc3339(t: SystemTime, out: &mut Vec<u8>) {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    let (y, m, day) = civil_from_days(days);
    fn num(out: &mut Vec<u8>, v: u64, width: usize) {
        let mut digits = [b'0'; 20];
        let mut v = v;
        for i in (0..width).rev() {
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
        out.extend_from_slice(&digits[..width]);
    }
    num(out, y.clamp(0, 9999) as u64, 4);
    out.push(b'-');
    num(out, m as u64, 2);
    out.push(b'-');
    num(out, day as u64, 2);
    out.push(b'T');
    num(out, rem / 3600, 2);
    out.push(b':');
    num(out, (rem / 60) % 60, 2);
    out.push(b':');
    num(out, rem % 60, 2);
    out.push(b'.');
    num(out, d.subsec_micros() as u64, 6);
    out.push(b'Z');
}

pub fn rfc3339_now() -> String {
    rfc3339(SystemTime::now())
}

/// Parses the RFC 3339 UTC times this crate writes (`2026-11-29T23:45:08.123456Z`; fraction
/// optional, `Z` or `+00:00` only): keyring version times, deletion dates, audit record times.
pub fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    let s = s.trim();
    let body = s.strip_suffix('Z').or_else(|| s.strip_suffix("+00:00"))?;
    let (date, time) = body.split_once(['T', 't'])?;
    let mut d = date.splitn(3, '-');
    let y: i64 = d.next()?.parse().ok()?;
    let m: u32 = d.next()?.parse().ok()?;
    let day: u32 = d.next()?.parse().ok()?;
    let (hms, frac) = match time.split_once('.') {
        Some((a, b)) => (a, Some(b)),
        None => (time, None),
    };
    let mut t = hms.splitn(3, ':');
    let hh: u64 = t.next()?.parse().ok()?;
    let mm: u64 = t.next()?.parse().ok()?;
    let ss: u64 = t.next()?.parse().ok()?;
    if !(1..=12).contains(&m) || !(1..=31).contains(&day) || hh > 23 || mm > 59 || ss > 60 {
        return None;
    }
    let nanos = match frac {
        Some(f) if !f.is_empty() && f.len() <= 9 && f.bytes().all(|b| b.is_ascii_digit()) => {
            f.parse::<u32>().ok()? * 10u32.pow(9 - f.len() as u32)
        }
        Some(_) => return None,
        None => 0,
    };
    let days = days_from_civil(y, m, day);
    let secs = u64::try_from(days).ok()? * 86_400 + hh * 3600 + mm * 60 + ss;
    Some(UNIX_EPOCH + Duration::new(secs, nanos))
}

/// The inverse of [`civil_from_days`].
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = i64::from(if m > 2 { m - 3 } else { m + 9 });
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Howard Hinnant's days-to-civil algorithm (proleptic Gregorian calendar).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Parses durations like `500ms`, `30s`, `5m`, `2h`, `1d` (one number, one unit).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{s:?} has no unit (use ms, s, m, h or d)"))?;
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 30s or 5m"))?;
    let mul_ms: u64 = match unit {
        "ms" => 1,
        "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => {
            return Err(format!(
                "{s:?} has unknown unit {unit:?} (use ms, s, m, h or d)"
            ));
        }
    };
    n.checked_mul(mul_ms)
        .map(Duration::from_millis)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// Formats a duration the way `parse_duration` reads it.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    for (unit, size) in [
        ("d", 86_400_000u128),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1000),
    ] {
        if ms >= size && ms.is_multiple_of(size) {
            return format!("{}{unit}", ms / size);
        }
    }
    format!("{ms}ms")
}

/// The longest ISO 8601 duration [`parse_iso8601_duration`] looks at, and the largest it
/// returns (1000 years): a provider's answer is bounded before it becomes a schedule.
const ISO8601_MAX_LEN: usize = 64;
const ISO8601_MAX_SECS: u64 = 1000 * 365 * 86_400;

/// Parses an ISO 8601 duration as Key Vault writes them (`P90D`, `P1Y10D`, `PT48H`, `P3M`,
/// `P2W`, `P1DT12H30M5S`): whole numbers only, each unit at most once and in order. A year is
/// counted as 365 days and a month as 30 (the calendar is not known here; the result is
/// approximate by up to a few days, which docs/lifecycle.md says). `None` for anything else
/// (empty, negative, fractional, over [`ISO8601_MAX_LEN`] characters or 1000 years): the
/// caller treats that as "period unknown", never as an error.
pub fn parse_iso8601_duration(s: &str) -> Option<Duration> {
    if s.len() > ISO8601_MAX_LEN || !s.is_ascii() {
        return None;
    }
    let rest = s.strip_prefix(['P', 'p'])?;
    let (date, time) = match rest.find(['T', 't']) {
        Some(i) => (&rest[..i], Some(&rest[i + 1..])),
        None => (rest, None),
    };
    let mut total: u64 = 0;
    let mut any = false;
    let mut add = |part: &str, units: &[(char, u64)]| -> Option<()> {
        let mut next_unit = 0;
        let mut num = String::new();
        for c in part.chars() {
            if c.is_ascii_digit() {
                num.push(c);
                continue;
            }
            let c = c.to_ascii_uppercase();
            let at = units[next_unit..].iter().position(|(u, _)| *u == c)? + next_unit;
            let n: u64 = num.parse().ok()?;
            total = total.checked_add(n.checked_mul(units[at].1)?)?;
            num.clear();
            next_unit = at + 1;
            any = true;
        }
        num.is_empty().then_some(())
    };
    add(
        date,
        &[
            ('Y', 365 * 86_400),
            ('M', 30 * 86_400),
            ('W', 7 * 86_400),
            ('D', 86_400),
        ],
    )?;
    if let Some(time) = time {
        // `PT` alone, or a `T` with nothing after it, is not a duration.
        if time.is_empty() {
            return None;
        }
        add(time, &[('H', 3600), ('M', 60), ('S', 1)])?;
    }
    (any && total <= ISO8601_MAX_SECS).then(|| Duration::from_secs(total))
}

/// Parses sizes like `4096`, `64KiB`, `4MiB`, `1GiB` (binary units; plain numbers are bytes).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size like 4MiB"))?;
    let mul: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        other => {
            return Err(format!(
                "{s:?} has unknown unit {other:?} (use B, KiB, MiB, GiB, TiB)"
            ));
        }
    };
    n.checked_mul(mul)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// A file's identity for change detection by polling: inode, size and modification time. An
/// atomic replace (rename, or Kubernetes' `..data` symlink swap) changes the inode even when
/// size and mtime collide.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStamp {
    ino: u64,
    len: u64,
    mtime_ns: i128,
}

impl FileStamp {
    /// The stamp of the file `path` points to (following symlinks), if it exists.
    pub fn of(path: &Path) -> Option<Self> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path).ok()?;
        Some(Self {
            ino: m.ino(),
            len: m.len(),
            mtime_ns: m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128,
        })
    }
}

/// Longest key name and caller name (bytes); the envelope format's limit too.
pub const MAX_NAME_LEN: usize = 128;

/// Key names and caller names: 1 to 128 bytes of `[A-Za-z0-9._:/@-]`, which keeps them safe as
/// metric label values, log fields and file names, and within the envelope's name limit.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(format!(
            "{:?} must be 1 to {MAX_NAME_LEN} bytes",
            Capped(name),
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':' | '/' | '@')))
    {
        return Err(format!(
            "{:?} contains {c:?}; use letters, digits and . _ - : / @",
            Capped(name)
        ));
    }
    Ok(())
}

/// Replaces `path` with `contents` so that a crash at any instant leaves either the old or the
/// new file, never a torn one, and (as far as the filesystem allows) no second copy of the
/// contents under another name. The file is created with `mode`.
///
/// On Linux the contents are first written to an unnamed file (`O_TMPFILE`): a crash before it
/// is complete leaves nothing on disk to clean up. Only when it is complete and fsynced does it
/// get a temporary name (an unpredictable one, [`temp_prefix`]), which is at once renamed over
/// the target; a crash between those two calls leaves a temporary file that
/// [`remove_stale_temps`] deletes. Where `O_TMPFILE` is not supported, the temporary file is
/// created directly under such a name with `O_EXCL | O_NOFOLLOW`, so a planted file or symlink
/// is never written through. Callers that can crash mid-write serialize writers (a lock) and
/// call [`remove_stale_temps`] under it.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let tmp = dir.join(format!("{}{}", temp_prefix(path)?, random_suffix()?));
    let result = match write_unnamed(dir, &tmp, contents, mode) {
        Ok(()) => Ok(()),
        Err(Unnamed::Unsupported) => write_named(&tmp, contents, mode),
        Err(Unnamed::Failed(e)) => Err(e),
    }
    .and_then(|()| fs::rename(&tmp, path))
    .and_then(|()| File::open(dir)?.sync_all());
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// The name prefix of [`write_atomic`]'s temporary files for `path`: `.NAME.tmp.`.
pub fn temp_prefix(path: &Path) -> io::Result<String> {
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    Ok(format!(".{}.tmp.", name.to_string_lossy()))
}

/// Deletes temporary files a crashed [`write_atomic`] of `path` left (regular files only;
/// a symlink with that name is left alone). Only safe while no other writer of `path` can be
/// between its write and its rename: call it under the writers' lock. Returns how many went.
pub fn remove_stale_temps(path: &Path) -> io::Result<usize> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let prefix = temp_prefix(path)?;
    let mut removed = 0;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if !entry.file_name().to_string_lossy().starts_with(&prefix) {
            continue;
        }
        if entry.file_type()?.is_file() {
            match fs::remove_file(entry.path()) {
                Ok(()) => removed += 1,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
    }
    if removed > 0 {
        File::open(dir)?.sync_all()?;
    }
    Ok(removed)
}

fn random_suffix() -> io::Result<String> {
    let mut b = [0u8; 12];
    crate::secret::random_fill(&mut b)
        .map_err(|_| io::Error::other("the system random number generator failed"))?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

enum Unnamed {
    /// No `O_TMPFILE` here (kernel, filesystem or no /proc): use a named temporary file.
    Unsupported,
    Failed(io::Error),
}

/// Writes `contents` to an unnamed file in `dir`, then links it in as `tmp`.
fn write_unnamed(dir: &Path, tmp: &Path, contents: &[u8], mode: u32) -> Result<(), Unnamed> {
    use rustix::fs::{AtFlags, CWD, Mode, OFlags, linkat, openat};
    use std::os::fd::AsRawFd;
    let fd = openat(
        CWD,
        dir,
        OFlags::TMPFILE | OFlags::WRONLY | OFlags::CLOEXEC,
        Mode::from_raw_mode(mode),
    )
    .map_err(|_| Unnamed::Unsupported)?;
    let mut f = File::from(fd);
    f.write_all(contents)
        .and_then(|()| f.sync_all())
        .map_err(Unnamed::Failed)?;
    let proc_path = format!("/proc/self/fd/{}", f.as_raw_fd());
    linkat(CWD, proc_path.as_str(), CWD, tmp, AtFlags::SYMLINK_FOLLOW).map_err(|e| match e {
        rustix::io::Errno::NOENT | rustix::io::Errno::NOSYS | rustix::io::Errno::XDEV => {
            Unnamed::Unsupported
        }
        e => Unnamed::Failed(e.into()),
    })
}

fn write_named(tmp: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .mode(mode)
        .open(tmp)?;
    f.write_all(contents)?;
    f.sync_all()
}

/// A caller-supplied string as it may appear in an error message or a log line: at most
/// [`CAP`] characters, control characters and quotes escaped, with a note of what was cut.
/// `Debug` adds quotes. Caller input is never echoed unbounded.
pub struct Capped<'a>(pub &'a str);

/// Characters of caller input that errors and logs show.
pub const CAP: usize = 64;

impl std::fmt::Display for Capped<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut shown = 0;
        for (n, c) in self.0.chars().enumerate() {
            if n == CAP {
                return write!(f, "...({} more bytes)", self.0.len() - shown);
            }
            write!(f, "{}", c.escape_debug())?;
            shown += c.len_utf8();
        }
        Ok(())
    }
}

impl std::fmt::Debug for Capped<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "\"{self}\"")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iso8601_durations() {
        let day = 86_400;
        for (s, secs) in [
            ("P90D", 90 * day),
            ("p90d", 90 * day),
            ("P1Y10D", 375 * day),
            ("P3M", 90 * day),
            ("P2W", 14 * day),
            ("PT48H", 48 * 3600),
            ("P1DT12H30M5S", day + 12 * 3600 + 30 * 60 + 5),
            ("PT0S", 0),
            ("P0D", 0),
            ("PT1M", 60),
            ("P1M", 30 * day),
            ("P1000Y", 1000 * 365 * day),
        ] {
            assert_eq!(
                parse_iso8601_duration(s),
                Some(Duration::from_secs(secs)),
                "{s}"
            );
        }
        let long = format!("P{}D", "9".repeat(70));
        for s in [
            "",
            "P",
            "PT",
            "P1DT",
            "T1H",
            "90D",
            "-P90D",
            "P-1D",
            "P1.5D",
            "P1,5D",
            "P90",
            "PD",
            "P1D1D",
            "P1D1Y",
            "PT1H1H",
            "P1H",
            "PT1D",
            "P1X",
            "P 1D",
            "P1D ",
            "P١D",
            "P1001Y",
            "P18446744073709551615D",
            "P99999999999999999999999D",
            "PT18446744073709551615H",
            long.as_str(),
        ] {
            assert_eq!(parse_iso8601_duration(s), None, "{s:?}");
        }
    }

    #[test]
    fn rfc3339_parses_what_it_writes() {
        for micros in [
            0u64,
            951_782_400_000_001,
            1_795_995_908_123_456,
            4_102_444_800_999_999,
        ] {
            let t = UNIX_EPOCH + Duration::from_micros(micros);
            assert_eq!(parse_rfc3339(&rfc3339(t)), Some(t), "{}", rfc3339(t));
        }
        assert_eq!(
            parse_rfc3339("2026-11-29T23:45:08Z"),
            Some(UNIX_EPOCH + Duration::from_secs(1_795_995_908))
        );
        for bad in [
            "",
            "2026-11-29",
            "2026-13-01T00:00:00Z",
            "2026-11-29T23:45:08+01:00",
            "x",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }

    #[test]
    fn rfc3339_known_values() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000000Z");
        let t = UNIX_EPOCH + Duration::from_micros(1_795_995_908_123_456);
        assert_eq!(rfc3339(t), "2026-11-29T23:45:08.123456Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(&rfc3339(leap)[..10], "2000-02-29");
    }

    #[test]
    fn durations_and_sizes() {
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("5 parsecs").is_err());
        assert_eq!(format_duration(Duration::from_secs(300)), "5m");
        assert_eq!(format_duration(Duration::from_millis(1500)), "1500ms");
        assert_eq!(parse_size("4MiB").unwrap(), 4 << 20);
        assert_eq!(parse_size("100").unwrap(), 100);
        assert!(parse_size("4MB").is_err());
    }

    #[test]
    fn names() {
        assert!(check_name("prod-app_data.v2").is_ok());
        assert!(check_name("spiffe://cluster.local/ns/a/sa/b").is_ok());
        assert!(check_name("").is_err());
        assert!(check_name("a b").is_err());
        assert!(check_name(&"x".repeat(129)).is_err());
        let long = check_name(&"y".repeat(1 << 20)).unwrap_err();
        assert!(long.len() < 200, "{long}");
        assert!(long.contains("more bytes"), "{long}");
    }

    #[test]
    fn capped_escapes_and_truncates() {
        assert_eq!(Capped("a\"b\n").to_string(), r#"a\"b\n"#);
        assert_eq!(format!("{:?}", Capped("k")), "\"k\"");
        let s = "é".repeat(100);
        let out = Capped(&s).to_string();
        assert!(out.starts_with(&"é".repeat(CAP)));
        assert!(out.ends_with("(72 more bytes)"), "{out}");
    }

    #[test]
    fn atomic_writes_leave_no_temporary_file_and_never_follow_a_planted_symlink() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        write_atomic(&path, b"one", 0o600).unwrap();
        write_atomic(&path, b"two", 0o600).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["f"], "only the target remains");
        // The fallback path: exclusive create, no symlink following.
        let victim = dir.path().join("victim");
        fs::write(&victim, b"keep").unwrap();
        let planted = dir.path().join(".f.tmp.planted");
        std::os::unix::fs::symlink(&victim, &planted).unwrap();
        assert!(write_named(&planted, b"secret", 0o600).is_err());
        assert_eq!(fs::read(&victim).unwrap(), b"keep");
        // Cleanup removes regular temporary files, not symlinks and not other files.
        fs::write(dir.path().join(".f.tmp.1234"), b"stale").unwrap();
        assert_eq!(remove_stale_temps(&path).unwrap(), 1);
        assert!(planted.symlink_metadata().is_ok());
        assert!(victim.exists() && path.exists());
    }
}
