//! The `text/event-stream` format, as a client reads it.

/// One event of an SSE stream, as a client reads it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SseEvent {
    pub event: String,
    pub id: Option<String>,
    pub data: String,
}

/// Incremental decoder of `text/event-stream`: feed it bytes as they arrive, take the
/// complete events. Comments (keep-alives) are skipped. Linear in what it is fed: a
/// line arriving in many pieces is searched for its end once, not again per piece.
#[derive(Debug, Default)]
pub struct SseDecoder {
    /// Bytes of the line being received (no newline among them).
    buffer: Vec<u8>,
    current: SseEvent,
    has_data: bool,
    /// Bytes searched for a newline so far, for the test that proves the decoder linear.
    #[cfg(test)]
    examined: usize,
}

impl SseDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, bytes: &[u8]) -> Vec<SseEvent> {
        let mut events = Vec::new();
        let mut rest = bytes;
        while let Some(end) = rest.iter().position(|&b| b == b'\n') {
            #[cfg(test)]
            {
                self.examined += end + 1;
            }
            let piece = &rest[..end];
            if self.buffer.is_empty() {
                self.line(piece, &mut events);
            } else {
                self.buffer.extend_from_slice(piece);
                let line = std::mem::take(&mut self.buffer);
                self.line(&line, &mut events);
            }
            rest = &rest[end + 1..];
        }
        #[cfg(test)]
        {
            self.examined += rest.len();
        }
        self.buffer.extend_from_slice(rest);
        events
    }

    /// One line, its newline removed.
    fn line(&mut self, line: &[u8], events: &mut Vec<SseEvent>) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let line = String::from_utf8_lossy(line);
        if line.is_empty() {
            if self.has_data {
                let mut event = std::mem::take(&mut self.current);
                if event.event.is_empty() {
                    event.event = "message".into();
                }
                events.push(event);
                self.has_data = false;
            } else {
                self.current = SseEvent::default();
            }
            return;
        }
        if line.starts_with(':') {
            return;
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (&*line, ""),
        };
        match field {
            "event" => self.current.event = value.to_string(),
            "id" => self.current.id = Some(value.to_string()),
            "data" => {
                if self.has_data {
                    self.current.data.push('\n');
                }
                self.current.data.push_str(value);
                self.has_data = true;
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ten_megabyte_line_in_small_pieces_is_searched_once() {
        let data = "x".repeat(10 << 20);
        let text = format!("event: batch\nid: 1\ndata: {data}\n\n");
        let mut decoder = SseDecoder::new();
        let mut events = Vec::new();
        for piece in text.as_bytes().chunks(4096) {
            events.extend(decoder.push(piece));
        }
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].data.len(), data.len());
        assert!(events[0].data == data);
        assert_eq!(
            decoder.examined,
            text.len(),
            "every byte searched exactly once"
        );
    }

    #[test]
    fn decodes_events_split_anywhere() {
        let text = b": keep-alive\n\nevent: batch\nid: 3\ndata: {\"a\":1}\n\nevent: status\r\ndata: x\r\ndata: y\r\n\r\n";
        for cut in 0..text.len() {
            let mut decoder = SseDecoder::new();
            let mut events = decoder.push(&text[..cut]);
            events.extend(decoder.push(&text[cut..]));
            assert_eq!(
                events,
                vec![
                    SseEvent {
                        event: "batch".into(),
                        id: Some("3".into()),
                        data: "{\"a\":1}".into()
                    },
                    SseEvent {
                        event: "status".into(),
                        id: None,
                        data: "x\ny".into()
                    },
                ],
                "cut at {cut}"
            );
        }
    }
}
