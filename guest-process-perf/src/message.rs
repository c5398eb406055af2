//! The kanade `ProcessPerf` message written by hand, byte for byte as `serde_json` writes
//! `collector_shared::ProcessPerf` (and as kanade's own agent does): keys in declaration
//! order, strings escaped as serde_json escapes them, `at` as chrono writes a UTC time,
//! floats in the shortest form that reads back exactly (zmij, serde_json's own float
//! writer). A generic serializer and a date library were most of the guest's size and a
//! good part of its tick; this knows one message and nothing else.

/// A wall-clock instant: seconds since the Unix epoch and nanoseconds past them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct WallTime {
    pub seconds: i64,
    pub nanoseconds: u32,
}

/// Days from 1970-01-01 to the first day of the earliest and the last day of the latest
/// year chrono represents (-262143 and 262142): outside them the message cannot be
/// written as kanade would, and a tick refuses the time.
const MIN_DAY: i64 = days_from_civil(-262_143, 1, 1);
const MAX_DAY: i64 = days_from_civil(262_142, 12, 31);

impl WallTime {
    /// Whether chrono (so kanade's backend) can represent this instant.
    pub fn in_range(self) -> bool {
        self.nanoseconds < 1_000_000_000
            && (MIN_DAY..=MAX_DAY).contains(&self.seconds.div_euclid(86_400))
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
const fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = month as i64;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + day as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The proleptic Gregorian date of a day count since 1970-01-01.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// One row of the message.
pub struct Row<'a> {
    pub pid: u32,
    pub name: &'a str,
    pub cpu_pct: f64,
    pub rss_bytes: i64,
    pub disk_read_bytes_per_sec: Option<f64>,
    pub disk_written_bytes_per_sec: Option<f64>,
}

/// Writes a message into a caller's buffer (reused across ticks): [`begin`], a
/// [`row`] per process, [`end`].
pub fn begin(out: &mut Vec<u8>, pc_id: &str, at: WallTime) {
    out.clear();
    out.extend_from_slice(b"{\"pc_id\":");
    string(out, pc_id);
    out.extend_from_slice(b",\"at\":\"");
    datetime(out, at);
    out.extend_from_slice(b"\",\"processes\":[");
}

/// Appends one process; `first` for the first row of the message.
pub fn row(out: &mut Vec<u8>, first: bool, row: &Row<'_>) {
    if !first {
        out.push(b',');
    }
    out.extend_from_slice(b"{\"pid\":");
    unsigned(out, u64::from(row.pid));
    out.extend_from_slice(b",\"name\":");
    string(out, row.name);
    out.extend_from_slice(b",\"cpu_pct\":");
    float(out, row.cpu_pct);
    out.extend_from_slice(b",\"rss_bytes\":");
    if row.rss_bytes < 0 {
        out.push(b'-');
    }
    unsigned(out, row.rss_bytes.unsigned_abs());
    if let Some(rate) = row.disk_read_bytes_per_sec {
        out.extend_from_slice(b",\"disk_read_bytes_per_sec\":");
        float(out, rate);
    }
    if let Some(rate) = row.disk_written_bytes_per_sec {
        out.extend_from_slice(b",\"disk_written_bytes_per_sec\":");
        float(out, rate);
    }
    out.push(b'}');
}

/// Closes the message.
pub fn end(out: &mut Vec<u8>) {
    out.extend_from_slice(b"]}");
}

fn unsigned(out: &mut Vec<u8>, mut n: u64) {
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
    out.extend_from_slice(&digits[i..]);
}

/// `n` with at least `width` digits, zero-padded.
fn padded(out: &mut Vec<u8>, n: u64, width: usize) {
    let mut digits = [b'0'; 20];
    let mut i = digits.len();
    let mut rest = n;
    while rest > 0 {
        i -= 1;
        digits[i] = b'0' + (rest % 10) as u8;
        rest /= 10;
    }
    let start = i.min(digits.len() - width);
    out.extend_from_slice(&digits[start..]);
}

/// serde_json's number form: shortest round-trip digits, `null` for what JSON lacks.
fn float(out: &mut Vec<u8>, x: f64) {
    if x.is_finite() {
        out.extend_from_slice(zmij::Buffer::new().format_finite(x).as_bytes());
    } else {
        out.extend_from_slice(b"null");
    }
}

/// A JSON string as serde_json escapes it: `"`, `\` and control characters only.
fn string(out: &mut Vec<u8>, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push(b'"');
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escape: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            0x08 => b"\\b",
            0x09 => b"\\t",
            0x0a => b"\\n",
            0x0c => b"\\f",
            0x0d => b"\\r",
            0x00..=0x1f => &[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[usize::from(b >> 4)],
                HEX[usize::from(b & 0xf)],
            ],
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        out.extend_from_slice(escape);
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

/// RFC 3339 in UTC as chrono writes it: `Z`, and a fraction of 3, 6 or 9 digits only
/// when there is one; years outside 0..=9999 signed and at least four digits wide.
fn datetime(out: &mut Vec<u8>, at: WallTime) {
    let days = at.seconds.div_euclid(86_400);
    let secs = at.seconds.rem_euclid(86_400) as u64;
    let (year, month, day) = civil_from_days(days);
    if (0..=9999).contains(&year) {
        padded(out, year as u64, 4);
    } else {
        out.push(if year < 0 { b'-' } else { b'+' });
        padded(out, year.unsigned_abs(), 4);
    }
    out.push(b'-');
    padded(out, u64::from(month), 2);
    out.push(b'-');
    padded(out, u64::from(day), 2);
    out.push(b'T');
    padded(out, secs / 3600, 2);
    out.push(b':');
    padded(out, secs / 60 % 60, 2);
    out.push(b':');
    padded(out, secs % 60, 2);
    let nanos = u64::from(at.nanoseconds);
    if nanos != 0 {
        out.push(b'.');
        if nanos % 1_000_000 == 0 {
            padded(out, nanos / 1_000_000, 3);
        } else if nanos % 1_000 == 0 {
            padded(out, nanos / 1_000, 6);
        } else {
            padded(out, nanos, 9);
        }
    }
    out.push(b'Z');
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::DateTime;
    use collector_shared::{ProcessPerf, ProcessSnapshot};

    /// The reference: the shared wire type through serde_json, as kanade writes it.
    fn serde(pc_id: &str, at: WallTime, rows: &[Row<'_>]) -> Vec<u8> {
        let message = ProcessPerf {
            pc_id: pc_id.into(),
            at: DateTime::from_timestamp(at.seconds, at.nanoseconds).unwrap(),
            processes: rows
                .iter()
                .map(|r| ProcessSnapshot {
                    pid: r.pid,
                    name: r.name.into(),
                    cpu_pct: r.cpu_pct,
                    rss_bytes: r.rss_bytes,
                    disk_read_bytes_per_sec: r.disk_read_bytes_per_sec,
                    disk_written_bytes_per_sec: r.disk_written_bytes_per_sec,
                })
                .collect(),
        };
        serde_json::to_vec(&message).unwrap()
    }

    fn ours(pc_id: &str, at: WallTime, rows: &[Row<'_>]) -> Vec<u8> {
        let mut out = Vec::new();
        begin(&mut out, pc_id, at);
        for (i, r) in rows.iter().enumerate() {
            row(&mut out, i == 0, r);
        }
        end(&mut out);
        out
    }

    /// A small deterministic generator, so the comparison covers many values.
    struct Lcg(u64);

    impl Lcg {
        fn next(&mut self) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            self.0 >> 11
        }
    }

    #[test]
    fn byte_identical_to_serde_json_on_awkward_values() {
        let names = [
            "",
            "postgres",
            "quo\"te\\back",
            "tab\tnew\nline\r\x08\x0c\x01\x1f\x7f",
            "héllo wörld ✓ 🦀",
        ];
        let mut rng = Lcg(7);
        for round in 0..2_000 {
            let cpu = match round % 5 {
                0 => f64::from(f32::from_bits(rng.next() as u32 & 0x7f7f_ffff)),
                1 => f64::from((rng.next() % 100_000) as f32 / 100.0),
                2 => 0.0,
                3 => 1e16 * (rng.next() % 10) as f64,
                _ => f64::from_bits(rng.next() & 0x7fef_ffff_ffff_ffff),
            };
            let rate = (rng.next() % 1_000_000) as f64 / ((rng.next() % 997) as f64 + 0.001);
            let rows = [
                Row {
                    pid: rng.next() as u32,
                    name: names[round % names.len()],
                    cpu_pct: cpu,
                    rss_bytes: (rng.next() as i64).abs(),
                    disk_read_bytes_per_sec: (round % 3 != 0).then_some(rate),
                    disk_written_bytes_per_sec: (round % 3 != 0).then_some(rate / 3.0),
                },
                Row {
                    pid: 0,
                    name: "x",
                    cpu_pct: 0.5,
                    rss_bytes: i64::MAX,
                    disk_read_bytes_per_sec: None,
                    disk_written_bytes_per_sec: None,
                },
            ];
            let at = WallTime {
                seconds: (rng.next() % 8_000_000_000_000) as i64 - 4_000_000_000_000,
                nanoseconds: match round % 4 {
                    0 => 0,
                    1 => (rng.next() % 1000) as u32 * 1_000_000,
                    2 => (rng.next() % 1_000_000) as u32 * 1_000,
                    _ => (rng.next() % 1_000_000_000) as u32,
                },
            };
            let n = round % 3;
            assert_eq!(
                String::from_utf8(ours("pc-\"1", at, &rows[..n])).unwrap(),
                String::from_utf8(serde("pc-\"1", at, &rows[..n])).unwrap()
            );
        }
    }

    #[test]
    fn the_edges_of_time_chrono_knows() {
        let max = DateTime::<chrono::Utc>::MAX_UTC;
        let min = DateTime::<chrono::Utc>::MIN_UTC;
        for at in [max, min] {
            let wall = WallTime {
                seconds: at.timestamp(),
                nanoseconds: at.timestamp_subsec_nanos(),
            };
            assert!(wall.in_range());
            assert_eq!(ours("a", wall, &[]), serde("a", wall, &[]));
        }
        let past_max = WallTime {
            seconds: max.timestamp() + 1,
            nanoseconds: 0,
        };
        let before_min = WallTime {
            seconds: min.timestamp() - 1,
            nanoseconds: 0,
        };
        assert!(!past_max.in_range() && !before_min.in_range());
        assert!(DateTime::from_timestamp(past_max.seconds, 0).is_none());
        assert!(DateTime::from_timestamp(before_min.seconds, 0).is_none());
    }
}
