//! A straight-line verifier for the one message a server reads most: a
//! `Message` whose body is a `Request`. It checks, without allocating or
//! tracing, every condition the flatbuffers verifier checks on that shape
//! (the same alignment, bounds, vtable, union, string NUL and UTF-8, and
//! apparent-size rules, in the same order of reads), and answers only
//! "accepted" or "ask the full verifier": anything it does not accept (a
//! feedback message, a malformed buffer, a limit) goes through
//! `flatbuffers` as before, so errors are reported exactly as before.
//!
//! Soundness rests on one property, tested against the flatbuffers verifier
//! on mutated buffers (`tests`): a body accepted here is accepted there too.
//!
//! The walk keeps what it checked: the fields come out as [`Fields`],
//! without reading each one again through the table's vtable.

use super::beast_generated::beast::wire as fb;

/// A request's fields as stored (the schema's default where absent).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Fields<'a> {
    pub id: u64,
    pub target: Option<&'a str>,
    pub version: u32,
    pub rows: u32,
    pub cols: u32,
    pub dtype: fb::DType,
    pub input: Option<&'a [u8]>,
    pub deadline_us: u64,
    pub domain: Option<&'a str>,
    pub cache: fb::CacheControl,
    pub policy: fb::Policy,
}

impl<'a> Fields<'a> {
    /// The same fields through the generated accessors (a request the full
    /// verifier accepted).
    pub fn of(req: fb::Request<'a>) -> Self {
        Fields {
            id: req.id(),
            target: req.target(),
            version: req.version(),
            rows: req.rows(),
            cols: req.cols(),
            dtype: req.dtype(),
            input: req.input().map(|v| v.bytes()),
            deadline_us: req.deadline_us(),
            domain: req.domain(),
            cache: req.cache(),
            policy: req.policy(),
        }
    }
}

struct V<'a> {
    buf: &'a [u8],
    /// Bytes of every range checked, as the flatbuffers verifier counts them.
    apparent: usize,
}

/// A table: its position, its vtable's position and length.
#[derive(Clone, Copy)]
struct Table {
    pos: usize,
    vt: usize,
    vt_len: usize,
}

impl<'a> V<'a> {
    #[inline]
    fn range(&mut self, pos: usize, size: usize) -> Option<()> {
        let end = pos.checked_add(size)?;
        (end <= self.buf.len()).then_some(())?;
        self.apparent += size;
        Some(())
    }
    #[inline]
    fn at<const N: usize>(&mut self, pos: usize) -> Option<[u8; N]> {
        // Aligned to its size (all scalars read here are 1, 2, 4 or 8 bytes).
        pos.is_multiple_of(N).then_some(())?;
        self.range(pos, N)?;
        self.buf[pos..pos + N].try_into().ok()
    }
    #[inline]
    fn u16(&mut self, pos: usize) -> Option<usize> {
        self.at::<2>(pos).map(|b| u16::from_le_bytes(b) as usize)
    }
    #[inline]
    fn u32(&mut self, pos: usize) -> Option<usize> {
        self.at::<4>(pos).map(|b| u32::from_le_bytes(b) as usize)
    }
    fn table(&mut self, pos: usize) -> Option<Table> {
        let soff = i32::from_le_bytes(self.at::<4>(pos)?);
        let vt = if soff > 0 {
            pos.checked_sub(soff.unsigned_abs() as usize)?
        } else {
            pos.checked_add(soff.unsigned_abs() as usize)?
        };
        (vt < self.buf.len()).then_some(())?;
        let vt_len = self.u16(vt)?;
        ((vt + vt_len) % 2 == 0).then_some(())?;
        self.range(vt, vt_len)?;
        Some(Table { pos, vt, vt_len })
    }
    /// The position of field `slot` of `t`, if stored.
    #[inline]
    fn field(&mut self, t: Table, slot: u16) -> Option<Option<usize>> {
        let slot = slot as usize;
        if slot < t.vt_len {
            let off = self.u16(t.vt + slot)?;
            if off > 0 {
                return Some(Some(t.pos + off));
            }
        }
        Some(None)
    }
    /// A scalar field of `N` bytes, if stored, is in the buffer and
    /// aligned: its bytes (`None` inside: not stored).
    #[inline]
    fn scalar<const N: usize>(&mut self, t: Table, slot: u16) -> Option<Option<[u8; N]>> {
        match self.field(t, slot)? {
            Some(p) => Some(Some(self.at::<N>(p)?)),
            None => Some(None),
        }
    }
    /// A `[ubyte]` (or string) behind the offset at `p`: its byte range.
    fn bytes(&mut self, p: usize) -> Option<(usize, usize)> {
        let pos = p.checked_add(self.u32(p)?)?;
        let len = self.u32(pos)?;
        let start = pos + 4;
        self.range(start, len)?;
        Some((start, start + len))
    }
    fn string(&mut self, t: Table, slot: u16) -> Option<Option<&'a str>> {
        match self.field(t, slot)? {
            Some(p) => {
                let (s, e) = self.bytes(p)?;
                let buf: &'a [u8] = self.buf;
                let text = std::str::from_utf8(&buf[s..e]).ok()?;
                (buf.get(e) == Some(&0)).then_some(())?;
                Some(Some(text))
            }
            None => Some(None),
        }
    }
}

