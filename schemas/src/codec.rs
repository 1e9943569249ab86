//! Batch encoding (JSON, then one zstd frame) and a bounded decoder.
//!
//! The decoder never trusts the sender: it checks the frame's declared size before
//! allocating, stops reading at the limit, and reports what was wrong as a typed
//! [`DecodeError`] that the aggregator copies into the dead-letter stream.

use std::io::Read;

use serde::Deserialize;

use crate::batch::{parse_major, Batch, SCHEMA_MAJOR};
use crate::metric::MAX_STEP;

/// Largest decompressed batch a consumer accepts by default (32 MiB). Producers keep
/// every batch's JSON under [`MAX_BATCH_JSON_BYTES`], well below it.
pub const DEFAULT_DECODE_LIMIT: usize = 32 << 20;
/// Largest JSON body a producer puts in one batch before splitting (8 MiB).
pub const MAX_BATCH_JSON_BYTES: usize = 8 << 20;
/// zstd level used by producers: fast, and more than 5x on log text.
pub const COMPRESSION_LEVEL: i32 = 3;

const ZSTD_MAGIC: [u8; 4] = [0x28, 0xB5, 0x2F, 0xFD];

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("not a zstd frame: {0}")]
    Garbage(String),
    #[error("truncated zstd frame: {0}")]
    Truncated(String),
    #[error("batch too large: {size} bytes decompressed ({what}), limit {limit}")]
    TooLarge {
        size: u64,
        limit: usize,
        what: &'static str,
    },
    #[error("unknown schema major version {found:?} (this build reads {SCHEMA_MAJOR}.x)")]
    UnknownVersion { found: String },
    #[error("batch is not valid JSON of schema {SCHEMA_MAJOR}.x: {0}")]
    Malformed(String),
}

impl DecodeError {
    /// Every [`kind`](Self::kind).
    pub const KINDS: [&'static str; 5] = [
        "garbage",
        "truncated",
        "too_large",
        "unknown_version",
        "malformed",
    ];

    /// A short, stable reason code for metrics and the dead-letter header.
    pub fn kind(&self) -> &'static str {
        match self {
            DecodeError::Garbage(_) => "garbage",
            DecodeError::Truncated(_) => "truncated",
            DecodeError::TooLarge { .. } => "too_large",
            DecodeError::UnknownVersion { .. } => "unknown_version",
            DecodeError::Malformed(_) => "malformed",
        }
    }
}

/// An encoded batch, with the size of its JSON for accounting.
pub struct Encoded {
    pub payload: Vec<u8>,
    pub json_len: usize,
}

/// Serialises `batch` to JSON and compresses it into one zstd frame that declares its
/// content size.
pub fn encode(batch: &Batch) -> Encoded {
    let json = serde_json::to_vec(batch).expect("a batch always serialises");
    let payload = zstd::bulk::compress(&json, COMPRESSION_LEVEL)
        .expect("zstd compression of an in-memory buffer");
    Encoded {
        json_len: json.len(),
        payload,
    }
}

/// The decompressed size a frame declares in its header, if it declares one and the
/// header is readable. (Producers always declare it.)
pub fn declared_size(bytes: &[u8]) -> Option<u64> {
    zstd::zstd_safe::get_frame_content_size(bytes)
        .ok()
        .flatten()
}

