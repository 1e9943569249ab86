//! Turns the bytes a child writes to stdout or stderr into log lines, the way a
//! terminal would show them, without keeping what a terminal would overwrite.
//!
//! * `\n` (or `\r\n`) ends a line.
//! * `\r` and the erase-line sequences (`ESC[K`, `ESC[2K`, …) start a new *state* of
//!   the same logical line (a progress bar redrawing itself). Only states that live
//!   long enough are stored: [`Lines::tick`] emits the newest state at most once per
//!   call (the caller calls it once per flush interval), and the state the line has
//!   when it ends is always stored — so a bar redrawn 1 000 times a second costs ten
//!   lines a second, not a thousand.
//! * ANSI SGR sequences (`ESC[…m`, colours and styles) are kept for the UI to render;
//!   every other escape sequence (cursor movement, OSC titles and hyperlinks, charset
//!   switches, DCS/APC strings) and every other control character is removed.
//! * A line is held up to `max_bytes`; the rest until its end is counted, not kept, and
//!   the stored line says how much was cut. Invalid UTF-8 becomes U+FFFD.
//!
//! Pure: no I/O, no clock.

/// The longest escape sequence taken apart; a longer one is dropped from there on.
const MAX_CSI: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Escape {
    /// Plain text.
    None,
    /// After `ESC`.
    Start,
    /// In `ESC [ …`, collecting parameters until the final byte.
    Csi,
    /// In a string sequence (OSC, DCS, SOS, PM, APC) until BEL or `ESC \`.
    String,
    /// After `ESC` inside a string sequence: the string terminator `ESC \` if `\` follows.
    StringTerminator,
    /// After `ESC (` and friends: one more byte, then done.
    Charset,
}

/// The line assembler of one stream.
#[derive(Debug)]
pub(crate) struct Lines {
    max_bytes: usize,
    /// The current state of the line being written (SGR sequences included).
    current: Vec<u8>,
    /// Bytes of the current state past `max_bytes`, counted and dropped.
    dropped: usize,
    /// A `\r` or an erase was seen: the next text starts a new state (unless a `\n`
    /// comes first — `\r\n` ends the line with the current state).
    reset_pending: bool,
    /// The line has been redrawn at least once (it is a progress line).
    redrawn: bool,
    /// SGR sequences met while `reset_pending`: they open the next state (or close
    /// the current one, if a `\n` comes first).
    pending_sgr: Vec<u8>,
    /// The state last emitted by `tick`, to store the final state only if it differs.
    emitted: Option<Vec<u8>>,
    /// Whether anything changed since the last `tick` emission.
    changed: bool,
    escape: Escape,
    /// The escape sequence being read (kept only for CSI, to keep SGR and read erases).
    sequence: Vec<u8>,
}

impl Lines {
    pub(crate) fn new(max_bytes: usize) -> Self {
        Lines {
            max_bytes,
            current: Vec::new(),
            dropped: 0,
            reset_pending: false,
            pending_sgr: Vec::new(),
            redrawn: false,
            emitted: None,
            changed: false,
            escape: Escape::None,
            sequence: Vec::new(),
        }
    }

    /// Takes `bytes` in; every line they complete is pushed to `out`.
    pub(crate) fn push(&mut self, bytes: &[u8], out: &mut Vec<String>) {
        let mut i = 0;
        while i < bytes.len() {
            if self.escape == Escape::None {
                // The common case: a run of plain text, copied at once.
                let run = bytes[i..]
                    .iter()
                    .position(|&b| b < 0x20 || b == 0x7f)
                    .unwrap_or(bytes.len() - i);
                if run > 0 {
                    self.text(&bytes[i..i + run]);
                    i += run;
                    continue;
                }
            }
            self.byte(bytes[i], out);
            i += 1;
        }
    }

    /// Called once per flush interval: the newest state of a line being redrawn, when
    /// it changed since the last call and is not blank.
    pub(crate) fn tick(&mut self) -> Option<String> {
        // A line ending in `\r` is being redrawn too: its state stands until the next.
        if !(self.redrawn || self.reset_pending) || !self.changed {
            return None;
        }
        if self.current.iter().all(u8::is_ascii_whitespace) {
            return None;
        }
        self.changed = false;
        self.emitted = Some(self.current.clone());
        Some(self.render())
    }

    /// The end of the stream: a last line without a newline.
    pub(crate) fn finish(&mut self, out: &mut Vec<String>) {
        self.escape = Escape::None;
        self.sequence.clear();
        if !self.current.is_empty() || self.dropped > 0 {
            self.end_line(out);
        }
    }

