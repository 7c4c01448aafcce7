//! Encoding: one reusable flatbuffers builder per encoder, each message
//! appended to the caller's buffer as one length-prefixed frame.

use super::beast_generated::beast::wire as fb;
use super::frame::FRAME_HEADER_LEN;
use super::template::{self, Templates};
use super::types::*;

/// An upper bound of the bytes of a response frame (length prefix
/// included) that [`Encoder::response`] writes for a message of
/// `message_len` bytes, `values` output f32s, and one run per item of
/// `run_names` (each a model name's byte length). Generous on purpose: it
/// covers the flatbuffers vtables, tables and alignment padding, so a
/// server can reserve room for an answer before computing it.
pub fn response_frame_len_max(
    message_len: usize,
    values: usize,
    run_names: impl IntoIterator<Item = usize>,
) -> usize {
    // Frame length, root offset, Message and Response vtables and tables.
    const FIXED: usize = 256;
    // A vector's or string's length prefix, NUL and alignment padding.
    const PER_VECTOR: usize = 16;
    // A Run's vtable, table, its offset in `runs` and its name's prefix.
    const PER_RUN: usize = 64;
    FIXED
        + (message_len + PER_VECTOR)
        + (values * 4 + PER_VECTOR)
        + PER_VECTOR
        + run_names.into_iter().map(|n| n + PER_RUN).sum::<usize>()
}

/// Reusable encoder: owns one flatbuffers builder, reset per message, so a
/// warmed-up encoder does not allocate. Common responses (no message;
/// no run, one, or an ensemble's runs) are copied from a per-shape template
/// and patched (`template.rs`).
pub struct Encoder {
    fbb: flatbuffers::FlatBufferBuilder<'static>,
    /// Scratch for the Run offsets of one response, kept between messages.
    runs: Vec<flatbuffers::WIPOffset<fb::Run<'static>>>,
    templates: Templates,
}

impl Default for Encoder {
    fn default() -> Self {
        Self::new()
    }
}

impl Encoder {
    pub fn new() -> Self {
        Encoder {
            fbb: flatbuffers::FlatBufferBuilder::with_capacity(4096),
            runs: Vec::new(),
            templates: Templates::default(),
        }
    }

