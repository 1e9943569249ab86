//! The SSE frames a hub sends: each event encoded once and shared, as bytes, by every
//! viewer that sends it — compressed once too.
//!
//! A compressed feed would normally need a compressor per connection (some 300 KiB of
//! deflate state each, for thousands of viewers). Instead every frame is compressed on
//! its own, once, by whichever viewer first needs it, and each connection only frames
//! those pieces:
//!
//! * **gzip**: a frame's deflate blocks are made by a fresh compressor and end with a
//!   sync flush (byte-aligned, not final), so they reference nothing before them and
//!   continue any deflate stream that ended on such a flush. A connection writes the
//!   gzip header, the frames' blocks, and at its end a final empty block and the
//!   trailer: the CRC-32 of everything it sent, combined from the frames' own CRCs.
//! * **zstd**: a frame is one zstd frame; a zstd stream may be any sequence of frames.
//!
//! What it costs: each frame is compressed without the frames before it as context, so
//! the ratio is a batch's own (its lines' repeated JSON keys and text); measured in
//! BENCHMARKS.md.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use athanor_schemas::events::{self, BatchEvent};
use athanor_schemas::Batch;
use bytes::Bytes;
use flate2::{Compress, Compression, FlushCompress};

/// One SSE event, encoded once and shared by every viewer that sends it (see
/// `sse::Writes` for how it is written).
#[derive(Debug)]
pub(crate) struct Frame {
    pub event: &'static str,
    /// The batch watermark after this event (none on `resync` and `run`).
    pub id: Option<u64>,
    /// The event as sent: `event:`, `id:` when there is one, one `data:` line and the
    /// blank line.
    pub wire: Bytes,
    /// When it was made: how long a viewer reading it now has been behind.
    pub at: tokio::time::Instant,
    /// For a frame a hub broadcast: the hub's bytes broadcast up to and including it (0:
    /// not broadcast).
    pub through: AtomicU64,
    /// The deflate piece and the CRC-32 of `wire`.
    gzip: OnceLock<(Bytes, u32)>,
    zstd: OnceLock<Bytes>,
}

/// How a feed's bytes are encoded on the wire (`Content-Encoding`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Encoding {
    Identity,
    Gzip,
    Zstd,
}

impl Encoding {
    /// The best encoding `accept` (an `Accept-Encoding` value) allows: zstd, then gzip,
    /// else none. A coding with `q=0` is refused.
    pub fn negotiate(accept: Option<&str>) -> Encoding {
        let offered = |name: &str| {
            accept.is_some_and(|accept| {
                accept.split(',').any(|item| {
                    let mut parts = item.split(';').map(str::trim);
                    parts
                        .next()
                        .is_some_and(|coding| coding.eq_ignore_ascii_case(name))
                        && !parts.any(|p| {
                            p.strip_prefix("q=")
                                .and_then(|q| q.trim().parse::<f32>().ok())
                                .is_some_and(|q| q <= 0.0)
                        })
                })
            })
        };
        if offered("zstd") {
            Encoding::Zstd
        } else if offered("gzip") {
            Encoding::Gzip
        } else {
            Encoding::Identity
        }
    }

    pub fn header(self) -> Option<&'static str> {
        match self {
            Encoding::Identity => None,
            Encoding::Gzip => Some("gzip"),
            Encoding::Zstd => Some("zstd"),
        }
    }
}

impl Frame {
    pub fn new(event: &'static str, id: Option<u64>, data: &impl serde::Serialize) -> Arc<Frame> {
        let mut wire = format!("event: {event}\n");
        if let Some(id) = id {
            let _ = writeln!(wire, "id: {id}");
        }
        wire.push_str("data: ");
        let mut wire = wire.into_bytes();
        // JSON escapes newlines inside strings, so the data is always one line.
        serde_json::to_writer(&mut wire, data).expect("an event serialises");
        wire.extend_from_slice(b"\n\n");
        Arc::new(Frame::raw(event, id, wire.into()))
    }

    fn raw(event: &'static str, id: Option<u64>, wire: Bytes) -> Frame {
        Frame {
            event,
            id,
            wire,
            at: tokio::time::Instant::now(),
            through: AtomicU64::new(0),
            gzip: OnceLock::new(),
            zstd: OnceLock::new(),
        }
    }

    /// The frame of one batch: the same bytes whether it comes from a hub or from a
    /// viewer's catch-up.
    pub fn batch(batch: &Batch) -> Arc<Frame> {
        Frame::new(
            events::BATCH,
            Some(batch.batch_seq + 1),
            &BatchEvent::of(batch),
        )
    }

