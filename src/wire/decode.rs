//! Decoding: every body passes the flatbuffers verifier (bounded depth and
//! table count) before any field is read; the result is a borrowed view.

use super::beast_generated::beast::wire as fb;
use super::fast::{self, Fields};
use super::types::{
    CacheControl, DType, DecodeError, FeedbackView, Incoming, PolicyOverride, RequestView,
    ResponseView, Status, Timings,
};

/// Verifier limits. A `Message` nests at most Message → Response → runs →
/// Run → string; 16 leaves room for the next message kinds. Tables: one per
/// Run plus two; no ensemble has a thousand members.
pub const VERIFY_DEPTH_MAX: usize = 16;
pub const VERIFY_TABLES_MAX: usize = 1024;

fn verify(body: &[u8]) -> Result<fb::Message<'_>, DecodeError> {
    let opts = flatbuffers::VerifierOptions {
        max_depth: VERIFY_DEPTH_MAX,
        max_tables: VERIFY_TABLES_MAX,
        // A well-formed buffer's apparent size is about its length (shared
        // vtables are counted once per table); the bound stops a small
        // frame with aliased offsets from costing more than a few passes.
        max_apparent_size: body.len().saturating_mul(4).max(1 << 16),
        ignore_missing_null_terminator: false,
    };
    fb::root_as_message_with_opts(&opts, body).map_err(|_| DecodeError::Verify)
}

/// Decode and verify a request frame body (without the length prefix).
pub fn decode_request(body: &[u8]) -> Result<RequestView<'_>, DecodeError> {
    let req = verify(body)?
        .body_as_request()
        .ok_or(DecodeError::WrongKind)?;
    request_view(req)
}

/// Decode and verify what a client sends: a request or a feedback message.
pub fn decode_incoming(body: &[u8]) -> Result<Incoming<'_>, DecodeError> {
    decode_incoming_with_id(body).map_err(|r| r.error)
}

/// Why a client's message was refused, with the id to answer it with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    /// The request's id when the body verified (so a client matching by
    /// id sees the answer); 0 when it did not verify or is not a request.
    pub id: u64,
    pub error: DecodeError,
}

/// [`decode_incoming`], keeping the request's id when the body verified
/// but a field is wrong (missing, shape, unknown enum value).
pub fn decode_incoming_with_id(body: &[u8]) -> Result<Incoming<'_>, Refused> {
    let refused = |id, error| Refused { id, error };
    // The common case, checked without the general verifier's bookkeeping
    // (`fast.rs`); anything else, and every error, goes the full way.
    if let Some(f) = fast::request(body) {
        return view(f).map(Incoming::Request).map_err(|e| refused(f.id, e));
    }
    let msg = verify(body).map_err(|e| refused(0, e))?;
    if let Some(req) = msg.body_as_request() {
        return request_view(req)
            .map(Incoming::Request)
            .map_err(|e| refused(req.id(), e));
    }
    let fb = msg
        .body_as_feedback()
        .ok_or(refused(0, DecodeError::WrongKind))?;
    Ok(Incoming::Feedback(FeedbackView {
        id: fb.id(),
        ticket: fb.ticket(),
        label: fb.label(),
    }))
}

fn request_view(req: fb::Request<'_>) -> Result<RequestView<'_>, DecodeError> {
    view(Fields::of(req))
}

fn view(req: Fields<'_>) -> Result<RequestView<'_>, DecodeError> {
    let target = req.target.ok_or(DecodeError::Missing("target"))?;
    let input = req.input.ok_or(DecodeError::Missing("input"))?;
    // The verifier accepts any value of an enum's underlying type; an
    // unknown one is a malformed message, not something to guess at.
    let dtype = match req.dtype {
        fb::DType::F32 => DType::F32,
        fb::DType::F16 => DType::F16,
        _ => return Err(DecodeError::Unknown("dtype")),
    };
    let cache = match req.cache {
        fb::CacheControl::Use => CacheControl::Use,
        fb::CacheControl::Bypass => CacheControl::Bypass,
        fb::CacheControl::Refresh => CacheControl::Refresh,
        _ => return Err(DecodeError::Unknown("cache")),
    };
    let policy = PolicyOverride::from_wire(req.policy.0).ok_or(DecodeError::Unknown("policy"))?;
    let (rows, cols) = (req.rows, req.cols);
    if rows == 0 || cols == 0 || tensor_bytes(rows, cols, dtype.size()) != Some(input.len()) {
        return Err(DecodeError::Shape);
    }
    Ok(RequestView {
        id: req.id,
        target,
        version: non_zero(req.version),
        rows,
        cols,
        dtype,
        input,
        deadline_us: non_zero(req.deadline_us),
        domain: req.domain.filter(|d| !d.is_empty()),
        cache,
        policy,
    })
}

/// Decode and verify a response frame body (without the length prefix).
pub fn decode_response(body: &[u8]) -> Result<ResponseView<'_>, DecodeError> {
    let resp = verify(body)?
        .body_as_response()
        .ok_or(DecodeError::WrongKind)?;
    let status = Status::from_wire(resp.status().0).ok_or(DecodeError::Verify)?;
    let output = resp.output().map(|v| v.bytes()).unwrap_or(&[]);
    let (rows, cols) = (resp.rows(), resp.cols());
    if tensor_bytes(rows, cols, 4) != Some(output.len()) {
        return Err(DecodeError::Shape);
    }
    let runs = resp
        .runs()
        .map(|v| {
            v.iter()
                .map(|r| (r.model().unwrap_or(""), r.version(), r.flops()))
                .collect()
        })
        .unwrap_or_default();
    Ok(ResponseView {
        id: resp.id(),
        status,
        message: resp.message().unwrap_or(""),
        rows,
        cols,
        output,
        timings: Timings {
            queue_us: resp.queue_us(),
            compute_us: resp.compute_us(),
            total_us: resp.total_us(),
        },
        cached: resp.cached(),
        partial: resp.partial(),
        ticket: resp.ticket(),
        runs,
    })
}

/// rows × cols × elem_size, or `None` if it overflows whatever the sender claims.
fn tensor_bytes(rows: u32, cols: u32, elem_size: usize) -> Option<usize> {
    (rows as usize)
        .checked_mul(cols as usize)?
        .checked_mul(elem_size)
}

fn non_zero<T: Default + PartialEq>(v: T) -> Option<T> {
    (v != T::default()).then_some(v)
}