/// Decodes one batch, refusing anything that would decompress to more than `limit`
/// bytes, without allocating more than `limit` + 1 bytes.
pub fn decode(bytes: &[u8], limit: usize) -> Result<Batch, DecodeError> {
    if bytes.len() < 4 || bytes[..4] != ZSTD_MAGIC {
        return Err(DecodeError::Garbage(format!(
            "{} bytes without the zstd magic number",
            bytes.len()
        )));
    }
    let declared = zstd::zstd_safe::get_frame_content_size(bytes)
        .map_err(|_| DecodeError::Garbage("unreadable zstd frame header".into()))?;
    if let Some(size) = declared {
        if size > limit as u64 {
            return Err(DecodeError::TooLarge {
                size,
                limit,
                what: "declared",
            });
        }
    }
    match zstd::zstd_safe::find_frame_compressed_size(bytes) {
        Err(code) => {
            return Err(DecodeError::Truncated(format!(
                "{} bytes do not hold a whole frame ({})",
                bytes.len(),
                zstd::zstd_safe::get_error_name(code)
            )))
        }
        Ok(n) if n < bytes.len() => {
            return Err(DecodeError::Garbage(format!(
                "{} trailing bytes after the frame",
                bytes.len() - n
            )))
        }
        Ok(_) => {}
    }
    let json = inflate(bytes, declared, limit)?;
    from_json(&json)
}

/// Decompresses one frame into at most `limit` bytes. The decoder's window is capped
/// to the limit too, so a frame cannot make zstd allocate a larger window than that,
/// and the output buffer grows by doubling only up to `limit` + 1.
fn inflate(bytes: &[u8], declared: Option<u64>, limit: usize) -> Result<Vec<u8>, DecodeError> {
    let corrupt = |e: std::io::Error| DecodeError::Garbage(format!("corrupt zstd data: {e}"));
    let mut decoder = zstd::stream::read::Decoder::with_buffer(bytes).map_err(corrupt)?;
    let window_log =
        (usize::BITS - limit.max(1 << 10).next_power_of_two().leading_zeros() - 1).max(10);
    decoder.window_log_max(window_log).map_err(corrupt)?;
    let mut json: Vec<u8> =
        Vec::with_capacity(declared.map_or(64 << 10, |n| n as usize + 1).min(limit + 1));
    let mut chunk = [0u8; 64 << 10];
    loop {
        let n = decoder.read(&mut chunk).map_err(|e| {
            if e.to_string().contains("Frame requires too much memory") {
                DecodeError::TooLarge {
                    size: 1 << window_log,
                    limit,
                    what: "window",
                }
            } else {
                corrupt(e)
            }
        })?;
        if n == 0 {
            return Ok(json);
        }
        if json.len() + n > limit {
            return Err(DecodeError::TooLarge {
                size: (json.len() + n) as u64,
                limit,
                what: "actual",
            });
        }
        if json.capacity() - json.len() < n {
            let want = (json.capacity() * 2).max(json.len() + n).min(limit + 1);
            json.reserve_exact(want - json.len());
        }
        json.extend_from_slice(&chunk[..n]);
    }
}

fn from_json(json: &[u8]) -> Result<Batch, DecodeError> {
    #[derive(Deserialize)]
    struct VersionProbe {
        v: serde_json::Value,
    }
    let unknown = |v: &serde_json::Value| DecodeError::UnknownVersion {
        found: v.as_str().map_or_else(|| v.to_string(), str::to_string),
    };
    let parsed = serde_json::from_slice::<Batch>(json).or_else(|e| match repair_surrogates(json) {
        Some(repaired) => serde_json::from_slice::<Batch>(&repaired),
        None => Err(e),
    });
    match parsed {
        Ok(batch) if batch.major() == Some(SCHEMA_MAJOR) => check_ranges(batch),
        Ok(batch) => Err(unknown(&serde_json::Value::String(batch.v))),
        Err(e) => match serde_json::from_slice::<VersionProbe>(json) {
            Ok(probe) if probe.v.as_str().and_then(parse_major) != Some(SCHEMA_MAJOR) => {
                Err(unknown(&probe.v))
            }
            _ => Err(DecodeError::Malformed(e.to_string())),
        },
    }
}