    pub fn resync(reason: &str) -> Arc<Frame> {
        Frame::new(
            events::RESYNC,
            None,
            &serde_json::json!({ "reason": reason }),
        )
    }

    /// The keep-alive comment, shared by every connection.
    pub fn keep_alive() -> Arc<Frame> {
        static KEEP_ALIVE: OnceLock<Arc<Frame>> = OnceLock::new();
        KEEP_ALIVE
            .get_or_init(|| Arc::new(Frame::raw("", None, Bytes::from_static(b":\n\n"))))
            .clone()
    }

    /// Whether a hub broadcast it (not a snapshot, or a catch-up frame made for one
    /// viewer).
    pub fn was_broadcast(&self) -> bool {
        self.through.load(std::sync::atomic::Ordering::Relaxed) > 0
    }

    /// The frame's bytes in `encoding`, compressed the first time they are asked for.
    pub fn encoded(&self, encoding: Encoding) -> &Bytes {
        match encoding {
            Encoding::Identity => &self.wire,
            Encoding::Gzip => &self.gzip().0,
            Encoding::Zstd => self.zstd.get_or_init(|| {
                zstd::bulk::compress(&self.wire, ZSTD_LEVEL)
                    .expect("zstd compression of an in-memory buffer")
                    .into()
            }),
        }
    }
}

impl Frame {
    fn gzip(&self) -> &(Bytes, u32) {
        self.gzip
            .get_or_init(|| (deflate_blocks(&self.wire), crc32fast::hash(&self.wire)))
    }
}

/// zstd's level for frames: compressed once for every viewer, so worth a higher one
/// than a per-connection stream would use (5.4x against 4.6x at 3 on a log_storm tail).
const ZSTD_LEVEL: i32 = 9;

/// `data` as deflate blocks that reference nothing before them and end with a sync
/// flush: a piece any deflate stream at a flush point may continue with.
fn deflate_blocks(data: &[u8]) -> Bytes {
    let mut compress = Compress::new(Compression::new(6), false);
    let mut out = Vec::with_capacity(data.len() / 4 + 64);
    loop {
        if out.capacity() - out.len() < 1024 {
            out.reserve(out.capacity().max(1024));
        }
        let consumed = compress.total_in() as usize;
        compress
            .compress_vec(&data[consumed..], &mut out, FlushCompress::Sync)
            .expect("deflate of an in-memory buffer");
        // The flush is complete once all input is in and it left output room unused.
        if compress.total_in() as usize == data.len() && out.len() < out.capacity() {
            break;
        }
    }
    out.into()
}

/// A gzip stream made of frames' deflate pieces, for one connection: the header with
/// the first piece, then each piece, then [`GzipStream::finish`].
#[derive(Default)]
pub(crate) struct GzipStream {
    started: bool,
    crc: crc32fast::Hasher,
    /// Bytes sent (before compression).
    len: u64,
}

impl GzipStream {
    /// The 10-byte gzip header (deflate, no name, no time, unknown OS).
    const HEADER: [u8; 10] = [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 255];
    /// A final fixed-Huffman block holding only its end: closes the deflate stream.
    const LAST_BLOCK: [u8; 2] = [0x03, 0x00];

    /// `frame`'s piece (after the header, the first time), counted into the trailer.
    pub fn piece(&mut self, frame: &Frame) -> Bytes {
        let (piece, crc) = frame.gzip();
        let len = frame.wire.len() as u64;
        self.crc
            .combine(&crc32fast::Hasher::new_with_initial_len(*crc, len));
        self.len += len;
        if self.started {
            return piece.clone();
        }
        self.started = true;
        let mut out = Vec::with_capacity(Self::HEADER.len() + piece.len());
        out.extend_from_slice(&Self::HEADER);
        out.extend_from_slice(piece);
        out.into()
    }

    /// The end of the stream: the header if nothing was sent, the last block and the
    /// trailer (CRC-32 and length of everything sent, mod 2^32).
    pub fn finish(self) -> Bytes {
        let mut out = Vec::with_capacity(Self::HEADER.len() + 10);
        if !self.started {
            out.extend_from_slice(&Self::HEADER);
        }
        out.extend_from_slice(&Self::LAST_BLOCK);
        out.extend_from_slice(&self.crc.finalize().to_le_bytes());
        out.extend_from_slice(&(self.len as u32).to_le_bytes());
        out.into()
    }
}

/// The bytes a hub broadcast: each frame sent is stamped with the total up to it, so a
/// viewer reading a frame knows how far behind it is.
#[derive(Debug, Default)]
pub(crate) struct Broadcast(AtomicU64);