    fn byte(&mut self, b: u8, out: &mut Vec<String>) {
        match self.escape {
            Escape::None => match b {
                b'\n' => self.end_line(out),
                b'\r' => self.reset_pending = true,
                b'\t' => self.text(b"\t"),
                0x1b => {
                    self.escape = Escape::Start;
                    self.sequence.clear();
                }
                // Every other control character (BEL, BS, NUL, DEL, …) is removed.
                _ => {}
            },
            Escape::Start => {
                self.escape = match b {
                    b'[' => {
                        self.sequence.extend_from_slice(b"\x1b[");
                        Escape::Csi
                    }
                    b']' | b'P' | b'X' | b'^' | b'_' => Escape::String,
                    b'(' | b')' | b'*' | b'+' | b'-' | b'.' | b'/' | b'#' | b'%' => Escape::Charset,
                    b'\n' => {
                        self.end_line(out);
                        Escape::None
                    }
                    _ => Escape::None,
                };
            }
            Escape::Csi => match b {
                0x40..=0x7e => {
                    self.sequence.push(b);
                    self.escape = Escape::None;
                    self.csi_done();
                }
                0x20..=0x3f if self.sequence.len() < MAX_CSI => self.sequence.push(b),
                b'\n' => {
                    self.escape = Escape::None;
                    self.end_line(out);
                }
                // A malformed or endless sequence: dropped, and text resumes.
                _ => self.escape = Escape::None,
            },
            Escape::String => match b {
                0x07 => self.escape = Escape::None,
                0x1b => self.escape = Escape::StringTerminator,
                // A string never spans lines here: a lost terminator must not eat the
                // rest of the output.
                b'\n' => {
                    self.escape = Escape::None;
                    self.end_line(out);
                }
                _ => {}
            },
            Escape::StringTerminator => {
                self.escape = if b == b'\\' {
                    Escape::None
                } else {
                    Escape::String
                }
            }
            Escape::Charset => {
                self.escape = Escape::None;
                if b == b'\n' {
                    self.end_line(out);
                }
            }
        }
    }

    /// A complete CSI sequence in `self.sequence`.
    fn csi_done(&mut self) {
        let sequence = std::mem::take(&mut self.sequence);
        let params = &sequence[2..sequence.len() - 1];
        match sequence[sequence.len() - 1] {
            b'm' if self.reset_pending => self.pending_sgr.extend_from_slice(&sequence),
            b'm' => self.text(&sequence),
            // Erase in line: `ESC[K`/`ESC[0K` after a `\r`, `ESC[1K`, `ESC[2K`: the line
            // is drawn afresh.
            b'K' if params == b"2" || params == b"1" || self.reset_pending => {
                self.reset_pending = true
            }
            // Erase to the end of the line with the cursor at the end: nothing to erase.
            _ => {}
        }
        self.sequence = sequence;
        self.sequence.clear();
    }

    fn text(&mut self, bytes: &[u8]) {
        if self.reset_pending {
            self.reset_pending = false;
            if !self.current.is_empty() || self.dropped > 0 || self.redrawn {
                self.redrawn = true;
            }
            self.current.clear();
            self.dropped = 0;
            let sgr = std::mem::take(&mut self.pending_sgr);
            self.append(&sgr);
        }
        self.changed = true;
        self.append(bytes);
    }

    fn append(&mut self, bytes: &[u8]) {
        let room = self.max_bytes.saturating_sub(self.current.len());
        let take = bytes.len().min(room);
        self.current.extend_from_slice(&bytes[..take]);
        self.dropped += bytes.len() - take;
    }

    fn end_line(&mut self, out: &mut Vec<String>) {
        self.reset_pending = false;
        let sgr = std::mem::take(&mut self.pending_sgr);
        self.append(&sgr);
        let already = self.emitted.as_deref() == Some(&self.current[..]) && self.dropped == 0;
        // A progress line that erased itself before ending adds nothing.
        let erased = self.redrawn && self.current.iter().all(u8::is_ascii_whitespace);
        if !already && !erased {
            out.push(self.render());
        }
        self.clear_line();
    }

    fn clear_line(&mut self) {
        self.current.clear();
        self.pending_sgr.clear();
        self.dropped = 0;
        self.redrawn = false;
        self.emitted = None;
        self.changed = false;
    }