/// JSON text whose `\uD800`–`\uDFFF` escapes that are not a surrogate pair (a lone
/// half, which Python's `json.dumps` writes for such a string) are each written as
/// `\uFFFD`, the replacement character; `None` when there is none. Rust strings cannot
/// hold a lone surrogate, so without this one bad character would refuse a whole batch
/// from a producer in another language. Backslashes occur only inside JSON strings, so
/// no string tracking is needed.
fn repair_surrogates(json: &[u8]) -> Option<Vec<u8>> {
    fn escape_at(json: &[u8], at: usize) -> Option<u32> {
        let hex = json.get(at..at + 6)?;
        if hex[0] != b'\\' || hex[1] != b'u' {
            return None;
        }
        u32::from_str_radix(std::str::from_utf8(&hex[2..]).ok()?, 16).ok()
    }
    let mut out: Option<Vec<u8>> = None;
    let mut copied = 0;
    let mut i = 0;
    while i < json.len() {
        if json[i] != b'\\' {
            i += 1;
            continue;
        }
        let width = match escape_at(json, i) {
            Some(0xD800..=0xDBFF) if matches!(escape_at(json, i + 6), Some(0xDC00..=0xDFFF)) => 12,
            Some(0xD800..=0xDFFF) => {
                let out = out.get_or_insert_with(|| Vec::with_capacity(json.len()));
                out.extend_from_slice(&json[copied..i]);
                out.extend_from_slice(b"\\ufffd");
                copied = i + 6;
                6
            }
            Some(_) => 6,
            None => 2,
        };
        i += width;
    }
    let mut out = out?;
    out.extend_from_slice(&json[copied.min(json.len())..]);
    Some(out)
}