impl Broadcast {
    pub fn stamp(&self, frame: &Frame) {
        let len = frame.wire.len() as u64;
        let through = self.0.fetch_add(len, Ordering::Relaxed) + len;
        frame.through.store(through, Ordering::Relaxed);
    }

    /// Bytes broadcast after `frame` (0 for a frame this hub did not broadcast).
    pub fn after(&self, frame: &Frame) -> u64 {
        match frame.through.load(Ordering::Relaxed) {
            0 => 0,
            through => self.0.load(Ordering::Relaxed).saturating_sub(through),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn frames() -> Vec<Arc<Frame>> {
        let lines: Vec<String> = (0..500)
            .map(|i| {
                format!(
                    "step {i}: loss={:.4} tokens/s=18{i:03}",
                    1.0 / (i + 1) as f64
                )
            })
            .collect();
        vec![
            Frame::new(
                "snapshot",
                Some(0),
                &serde_json::json!({"lines": lines[..10]}),
            ),
            Frame::new("batch", Some(1), &serde_json::json!({"lines": lines})),
            Frame::keep_alive(),
            Frame::new(
                "status",
                Some(2),
                &serde_json::json!({"status": "completed"}),
            ),
        ]
    }

    fn sent(frames: &[Arc<Frame>]) -> Vec<u8> {
        frames.iter().flat_map(|f| f.wire.to_vec()).collect()
    }

    #[test]
    fn a_gzip_stream_of_shared_pieces_decodes_to_the_frames_and_checks_its_crc() {
        let frames = frames();
        let mut out = Vec::new();
        let mut gzip = GzipStream::default();
        for frame in &frames {
            out.extend_from_slice(&gzip.piece(frame));
        }
        out.extend_from_slice(&gzip.finish());
        let mut decoded = Vec::new();
        flate2::read::GzDecoder::new(&out[..])
            .read_to_end(&mut decoded)
            .expect("a valid gzip stream, CRC and length checked");
        assert_eq!(decoded, sent(&frames));
        assert!(
            out.len() * 3 < decoded.len(),
            "{} of {}",
            out.len(),
            decoded.len()
        );
        // Each piece alone continues a stream at a flush point: decode the stream up to
        // any frame, piece by piece, and it is exactly the frames so far.
        let mut decoder = flate2::Decompress::new(false);
        let mut so_far = Vec::new();
        for (i, frame) in frames.iter().enumerate() {
            let piece = frame.encoded(Encoding::Gzip);
            let mut buf = vec![0; frame.wire.len() + 64];
            let before = decoder.total_out();
            decoder
                .decompress(piece, &mut buf, flate2::FlushDecompress::Sync)
                .unwrap();
            so_far.extend_from_slice(&buf[..(decoder.total_out() - before) as usize]);
            assert_eq!(so_far, sent(&frames[..=i]), "after frame {i}");
        }
    }

    #[test]
    fn an_empty_gzip_stream_is_valid() {
        let out = GzipStream::default().finish();
        let mut decoded = Vec::new();
        flate2::read::GzDecoder::new(&out[..])
            .read_to_end(&mut decoded)
            .unwrap();
        assert!(decoded.is_empty());
    }

    #[test]
    fn zstd_frames_concatenate_into_one_stream() {
        let frames = frames();
        let out: Vec<u8> = frames
            .iter()
            .flat_map(|f| f.encoded(Encoding::Zstd).to_vec())
            .collect();
        assert_eq!(zstd::stream::decode_all(&out[..]).unwrap(), sent(&frames));
    }

    #[test]
    fn the_encoding_is_negotiated_from_accept_encoding() {
        use Encoding::*;
        for (accept, expected) in [
            (None, Identity),
            (Some(""), Identity),
            (Some("identity"), Identity),
            (Some("gzip, deflate"), Gzip),
            (Some("gzip, deflate, br, zstd"), Zstd),
            (Some("GZIP"), Gzip),
            (Some("zstd;q=0, gzip;q=0.5"), Gzip),
            (Some("gzip;q=0"), Identity),
            (Some("br"), Identity),
            (Some("x-gzip"), Identity),
        ] {
            assert_eq!(Encoding::negotiate(accept), expected, "{accept:?}");
        }
    }

    #[test]
    fn a_frame_knows_the_bytes_broadcast_after_it() {
        let sent = Broadcast::default();
        let frames = frames();
        for frame in &frames[..2] {
            sent.stamp(frame);
        }
        assert_eq!(sent.after(&frames[0]), frames[1].wire.len() as u64);
        assert_eq!(sent.after(&frames[1]), 0);
        assert_eq!(sent.after(&frames[3]), 0, "never broadcast");
    }
}
