//! A load generator's fast read of answers: the id, status, server timings
//! and flags of a response, without running the flatbuffers verifier on
//! every one.
//!
//! A server answers one shape (target, output length, runs) with frames
//! of one layout: the same bytes but for the id, the status, the timings,
//! the flags, the ticket and the output floats (the server even builds
//! them by patching a template, `template.rs`). The verifier's verdict
//! depends only on the other bytes (offsets, vtables, lengths, strings,
//! the union type): scalar values and a `[ubyte]` payload are bounds-
//! checked by position, never by value. So [`HeadReader`] verifies a body
//! in full the first time (`decode_response`), records where its value
//! fields sit, and reads a later body of the same length whose every other
//! byte is equal to that one's straight from those positions; anything
//! else goes the full way. The status byte is still checked (an unknown
//! value is an error, as `decode_response` says).

use super::beast_generated::beast::wire as fb;
use super::decode::decode_response;
use super::types::{DecodeError, ResponseView, Status, Timings};

/// What a load generator reads of an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResponseHead {
    pub id: u64,
    pub status: Status,
    pub timings: Timings,
    pub cached: bool,
    pub partial: bool,
}

impl From<&ResponseView<'_>> for ResponseHead {
    fn from(v: &ResponseView<'_>) -> Self {
        ResponseHead {
            id: v.id,
            status: v.status,
            timings: v.timings,
            cached: v.cached,
            partial: v.partial,
        }
    }
}

/// Layouts kept per reader (shapes of answer a run sees: a few targets,
/// OK and an error or two).
pub const LAYOUTS_MAX: usize = 16;

/// A verified body and where its value fields sit.
struct Layout {
    body: Box<[u8]>,
    /// Byte ranges outside the value fields: a body equal to `body` in all
    /// of them verifies as `body` did, with fields at the same places.
    same: Box<[(usize, usize)]>,
    id: usize,
    status: usize,
    queue_us: usize,
    compute_us: usize,
    total_us: usize,
    cached: usize,
    partial: usize,
}

/// Reads answers, verifying each new layout once (see the module text).
#[derive(Default)]
pub struct HeadReader {
    layouts: Vec<Layout>,
}

impl HeadReader {
    pub fn new() -> Self {
        Self::default()
    }

    /// The answer's head, as `decode_response` would give it.
    pub fn read(&mut self, body: &[u8]) -> Result<ResponseHead, DecodeError> {
        for l in &self.layouts {
            if l.body.len() == body.len() && l.same.iter().all(|&(a, b)| body[a..b] == l.body[a..b])
            {
                return l.head(body);
            }
        }
        let head = ResponseHead::from(&decode_response(body)?);
        if self.layouts.len() < LAYOUTS_MAX {
            if let Some(l) = Layout::of(body) {
                self.layouts.push(l);
            }
        }
        Ok(head)
    }

    /// Layouts recorded so far.
    pub fn layouts(&self) -> usize {
        self.layouts.len()
    }
}

impl Layout {
    /// The layout of a body `decode_response` accepted; `None` when one of
    /// the value fields is not stored (a default the builder left out).
    fn of(body: &[u8]) -> Option<Layout> {
        let resp = flatbuffers::root::<fb::Message>(body)
            .ok()?
            .body_as_response()?;
        let tab = resp._tab;
        let field = |slot: flatbuffers::VOffsetT| {
            let o = tab.vtable().get(slot) as usize;
            (o != 0).then_some(tab.loc() + o)
        };
        let l = Layout {
            body: body.into(),
            same: Box::default(),
            id: field(fb::Response::VT_ID)?,
            status: field(fb::Response::VT_STATUS)?,
            queue_us: field(fb::Response::VT_QUEUE_US)?,
            compute_us: field(fb::Response::VT_COMPUTE_US)?,
            total_us: field(fb::Response::VT_TOTAL_US)?,
            cached: field(fb::Response::VT_CACHED)?,
            partial: field(fb::Response::VT_PARTIAL)?,
        };
        let mut values = vec![
            (l.id, 8),
            (l.status, 1),
            (l.queue_us, 4),
            (l.compute_us, 4),
            (l.total_us, 4),
            (l.cached, 1),
            (l.partial, 1),
        ];
        if let Some(t) = field(fb::Response::VT_TICKET) {
            values.push((t, 8));
        }
        if let Some(v) = resp.output() {
            let at = v.bytes().as_ptr() as usize - body.as_ptr() as usize;
            values.push((at, v.len()));
        }
        values.sort_unstable();
        let mut same = Vec::new();
        let mut from = 0;
        for (at, len) in values {
            if at > from {
                same.push((from, at));
            }
            from = from.max(at + len);
        }
        if from < body.len() {
            same.push((from, body.len()));
        }
        Some(Layout {
            same: same.into(),
            ..l
        })
    }

