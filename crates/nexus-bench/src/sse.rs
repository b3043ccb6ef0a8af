//! Lightweight EventSource subscriber: a raw TCP stream, a hand-written
//! HTTP/1.1 response-head reader, a chunked-transfer decoder and an SSE line
//! parser. Cheap enough to run 10,000+ of them in the bench process.

use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::BaseUrl;

/// One dispatched server-sent event.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Event {
    /// `event:` field, or "message" when absent.
    pub event: String,
    /// `id:` field of this event, if it carried one.
    pub id: Option<String>,
    /// `data:` lines joined with '\n'.
    pub data: String,
}

/// Incremental SSE parser (https://html.spec.whatwg.org/multipage/server-sent-events.html).
#[derive(Default)]
pub struct SseParser {
    line: Vec<u8>,
    event: String,
    id: Option<String>,
    data: String,
    has_data: bool,
    /// Number of comment lines seen (nchan sends `: hi` on connect).
    pub comments: u64,
    /// Last `retry:` value seen.
    pub retry: Option<u64>,
    /// Lines longer than [`MAX_LINE`] that were dropped.
    pub oversized: u64,
    discarding: bool,
}

/// Longest SSE line (and event data) kept; a misbehaving server cannot make a
/// subscriber buffer without bound.
pub const MAX_LINE: usize = 4 << 20;

impl SseParser {
    /// Feed body bytes; calls `on_event` for each complete event.
    pub fn feed(&mut self, mut bytes: &[u8], on_event: &mut impl FnMut(Event)) {
        while !bytes.is_empty() {
            match bytes.iter().position(|&b| b == b'\n') {
                Some(i) => {
                    if self.discarding {
                        self.discarding = false;
                        self.line.clear();
                    } else if self.line.is_empty() {
                        self.process_line(&bytes[..i], on_event);
                    } else {
                        self.line.extend_from_slice(&bytes[..i]);
                        let line = std::mem::take(&mut self.line);
                        self.process_line(&line, on_event);
                        self.line = line;
                        self.line.clear();
                    }
                    bytes = &bytes[i + 1..];
                }
                None => {
                    if !self.discarding {
                        if self.line.len() + bytes.len() > MAX_LINE {
                            self.oversized += 1;
                            self.discarding = true;
                            self.line.clear();
                        } else {
                            self.line.extend_from_slice(bytes);
                        }
                    }
                    bytes = &[];
                }
            }
        }
    }

    fn process_line(&mut self, line: &[u8], on_event: &mut impl FnMut(Event)) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            if self.has_data || !self.event.is_empty() || self.id.is_some() {
                let ev = Event {
                    event: if self.event.is_empty() {
                        "message".to_string()
                    } else {
                        std::mem::take(&mut self.event)
                    },
                    id: self.id.take(),
                    data: std::mem::take(&mut self.data),
                };
                self.has_data = false;
                on_event(ev);
            }
            return;
        }
        if line[0] == b':' {
            self.comments += 1;
            return;
        }
        let (field, value) = match line.iter().position(|&b| b == b':') {
            Some(i) => {
                let v = &line[i + 1..];
                (&line[..i], v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (line, &b""[..]),
        };
        let value = String::from_utf8_lossy(value);
        match field {
            b"event" => self.event = value.into_owned(),
            b"data" => {
                if self.data.len() + value.len() > MAX_LINE {
                    self.oversized += 1;
                    return;
                }
                if self.has_data {
                    self.data.push('\n');
                }
                self.data.push_str(&value);
                self.has_data = true;
            }
            b"id" => self.id = Some(value.into_owned()),
            b"retry" => self.retry = value.parse().ok(),
            _ => {}
        }
    }
}

/// Incremental decoder for `Transfer-Encoding: chunked` bodies.
#[derive(Default)]
pub struct ChunkedDecoder {
    state: ChunkState,
    pending: Vec<u8>,
}

#[derive(Default, Clone, Copy, PartialEq, Eq, Debug)]
enum ChunkState {
    #[default]
    Size,
    Data(u64),
    DataCrLf,
    Done,
}