/// The fields of the `Request` in `body` when the fast checks accept it;
/// `None`: use the full verifier (which also decides what is wrong).
pub(super) fn request(body: &[u8]) -> Option<Fields<'_>> {
    // The same apparent-size bound as `decode::verify`.
    let apparent_max = body.len().saturating_mul(4).max(1 << 16);
    let mut v = V {
        buf: body,
        apparent: 0,
    };
    let root = v.u32(0)?;
    let msg = v.table(root)?;
    // Union: the value's position first, then the key's, as the verifier does.
    let val = v.field(msg, fb::Message::VT_BODY)?;
    let key = v.field(msg, fb::Message::VT_BODY_TYPE)?;
    let (Some(val), Some(key)) = (val, key) else {
        return None;
    };
    if v.at::<1>(key)?[0] != fb::Body::Request.0 {
        return None;
    }
    let req_pos = val.checked_add(v.u32(val)?)?;
    let req = v.table(req_pos)?;
    // Every check in the verifier's order; the values as the generated
    // accessors would read them (little-endian, the schema's defaults).
    let id = v
        .scalar::<8>(req, fb::Request::VT_ID)?
        .map_or(0, u64::from_le_bytes);
    let target = v.string(req, fb::Request::VT_TARGET)?;
    let version = v
        .scalar::<4>(req, fb::Request::VT_VERSION)?
        .map_or(0, u32::from_le_bytes);
    let rows = v
        .scalar::<4>(req, fb::Request::VT_ROWS)?
        .map_or(0, u32::from_le_bytes);
    let cols = v
        .scalar::<4>(req, fb::Request::VT_COLS)?
        .map_or(0, u32::from_le_bytes);
    let dtype = v
        .scalar::<1>(req, fb::Request::VT_DTYPE)?
        .map_or(fb::DType::F32, |b| fb::DType(b[0]));
    let input = match v.field(req, fb::Request::VT_INPUT)? {
        Some(p) => {
            let (s, e) = v.bytes(p)?;
            Some(&body[s..e])
        }
        None => None,
    };
    let deadline_us = v
        .scalar::<8>(req, fb::Request::VT_DEADLINE_US)?
        .map_or(0, u64::from_le_bytes);
    let domain = v.string(req, fb::Request::VT_DOMAIN)?;
    let cache = v
        .scalar::<1>(req, fb::Request::VT_CACHE)?
        .map_or(fb::CacheControl::Use, |b| fb::CacheControl(b[0]));
    let policy = v
        .scalar::<1>(req, fb::Request::VT_POLICY)?
        .map_or(fb::Policy::Default, |b| fb::Policy(b[0]));
    // Two tables, depth two: under the table and depth limits.
    (v.apparent <= apparent_max).then_some(())?;
    Some(Fields {
        id,
        target,
        version,
        rows,
        cols,
        dtype,
        input,
        deadline_us,
        domain,
        cache,
        policy,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{
        decode_incoming_with_id, CacheControl, Encoder, Incoming, Input, PolicyOverride,
        RequestSpec, FRAME_HEADER_LEN, VERIFY_DEPTH_MAX, VERIFY_TABLES_MAX,
    };
    use rand::{rngs::StdRng, Rng, SeedableRng};

    fn full(body: &[u8]) -> bool {
        let opts = flatbuffers::VerifierOptions {
            max_depth: VERIFY_DEPTH_MAX,
            max_tables: VERIFY_TABLES_MAX,
            max_apparent_size: body.len().saturating_mul(4).max(1 << 16),
            ignore_missing_null_terminator: false,
        };
        fb::root_as_message_with_opts(&opts, body).is_ok_and(|m| m.body_as_request().is_some())
    }

    fn full_request(body: &[u8]) -> fb::Request<'_> {
        let opts = flatbuffers::VerifierOptions {
            max_depth: VERIFY_DEPTH_MAX,
            max_tables: VERIFY_TABLES_MAX,
            max_apparent_size: body.len().saturating_mul(4).max(1 << 16),
            ignore_missing_null_terminator: false,
        };
        fb::root_as_message_with_opts(&opts, body)
            .unwrap()
            .body_as_request()
            .unwrap()
    }

    fn requests(rng: &mut StdRng) -> Vec<Vec<u8>> {
        let mut enc = Encoder::new();
        let mut out = Vec::new();
        for i in 0..40 {
            let n = rng.random_range(0..40);
            let x: Vec<f32> = (0..n).map(|_| rng.random()).collect();
            let h: Vec<u16> = (0..n).map(|_| rng.random()).collect();
            let spec = RequestSpec {
                target: ["a", "bench_a", "ünïcode", ""][i % 4],
                version: (i % 3 == 0).then_some(i as u32),
                rows: rng.random_range(0..3),
                cols: n as u32,
                input: if i % 2 == 0 {
                    Input::F32(&x)
                } else {
                    Input::F16(&h)
                },
                deadline_us: (i % 5 == 0).then_some(1234),
                domain: (i % 7 == 0).then_some("shop"),
                cache: [
                    CacheControl::Use,
                    CacheControl::Bypass,
                    CacheControl::Refresh,
                ][i % 3],
                policy: PolicyOverride::Default,
            };
            let mut f = Vec::new();
            enc.request(rng.random(), &spec, &mut f);
            out.push(f[FRAME_HEADER_LEN..].to_vec());
        }
        out
    }

    #[test]
    fn every_request_the_encoder_writes_takes_the_fast_path_and_reads_the_same() {
        let mut rng = StdRng::seed_from_u64(3);
        for body in requests(&mut rng) {
            let fast = request(&body).expect("fast path accepts an encoder's request");
            assert!(full(&body));
            assert_eq!(fast, Fields::of(full_request(&body)));
            let Ok(Incoming::Request(r)) = decode_incoming_with_id(&body) else {
                // A shape error (rows x cols) is decided after verification.
                continue;
            };
            assert_eq!(
                (fast.id, fast.target, fast.input),
                (r.id, Some(r.target), Some(r.input))
            );
        }
    }

    #[test]
    fn what_the_fast_path_accepts_the_full_verifier_accepts() {
        let mut rng = StdRng::seed_from_u64(4);
        let bodies = requests(&mut rng);
        let (mut fast_ok, mut tried) = (0, 0);
        for _ in 0..200_000 {
            let mut b = bodies[rng.random_range(0..bodies.len())].clone();
            // Mutations that hit the structure: flip bits, set bytes to
            // small or large values, truncate, extend.
            for _ in 0..rng.random_range(1..4) {
                let len = b.len();
                match rng.random_range(0..6) {
                    0 => b[rng.random_range(0..len)] ^= 1 << rng.random_range(0..8),
                    1 => b[rng.random_range(0..len)] = rng.random_range(0..16),
                    2 => b[rng.random_range(0..len)] = rng.random(),
                    3 => b[rng.random_range(0..len)] = 0xff,
                    4 => b.truncate(rng.random_range(0..len)),
                    _ => b.extend((0..rng.random_range(1..9)).map(|_| rng.random::<u8>())),
                }
                if b.is_empty() {
                    break;
                }
            }
            tried += 1;
            if let Some(fast) = request(&b) {
                fast_ok += 1;
                assert!(
                    full(&b),
                    "fast path accepted what the verifier refuses: {b:?}"
                );
                // And reads every field as the generated accessors do.
                assert_eq!(fast, Fields::of(full_request(&b)), "{b:?}");
            }
        }
        // The mutations must leave many accepted (else the test proves little).
        assert!(fast_ok > tried / 20, "{fast_ok} of {tried}");
    }

    #[test]
    fn other_messages_go_to_the_full_verifier() {
        let mut enc = Encoder::new();
        let mut f = Vec::new();
        enc.feedback(
            &crate::wire::FeedbackView {
                id: 1,
                ticket: 2,
                label: 3,
            },
            &mut f,
        );
        assert!(request(&f[FRAME_HEADER_LEN..]).is_none());
        assert!(request(&[]).is_none());
        assert!(request(&[0, 0, 0, 0]).is_none());
    }
}