/// Refuses what parses but cannot be stored: a `batch_seq`, `seq`, final count or
/// metric step over [`MAX_STEP`] (the database holds signed 64-bit integers).
fn check_ranges(batch: Batch) -> Result<Batch, DecodeError> {
    // Sequence numbers are stored as signed 64-bit integers, and consumers add one to
    // them: a larger one on the wire is refused here, not trusted there.
    let too_large = |what: &str, n: u64| {
        DecodeError::Malformed(format!("{what} {n} is over the largest {MAX_STEP}"))
    };
    if batch.batch_seq > MAX_STEP {
        return Err(too_large("batch_seq", batch.batch_seq));
    }
    if let Some(line) = batch.logs.iter().find(|l| l.seq > MAX_STEP) {
        return Err(too_large("log line seq", line.seq));
    }
    if let Some(result) = batch.results.iter().find(|r| r.seq > MAX_STEP) {
        return Err(too_large("result seq", result.seq));
    }
    if let Some(record) = batch.metrics.iter().find(|r| r.seq > MAX_STEP) {
        return Err(too_large("metric record seq", record.seq));
    }
    if let Some(f) = batch.final_.as_ref().filter(|f| f.batches > MAX_STEP) {
        return Err(too_large("final batches", f.batches));
    }
    if let Some(record) = batch.metrics.iter().find(|r| r.step > MAX_STEP) {
        return Err(DecodeError::Malformed(format!(
            "metric record {} has step {}, over the largest step {MAX_STEP}",
            record.seq, record.step
        )));
    }
    Ok(batch)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::{Level, LogLine};

    #[test]
    fn sequence_numbers_over_i64_max_are_refused() {
        let refused = |batch: &Batch| {
            let payload = encode(batch).payload;
            match decode(&payload, DEFAULT_DECODE_LIMIT) {
                Err(DecodeError::Malformed(m)) => m,
                other => panic!("not refused: {other:?}"),
            }
        };
        let mut b = sample();
        b.batch_seq = u64::MAX;
        assert_eq!(
            refused(&b),
            format!("batch_seq {} is over the largest {MAX_STEP}", u64::MAX)
        );
        let mut b = sample();
        b.logs[5].seq = MAX_STEP + 1;
        assert!(refused(&b).starts_with("log line seq"));
        let mut b = sample();
        b.batch_seq = MAX_STEP;
        b.logs[5].seq = MAX_STEP;
        assert!(decode(&encode(&b).payload, DEFAULT_DECODE_LIMIT).is_ok());
    }

    #[test]
    fn a_lone_surrogate_becomes_the_replacement_character_and_a_pair_stays() {
        let repair =
            |s: &str| repair_surrogates(s.as_bytes()).map(|v| String::from_utf8(v).unwrap());
        assert_eq!(
            repair(r#"{"m":"a\ud800b"}"#).as_deref(),
            Some(r#"{"m":"a\ufffdb"}"#)
        );
        assert_eq!(
            repair(r#"{"m":"\udc00\ud83d"}"#).as_deref(),
            Some(r#"{"m":"\ufffd\ufffd"}"#)
        );
        assert_eq!(repair(r#"{"m":"\ud83d\ude42 \\ud800 \n"}"#), None);
        // A whole batch as another language's producer writes it: stored, not refused.
        let mut batch = sample();
        batch.logs[1].message = "PLACEHOLDER".into();
        let json = serde_json::to_string(&batch)
            .unwrap()
            .replace("PLACEHOLDER", r"x\ud800y");
        let payload = zstd::encode_all(json.as_bytes(), 3).unwrap();
        let decoded = decode(&payload, DEFAULT_DECODE_LIMIT).unwrap();
        assert_eq!(decoded.logs[1].message, "x\u{fffd}y");
        assert_eq!(decoded.logs[2], batch.logs[2]);
    }

    fn sample() -> Batch {
        let mut b = Batch::new("run-1", 3, "w1");
        for seq in 0..100 {
            b.logs.push(LogLine {
                seq,
                ts: 1_700_000_000_000_000 + seq as i64,
                level: Level::Info,
                message: format!("step {seq} loss={:.4}", 1.0 / (seq as f64 + 1.0)),
                metadata: None,
            });
        }
        b
    }

    fn frame_of(json: &[u8]) -> Vec<u8> {
        zstd::bulk::compress(json, 3).unwrap()
    }

    #[test]
    fn round_trip() {
        let b = sample();
        let enc = encode(&b);
        assert_eq!(decode(&enc.payload, DEFAULT_DECODE_LIMIT).unwrap(), b);
        assert!(enc.payload.len() < enc.json_len);
    }

    #[test]
    fn garbage_is_rejected() {
        let err = decode(b"hello world, not zstd", DEFAULT_DECODE_LIMIT).unwrap_err();
        assert!(matches!(err, DecodeError::Garbage(_)), "{err}");
        let err = decode(b"", DEFAULT_DECODE_LIMIT).unwrap_err();
        assert!(matches!(err, DecodeError::Garbage(_)), "{err}");
        // The magic number followed by noise.
        let mut noise = ZSTD_MAGIC.to_vec();
        noise.extend((0..200u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8));
        let err = decode(&noise, DEFAULT_DECODE_LIMIT).unwrap_err();
        assert!(
            matches!(err, DecodeError::Garbage(_) | DecodeError::Truncated(_)),
            "{err}"
        );
    }

    #[test]
    fn truncated_frame_is_rejected() {
        let enc = encode(&sample()).payload;
        for cut in [enc.len() - 1, enc.len() / 2, 10] {
            let err = decode(&enc[..cut], DEFAULT_DECODE_LIMIT).unwrap_err();
            assert!(
                matches!(err, DecodeError::Truncated(_)),
                "cut at {cut}: {err}"
            );
        }
    }

    #[test]
    fn trailing_bytes_are_rejected() {
        let mut enc = encode(&sample()).payload;
        enc.extend_from_slice(b"junk");
        assert!(matches!(
            decode(&enc, DEFAULT_DECODE_LIMIT).unwrap_err(),
            DecodeError::Garbage(_)
        ));
    }

    /// A frame whose header declares 1 GiB is refused from the header alone: the
    /// decoder never allocates or inflates it.
    #[test]
    fn frame_declaring_one_gib_is_rejected_before_allocation() {
        // Build the frame with a streaming encoder that pledges 1 GiB, then cut it
        // after the header: the header alone must be enough to refuse it.
        let mut enc = zstd::stream::write::Encoder::new(Vec::new(), 1).unwrap();
        enc.set_pledged_src_size(Some(1 << 30)).unwrap();
        enc.include_contentsize(true).unwrap();
        enc.write_all(&[b'a'; 4096]).unwrap();
        enc.flush().unwrap();
        let bytes = enc.get_ref().clone();
        assert_eq!(
            zstd::zstd_safe::get_frame_content_size(&bytes).unwrap(),
            Some(1 << 30)
        );
        let err = decode(&bytes, DEFAULT_DECODE_LIMIT).unwrap_err();
        match err {
            DecodeError::TooLarge { size, what, .. } => {
                assert_eq!(size, 1 << 30);
                assert_eq!(what, "declared");
            }
            other => panic!("expected TooLarge, got {other}"),
        }
    }

    /// A frame that does not declare its size but inflates past the limit is cut off
    /// at the limit.
    #[test]
    fn frame_inflating_past_the_limit_is_rejected() {
        let mut enc = zstd::stream::write::Encoder::new(Vec::new(), 1).unwrap();
        enc.include_contentsize(false).unwrap();
        enc.write_all(&vec![b'x'; 2 << 20]).unwrap();
        let bytes = enc.finish().unwrap();
        assert_eq!(
            zstd::zstd_safe::get_frame_content_size(&bytes).unwrap(),
            None
        );
        let err = decode(&bytes, 1 << 20).unwrap_err();
        assert!(
            matches!(err, DecodeError::TooLarge { what: "actual", .. }),
            "{err}"
        );
    }

    #[test]
    fn unknown_major_version_is_rejected() {
        let mut b = sample();
        b.v = "2.0".into();
        let err = decode(&encode(&b).payload, DEFAULT_DECODE_LIMIT).unwrap_err();
        assert!(
            matches!(&err, DecodeError::UnknownVersion { found } if found == "2.0"),
            "{err}"
        );
        // A future major whose shape we cannot parse at all is still "unknown version".
        let err = decode(
            &frame_of(br#"{"v":"7.1","totally":"different"}"#),
            DEFAULT_DECODE_LIMIT,
        )
        .unwrap_err();
        assert!(
            matches!(&err, DecodeError::UnknownVersion { found } if found == "7.1"),
            "{err}"
        );
    }

    #[test]
    fn newer_minor_with_extra_fields_is_accepted() {
        let mut json: serde_json::Value = serde_json::to_value(sample()).unwrap();
        json["v"] = "1.7".into();
        json["some_new_optional_field"] = serde_json::json!({"x": 1});
        let batch = decode(
            &frame_of(&serde_json::to_vec(&json).unwrap()),
            DEFAULT_DECODE_LIMIT,
        )
        .unwrap();
        assert_eq!(batch.logs.len(), 100);
    }

    #[test]
    fn malformed_json_is_rejected() {
        let err = decode(
            &frame_of(br#"{"v":"1.0","run_id":5}"#),
            DEFAULT_DECODE_LIMIT,
        )
        .unwrap_err();
        assert!(matches!(err, DecodeError::Malformed(_)), "{err}");
        let err = decode(&frame_of(b"\xff\xfe not json"), DEFAULT_DECODE_LIMIT).unwrap_err();
        assert!(matches!(err, DecodeError::Malformed(_)), "{err}");
    }

    /// A tiny frame without a declared size whose header asks for a 1 GiB window must
    /// be refused, not make zstd allocate that window.
    #[test]
    fn frame_with_a_huge_window_is_rejected() {
        let mut enc = zstd::stream::write::Encoder::new(Vec::new(), 1).unwrap();
        enc.include_contentsize(false).unwrap();
        enc.window_log(30).unwrap();
        enc.long_distance_matching(true).unwrap();
        enc.write_all(&[b'z'; 64]).unwrap();
        let bytes = enc.finish().unwrap();
        assert!(bytes.len() < 64, "{} bytes", bytes.len());
        let err = decode(&bytes, 1 << 20).unwrap_err();
        assert!(
            matches!(err, DecodeError::TooLarge { what: "window", .. }),
            "{err}"
        );
    }

    use std::io::Write;
}