    /// Append a whole response frame (u32 LE length + body) to `out`.
    pub fn response(
        &mut self,
        h: &ResponseHeader<'_>,
        runs: &[RunInfo<'_>],
        output: &[f32],
        out: &mut Vec<u8>,
    ) {
        debug_assert!(
            h.status != Status::Ok || output.len() == h.rows as usize * h.cols as usize,
            "output length must be rows * cols"
        );
        if template::fits(h, runs) {
            let (fbb, scratch) = (&mut self.fbb, &mut self.runs);
            let built = self.templates.write(h, runs, output, out, |frame| {
                fbb.force_defaults(true);
                build_response(fbb, scratch, h, runs, output, frame);
                fbb.force_defaults(false);
            });
            if built {
                return;
            }
        }
        build_response(&mut self.fbb, &mut self.runs, h, runs, output, out);
    }

    /// The response built the ordinary way (no template), as `response`
    /// writes it for a shape without one (tests, examples/hit_path_cost.rs).
    #[doc(hidden)]
    pub fn response_built(
        &mut self,
        h: &ResponseHeader<'_>,
        runs: &[RunInfo<'_>],
        output: &[f32],
        out: &mut Vec<u8>,
        force_defaults: bool,
    ) {
        self.fbb.force_defaults(force_defaults);
        build_response(&mut self.fbb, &mut self.runs, h, runs, output, out);
        self.fbb.force_defaults(false);
    }

    #[cfg(test)]
    pub(super) fn templates_kept(&self) -> usize {
        self.templates.len()
    }

    /// Append a whole request frame (u32 LE length + body) to `out`.
    pub fn request(&mut self, id: u64, r: &RequestSpec<'_>, out: &mut Vec<u8>) {
        let fbb = &mut self.fbb;
        fbb.reset();
        let target = fbb.create_string(r.target);
        let domain = r.domain.map(|d| fbb.create_string(d));
        let (dtype, input) = match r.input {
            Input::F32(x) => (fb::DType::F32, fbb.create_vector(le_bytes(x))),
            Input::F16(x) => (fb::DType::F16, fbb.create_vector(le_bytes(x))),
        };
        let cache = match r.cache {
            CacheControl::Use => fb::CacheControl::Use,
            CacheControl::Bypass => fb::CacheControl::Bypass,
            CacheControl::Refresh => fb::CacheControl::Refresh,
        };
        let req = fb::Request::create(
            fbb,
            &fb::RequestArgs {
                id,
                target: Some(target),
                version: r.version.unwrap_or(0),
                rows: r.rows,
                cols: r.cols,
                dtype,
                input: Some(input),
                deadline_us: r.deadline_us.unwrap_or(0),
                domain,
                cache,
                policy: fb::Policy(r.policy as u8),
            },
        );
        finish(fbb, fb::Body::Request, req.as_union_value(), out);
    }

    /// Append a whole feedback frame (u32 LE length + body) to `out`.
    pub fn feedback(&mut self, f: &FeedbackView, out: &mut Vec<u8>) {
        let fbb = &mut self.fbb;
        fbb.reset();
        let m = fb::Feedback::create(
            fbb,
            &fb::FeedbackArgs {
                id: f.id,
                ticket: f.ticket,
                label: f.label,
            },
        );
        finish(fbb, fb::Body::Feedback, m.as_union_value(), out);
    }
}

// Tensors go on the wire as little-endian bytes, cast in place. A big-endian
// port would byte-swap here (and in `read_f32_into`, which already is
// endian-neutral); until someone needs one, refuse to build rather than
// send wrong numbers.
#[cfg(target_endian = "big")]
compile_error!("beast's wire encoder assumes a little-endian target");

fn le_bytes<T: bytemuck::Pod>(x: &[T]) -> &[u8] {
    bytemuck::cast_slice(x)
}

fn finish(
    fbb: &mut flatbuffers::FlatBufferBuilder<'static>,
    body_type: fb::Body,
    body: flatbuffers::WIPOffset<flatbuffers::UnionWIPOffset>,
    out: &mut Vec<u8>,
) {
    let msg = fb::Message::create(
        fbb,
        &fb::MessageArgs {
            body_type,
            body: Some(body),
        },
    );
    fbb.finish(msg, None);
    let data = fbb.finished_data();
    // The builder itself refuses buffers of 2 GiB or more, so this fits.
    let len = data.len() as u32;
    out.reserve(FRAME_HEADER_LEN + data.len());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(data);
}

fn build_response(
    fbb: &mut flatbuffers::FlatBufferBuilder<'static>,
    scratch: &mut Vec<flatbuffers::WIPOffset<fb::Run<'static>>>,
    h: &ResponseHeader<'_>,
    runs: &[RunInfo<'_>],
    output: &[f32],
    out: &mut Vec<u8>,
) {
    fbb.reset();
    scratch.clear();
    for r in runs {
        let model = fbb.create_string(r.model);
        let run = fb::Run::create(
            fbb,
            &fb::RunArgs {
                model: Some(model),
                version: r.version,
                flops: r.flops,
            },
        );
        scratch.push(run);
    }
    let runs = (!runs.is_empty()).then(|| fbb.create_vector(scratch));
    let message = (!h.message.is_empty()).then(|| fbb.create_string(h.message));
    let output = (!output.is_empty()).then(|| fbb.create_vector(le_bytes(output)));
    let resp = fb::Response::create(
        fbb,
        &fb::ResponseArgs {
            id: h.id,
            status: fb::Status(h.status as u8),
            message,
            rows: h.rows,
            cols: h.cols,
            output,
            queue_us: h.timings.queue_us,
            compute_us: h.timings.compute_us,
            total_us: h.timings.total_us,
            cached: h.cached,
            partial: h.partial,
            runs,
            ticket: h.ticket,
        },
    );
    finish(fbb, fb::Body::Response, resp.as_union_value(), out);
}