impl ChunkedDecoder {
    /// Decode `input`, passing body bytes to `out`. Returns Ok(true) once the
    /// terminating zero-length chunk has been seen.
    pub fn feed(&mut self, input: &[u8], out: &mut impl FnMut(&[u8])) -> Result<bool> {
        let owned;
        let mut buf: &[u8] = if self.pending.is_empty() {
            input
        } else {
            self.pending.extend_from_slice(input);
            owned = std::mem::take(&mut self.pending);
            &owned
        };
        loop {
            match self.state {
                ChunkState::Done => return Ok(true),
                ChunkState::Size => {
                    let Some(i) = buf.windows(2).position(|w| w == b"\r\n") else {
                        if buf.len() > 1024 {
                            bail!("chunk size line too long");
                        }
                        self.pending = buf.to_vec();
                        return Ok(false);
                    };
                    let line = std::str::from_utf8(&buf[..i]).context("chunk size line")?;
                    let hex = line.split(';').next().unwrap_or("").trim();
                    let size = u64::from_str_radix(hex, 16)
                        .with_context(|| format!("bad chunk size {hex:?}"))?;
                    buf = &buf[i + 2..];
                    self.state = if size == 0 {
                        ChunkState::Done
                    } else {
                        ChunkState::Data(size)
                    };
                }
                ChunkState::Data(n) => {
                    if buf.is_empty() {
                        return Ok(false);
                    }
                    let take = (n as usize).min(buf.len());
                    out(&buf[..take]);
                    buf = &buf[take..];
                    let left = n - take as u64;
                    self.state = if left == 0 {
                        ChunkState::DataCrLf
                    } else {
                        ChunkState::Data(left)
                    };
                }
                ChunkState::DataCrLf => {
                    if buf.len() < 2 {
                        self.pending = buf.to_vec();
                        return Ok(false);
                    }
                    if &buf[..2] != b"\r\n" {
                        bail!("missing CRLF after chunk data");
                    }
                    buf = &buf[2..];
                    self.state = ChunkState::Size;
                }
            }
        }
    }
}

/// Body framing of an open SSE response.
pub enum Framing {
    Chunked(ChunkedDecoder),
    /// Read until EOF (or Content-Length, which an event stream should not have).
    Raw,
}

/// An open event stream: the socket plus decoding state.
pub struct SseStream {
    pub stream: TcpStream,
    pub framing: Framing,
    pub parser: SseParser,
    /// Body bytes that arrived together with the response head.
    pub leftover: Vec<u8>,
}

/// Body bytes -> events, handling the transfer framing.
/// Returns Ok(true) when the body ended (zero chunk).
pub fn decode(
    framing: &mut Framing,
    parser: &mut SseParser,
    input: &[u8],
    on_event: &mut impl FnMut(Event),
) -> Result<bool> {
    match framing {
        Framing::Chunked(dec) => dec.feed(input, &mut |b| parser.feed(b, on_event)),
        Framing::Raw => {
            parser.feed(input, on_event);
            Ok(false)
        }
    }
}

/// Set SO_LINGER=0 so that closing sends RST and leaves no TIME_WAIT behind
/// (lets back-to-back 10k-connection runs reuse the ephemeral port range).
pub fn linger_zero(s: &TcpStream) {
    let _ = socket2::SockRef::from(s).set_linger(Some(Duration::ZERO));
}