    fn head(&self, b: &[u8]) -> Result<ResponseHead, DecodeError> {
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let mut id = [0u8; 8];
        id.copy_from_slice(&b[self.id..self.id + 8]);
        Ok(ResponseHead {
            id: u64::from_le_bytes(id),
            status: Status::from_wire(b[self.status]).ok_or(DecodeError::Verify)?,
            timings: Timings {
                queue_us: u32_at(self.queue_us),
                compute_us: u32_at(self.compute_us),
                total_us: u32_at(self.total_us),
            },
            cached: b[self.cached] != 0,
            partial: b[self.partial] != 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{Encoder, ResponseHeader, RunInfo, FRAME_HEADER_LEN};

    fn frame(enc: &mut Encoder, id: u64, status: Status, total: u32, runs: &[RunInfo]) -> Vec<u8> {
        let ok = status == Status::Ok;
        let h = ResponseHeader {
            id,
            status,
            message: if ok { "" } else { "no" },
            rows: ok as u32,
            cols: if ok { 16 } else { 0 },
            timings: Timings {
                queue_us: total / 3,
                compute_us: total / 2,
                total_us: total,
            },
            cached: id.is_multiple_of(2),
            partial: id.is_multiple_of(3),
            ticket: id * 7,
        };
        let out = [id as f32; 16];
        let mut f = Vec::new();
        enc.response(&h, runs, if ok { &out } else { &[] }, &mut f);
        f
    }

    fn full(body: &[u8]) -> Result<ResponseHead, DecodeError> {
        decode_response(body).map(|v| ResponseHead::from(&v))
    }

    #[test]
    fn reads_what_the_verifier_reads_and_verifies_each_layout_once() {
        let mut enc = Encoder::new();
        let mut r = HeadReader::new();
        let run = [RunInfo {
            model: "a",
            version: 3,
            flops: 99,
        }];
        for id in 1..200u64 {
            for (status, runs) in [
                (Status::Ok, &[][..]),
                (Status::Ok, &run[..]),
                (Status::Overloaded, &[][..]),
            ] {
                let f = frame(&mut enc, id, status, id as u32 * 11, runs);
                let body = &f[FRAME_HEADER_LEN..];
                assert_eq!(r.read(body), full(body), "id {id} {status:?}");
            }
        }
        assert_eq!(r.layouts(), 3, "one per shape of answer");
    }

    #[test]
    fn any_changed_byte_reads_as_the_verifier_says() {
        // Every one-byte change of a known layout's body: the fast read
        // agrees with the full verify-and-decode (value or error).
        let mut enc = Encoder::new();
        let mut r = HeadReader::new();
        let f = frame(&mut enc, 2, Status::Ok, 500, &[]);
        let body = f[FRAME_HEADER_LEN..].to_vec();
        r.read(&body).unwrap();
        for i in 0..body.len() {
            for x in [0x01u8, 0x80, 0xff] {
                let mut b = body.clone();
                b[i] ^= x;
                let full = full(&b);
                let fast = r.read(&b);
                // A stored bool other than 0/1 is "true" to the fast read;
                // the generated reader's answer for it is not compared.
                if let (true, Ok(f), Ok(g)) = (b[i] > 1, full, fast) {
                    assert_eq!(
                        (f.id, f.status, f.timings),
                        (g.id, g.status, g.timings),
                        "byte {i} ^ {x:#x}"
                    );
                    continue;
                }
                assert_eq!(fast, full, "byte {i} ^ {x:#x}");
            }
        }
    }
}