    /// The stored text of the current state; a cut line, marker included, fits in
    /// `max_bytes`.
    fn render(&self) -> String {
        let mut line = String::from_utf8_lossy(&self.current).into_owned();
        // Invalid bytes grow into U+FFFD (3 bytes each): the stored text is measured.
        if self.dropped > 0 || line.len() > self.max_bytes {
            let total = line.len() + self.dropped;
            let room = format!(" …[truncated {total} of {total} bytes]").len();
            let cut = line.floor_char_boundary(self.max_bytes.saturating_sub(room).min(line.len()));
            line.truncate(cut);
            line.push_str(&format!(" …[truncated {} of {total} bytes]", total - cut));
        }
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(max: usize, chunks: &[&[u8]]) -> Vec<String> {
        let mut lines = Lines::new(max);
        let mut out = Vec::new();
        for chunk in chunks {
            lines.push(chunk, &mut out);
        }
        lines.finish(&mut out);
        out
    }

    #[test]
    fn newlines_split_lines_in_any_chunking_and_a_last_line_needs_none() {
        let text = b"one\ntwo\r\n\nthree";
        let whole = lines(100, &[text]);
        assert_eq!(whole, ["one", "two", "", "three"]);
        for split in 0..text.len() {
            let (a, b) = text.split_at(split);
            assert_eq!(lines(100, &[a, b]), whole, "split at {split}");
        }
    }

    #[test]
    fn a_redrawn_line_keeps_its_newest_state_per_tick_and_its_final_state() {
        let mut lines = Lines::new(100);
        let mut out = Vec::new();
        for i in 0..1000 {
            lines.push(format!("\r{:3}%|", i / 10).as_bytes(), &mut out);
            if i % 100 == 99 {
                out.extend(lines.tick());
            }
        }
        assert_eq!(lines.tick(), None, "nothing changed since the last tick");
        lines.push(b"\r100%|done\n", &mut out);
        lines.push(b"next\n", &mut out);
        let expected: Vec<String> = (0..10)
            .map(|t| format!("{:3}%|", (t * 100 + 99) / 10))
            .chain(["100%|done".to_string(), "next".to_string()])
            .collect();
        assert_eq!(out, expected);
    }

    #[test]
    fn a_final_state_already_emitted_by_a_tick_is_not_stored_twice() {
        let mut lines = Lines::new(100);
        let mut out = Vec::new();
        lines.push(b"\r 50%\r100%", &mut out);
        out.extend(lines.tick());
        lines.push(b"\r\n", &mut out);
        assert_eq!(out, ["100%"]);
        // Content then `\r` (print(..., end="\r")): the state before the `\r` stands.
        let mut out = Vec::new();
        lines.push(b"step 1\rstep 2\r", &mut out);
        out.extend(lines.tick());
        lines.finish(&mut out);
        assert_eq!(out, ["step 2"]);
    }

    #[test]
    fn erase_line_sequences_redraw_and_blank_states_are_not_ticked() {
        let mut lines = Lines::new(100);
        let mut out = Vec::new();
        lines.push(b"Downloading 1 MB\x1b[2K\rDownloading 2 MB", &mut out);
        out.extend(lines.tick());
        lines.push(b"\r\x1b[KInstalled\n", &mut out);
        lines.push(b"x\r      \r", &mut out);
        assert_eq!(lines.tick(), None, "a blank state");
        lines.finish(&mut out);
        assert_eq!(
            out,
            ["Downloading 2 MB", "Installed"],
            "an erased bar adds no line"
        );
    }

    #[test]
    fn edge_cases_found_in_review() {
        // A line that ends in `\r` (print(..., end="\r")) is ticked from its first state.
        let mut lines = Lines::new(100);
        let mut out = Vec::new();
        lines.push(b"epoch 1 loss 0.5\r", &mut out);
        assert_eq!(lines.tick().as_deref(), Some("epoch 1 loss 0.5"));
        // A colour reset after the `\r` closes the state instead of replacing it.
        lines.push(b"\x1b[32m50%\r\x1b[0m\n", &mut out);
        assert_eq!(out, ["\x1b[32m50%\x1b[0m"]);
        // A colour before the next state opens it.
        let mut out = Vec::new();
        lines.push(b"a\r\x1b[31mred\n", &mut out);
        assert_eq!(out, ["\x1b[31mred"]);
        // `ESC (` cut short by a newline still ends the line.
        assert_eq!(self::lines(100, &[b"one\x1b(\ntwo\n"]), ["one", "two"]);
        // Invalid bytes that grow past the limit as U+FFFD are cut with the marker.
        let out = self::lines(40, &[&[0xffu8; 30], b"\n"]);
        assert!(out[0].len() <= 40, "{:?}", out[0]);
        assert!(out[0].ends_with(" of 90 bytes]"), "{:?}", out[0]);
    }

    #[test]
    fn sgr_colours_are_kept_and_other_sequences_removed() {
        let out = lines(
            100,
            &[b"\x1b[1;31mred\x1b[0m \x1b]0;title\x07\x1b[2Aup \x1b(Bset \x1b]8;;http://x\x1b\\link\x1b]8;;\x1b\\ bell\x07\x08\x00\n"],
        );
        assert_eq!(out, ["\x1b[1;31mred\x1b[0m up set link bell"]);
    }

    #[test]
    fn an_unterminated_osc_ends_with_its_line() {
        assert_eq!(lines(100, &[b"a\x1b]0;never ends\nb\n"]), ["a", "b"]);
        let endless_csi = [b"a\x1b[".as_slice(), &[b'1'; 200], b"b\n"].concat();
        // 62 parameter bytes are read, the 63rd ends the sequence, the rest is text.
        assert_eq!(
            lines(1000, &[&endless_csi]),
            [format!("a{}b", "1".repeat(200 - 63))]
        );
    }

    #[test]
    fn long_lines_are_cut_with_a_marker_and_invalid_utf8_is_replaced() {
        let long = "é".repeat(30); // 60 bytes
        let out = lines(40, &[long.as_bytes(), b"\nok\n"]);
        assert_eq!(out, ["ééééé …[truncated 50 of 60 bytes]", "ok"]);
        assert_eq!(out[0].len(), 40);
        assert_eq!(lines(100, &[b"a\xffb\xc3\n"]), ["a\u{fffd}b\u{fffd}"]);
    }
}