/// Open `GET path` as an event stream and read the response head.
/// Fails unless the status is 200.
pub async fn open(base: &BaseUrl, path: &str, extra_headers: &str) -> Result<SseStream> {
    let mut stream = TcpStream::connect(base.addr)
        .await
        .with_context(|| format!("connect {}", base.addr))?;
    let _ = stream.set_nodelay(true);
    linger_zero(&stream);
    let req = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nAccept: text/event-stream\r\nCache-Control: no-cache\r\n{}\r\n",
        base.path(path),
        base.host_header,
        extra_headers
    );
    stream.write_all(req.as_bytes()).await.context("write")?;
    let mut buf: Vec<u8> = Vec::with_capacity(1024);
    let mut tmp = [0u8; 2048];
    loop {
        let n = stream.read(&mut tmp).await.context("read head")?;
        if n == 0 {
            bail!("connection closed before response head");
        }
        buf.extend_from_slice(&tmp[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        match resp.parse(&buf) {
            Ok(httparse::Status::Complete(head_len)) => {
                let code = resp.code.unwrap_or(0);
                let chunked = resp.headers.iter().any(|h| {
                    h.name.eq_ignore_ascii_case("transfer-encoding")
                        && String::from_utf8_lossy(h.value)
                            .to_ascii_lowercase()
                            .contains("chunked")
                });
                if code != 200 {
                    let body = String::from_utf8_lossy(&buf[head_len..]).into_owned();
                    return Err(anyhow!(
                        "HTTP {code} {}: {}",
                        resp.reason.unwrap_or(""),
                        body.chars().take(300).collect::<String>()
                    ));
                }
                let leftover = buf[head_len..].to_vec();
                return Ok(SseStream {
                    stream,
                    framing: if chunked {
                        Framing::Chunked(ChunkedDecoder::default())
                    } else {
                        Framing::Raw
                    },
                    parser: SseParser::default(),
                    leftover,
                });
            }
            Ok(httparse::Status::Partial) => {
                if buf.len() > 16 * 1024 {
                    bail!("response head larger than 16 KiB");
                }
            }
            Err(e) => bail!("bad response head: {e}"),
        }
    }
}

/// Find `"key"` in a JSON text and parse the unsigned integer after it.
/// Works whatever the nesting or whitespace of the server's serialisation.
pub fn json_u64(data: &str, key: &str) -> Option<u64> {
    let pat = format!("\"{key}\"");
    let mut from = 0;
    while let Some(off) = data[from..].find(&pat) {
        let rest = data[from + off + pat.len()..].trim_start();
        if let Some(rest) = rest.strip_prefix(':') {
            let rest = rest.trim_start();
            let end = rest
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(rest.len());
            return rest[..end].parse().ok();
        }
        from += off + pat.len();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(chunks: &[&[u8]]) -> Vec<Event> {
        let mut p = SseParser::default();
        let mut evs = Vec::new();
        for c in chunks {
            p.feed(c, &mut |e| evs.push(e));
        }
        evs
    }

    #[test]
    fn parses_nexus_stream() {
        let s = b"retry: 1000\n\nevent: snapshot\nid: 7\ndata: {\"a\":1}\n\nevent: report\nid: 8\ndata: {\"bench_seq\":3}\n\n: comment\nevent: ping\ndata: {\"ts\": 5}\n\n";
        let evs = collect(&[s]);
        assert_eq!(evs.len(), 3);
        assert_eq!(evs[0].event, "snapshot");
        assert_eq!(evs[0].id.as_deref(), Some("7"));
        assert_eq!(evs[1].event, "report");
        assert_eq!(evs[1].data, "{\"bench_seq\":3}");
        assert_eq!(evs[2].event, "ping");
        assert_eq!(evs[2].id, None);
    }

    #[test]
    fn parses_split_bytes_and_crlf() {
        let s: &[u8] = b": hi\r\n\r\nid: 1:0\r\ndata: line1\r\ndata: line2\r\n\r\n";
        // feed one byte at a time
        let parts: Vec<&[u8]> = s.chunks(1).collect();
        let evs = collect(&parts);
        assert_eq!(evs.len(), 1);
        assert_eq!(evs[0].event, "message");
        assert_eq!(evs[0].id.as_deref(), Some("1:0"));
        assert_eq!(evs[0].data, "line1\nline2");
    }

    #[test]
    fn drops_oversized_lines() {
        let mut p = SseParser::default();
        let mut evs = Vec::new();
        let big = vec![b'x'; MAX_LINE + 10];
        p.feed(b"data: ", &mut |e| evs.push(e));
        p.feed(&big, &mut |e| evs.push(e));
        p.feed(b"\n\ndata: ok\n\n", &mut |e| evs.push(e));
        assert_eq!(p.oversized, 1);
        assert_eq!(evs.len(), 1);
        assert_eq!(evs[0].data, "ok");
    }

    #[test]
    fn decodes_chunked_across_boundaries() {
        let body = b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\n";
        for split in 1..body.len() {
            let mut d = ChunkedDecoder::default();
            let mut out = Vec::new();
            let mut done = false;
            for part in body.chunks(split) {
                done = d.feed(part, &mut |b| out.extend_from_slice(b)).unwrap();
            }
            assert!(done, "split {split}");
            assert_eq!(out, b"hello world", "split {split}");
        }
    }

    #[test]
    fn rejects_bad_chunks() {
        let mut d = ChunkedDecoder::default();
        assert!(d.feed(b"zz\r\n", &mut |_| {}).is_err());
        let mut d = ChunkedDecoder::default();
        assert!(d.feed(b"1\r\nabc", &mut |_| {}).is_err());
    }

    #[test]
    fn finds_json_numbers() {
        let d = r#"{"meta":{"event_id":12},"data":{"bench_sent_unix_ns": 1700, "bench_seq":4}}"#;
        assert_eq!(json_u64(d, "bench_sent_unix_ns"), Some(1700));
        assert_eq!(json_u64(d, "bench_seq"), Some(4));
        assert_eq!(json_u64(d, "event_id"), Some(12));
        assert_eq!(json_u64(d, "missing"), None);
        assert_eq!(
            json_u64(r#"{"x":"bench_seq","bench_seq":9}"#, "bench_seq"),
            Some(9)
        );
    }
}
