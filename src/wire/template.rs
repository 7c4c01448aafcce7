//! Response templates: the common answer (no message; no run, a model's
//! one run, or an ensemble's runs, up to [`TEMPLATE_RUNS_MAX`]) encoded by copying a frame built once and patching its scalar fields and
//! output bytes, instead of building it with the flatbuffers builder each
//! time (zeroing, per-field bookkeeping, vtable search, then a copy).
//!
//! A template is an ordinary frame built by the builder with
//! `force_defaults`, so every scalar field is stored even at its default
//! value; its positions are then read back through the generated reader
//! (table location + vtable slot), not guessed. A frame patched from it is
//! byte for byte what the builder writes with `force_defaults` for the same
//! values, and reads the same through any flatbuffers reader (a stored
//! default is legal). Templates are keyed by output length and the runs'
//! model names in order (the frame's layout depends on nothing else),
//! bounded in number; a shape beyond the bound is built the ordinary way.

use super::beast_generated::beast::wire as fb;
use super::frame::FRAME_HEADER_LEN;
use super::types::{ResponseHeader, RunInfo};

/// Templates kept per encoder (output lengths × models and ensemble run
/// lists a shard answers).
pub const TEMPLATES_MAX: usize = 64;

/// Runs a templated answer may list: an ensemble's members at most
/// (`config::ENSEMBLE_MEMBERS_MAX`, 16; not imported, wire depends on no
/// server module). A longer list is built the ordinary way.
pub const TEMPLATE_RUNS_MAX: usize = 16;

/// Byte positions (in the whole frame, length prefix included).
#[derive(Clone, Copy, Debug, Default)]
struct At {
    id: usize,
    status: usize,
    rows: usize,
    cols: usize,
    output: usize,
    queue_us: usize,
    compute_us: usize,
    total_us: usize,
    cached: usize,
    partial: usize,
    ticket: usize,
}

/// Byte positions of one run's patched fields.
#[derive(Clone, Copy, Debug, Default)]
struct RunAt {
    version: usize,
    flops: usize,
}

struct Template {
    out_len: usize,
    /// The runs' model names, in order (empty: no run).
    models: Box<[Box<str>]>,
    frame: Vec<u8>,
    at: At,
    /// One per item of `models`.
    runs_at: Box<[RunAt]>,
}

impl Template {
    fn is_for(&self, out_len: usize, runs: &[RunInfo<'_>]) -> bool {
        self.out_len == out_len
            && self.models.len() == runs.len()
            && self.models.iter().zip(runs).all(|(m, r)| **m == *r.model)
    }
}

/// The templates of one encoder.
#[derive(Default)]
pub(super) struct Templates {
    list: Vec<Template>,
}

/// Whether a response can be written from a template.
pub(super) fn fits(h: &ResponseHeader<'_>, runs: &[RunInfo<'_>]) -> bool {
    h.message.is_empty() && runs.len() <= TEMPLATE_RUNS_MAX
}

impl Templates {
    /// Append the frame for `h`, `runs` (at most [`TEMPLATE_RUNS_MAX`]) and
    /// `output` to `out`,
    /// building the template first if it is new (`build` encodes a frame
    /// with `force_defaults` into its argument). `false`: no room for one
    /// more template; the caller builds the frame itself.
    pub(super) fn write(
        &mut self,
        h: &ResponseHeader<'_>,
        runs: &[RunInfo<'_>],
        output: &[f32],
        out: &mut Vec<u8>,
        build: impl FnOnce(&mut Vec<u8>),
    ) -> bool {
        let i = match self.list.iter().position(|t| t.is_for(output.len(), runs)) {
            Some(i) => i,
            None => {
                if self.list.len() >= TEMPLATES_MAX {
                    return false;
                }
                let mut frame = Vec::new();
                build(&mut frame);
                let Some((at, runs_at)) = positions(&frame, output.len(), runs.len()) else {
                    return false;
                };
                self.list.push(Template {
                    out_len: output.len(),
                    models: runs.iter().map(|r| Box::from(r.model)).collect(),
                    frame,
                    at,
                    runs_at,
                });
                self.list.len() - 1
            }
        };
        let t = &self.list[i];
        let base = out.len();
        out.extend_from_slice(&t.frame);
        let f = &mut out[base..];
        let a = t.at;
        let put = |f: &mut [u8], at: usize, b: &[u8]| f[at..at + b.len()].copy_from_slice(b);
        put(f, a.id, &h.id.to_le_bytes());
        f[a.status] = h.status as u8;
        put(f, a.rows, &h.rows.to_le_bytes());
        put(f, a.cols, &h.cols.to_le_bytes());
        put(f, a.queue_us, &h.timings.queue_us.to_le_bytes());
        put(f, a.compute_us, &h.timings.compute_us.to_le_bytes());
        put(f, a.total_us, &h.timings.total_us.to_le_bytes());
        f[a.cached] = h.cached as u8;
        f[a.partial] = h.partial as u8;
        put(f, a.ticket, &h.ticket.to_le_bytes());
        for (r, at) in runs.iter().zip(&t.runs_at[..]) {
            put(f, at.version, &r.version.to_le_bytes());
            put(f, at.flops, &r.flops.to_le_bytes());
        }
        put(f, a.output, bytemuck::cast_slice(output));
        true
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.list.len()
    }
}

/// Where each patched field of `frame` sits; `None` if the frame is not a
/// response of that shape (then no template is kept).
fn positions(frame: &[u8], out_len: usize, n_runs: usize) -> Option<(At, Box<[RunAt]>)> {
    let body = frame.get(FRAME_HEADER_LEN..)?;
    let msg = flatbuffers::root::<fb::Message>(body).ok()?;
    let resp = msg.body_as_response()?;
    let tab = resp._tab;
    // Absolute position in the frame of a stored field of a table.
    let field = |t: &flatbuffers::Table<'_>, slot: flatbuffers::VOffsetT| {
        let o = t.vtable().get(slot) as usize;
        (o != 0).then_some(FRAME_HEADER_LEN + t.loc() + o)
    };
    let output = match resp.output() {
        Some(v) if v.len() == out_len * 4 => {
            FRAME_HEADER_LEN + v.bytes().as_ptr() as usize - body.as_ptr() as usize
        }
        None if out_len == 0 => 0,
        _ => return None,
    };
    let runs_at = match resp.runs() {
        Some(runs) if runs.len() == n_runs && n_runs > 0 => runs
            .iter()
            .map(|run| {
                Some(RunAt {
                    version: field(&run._tab, fb::Run::VT_VERSION)?,
                    flops: field(&run._tab, fb::Run::VT_FLOPS)?,
                })
            })
            .collect::<Option<Box<[RunAt]>>>()?,
        None if n_runs == 0 => Box::default(),
        _ => return None,
    };
    let at = At {
        id: field(&tab, fb::Response::VT_ID)?,
        status: field(&tab, fb::Response::VT_STATUS)?,
        rows: field(&tab, fb::Response::VT_ROWS)?,
        cols: field(&tab, fb::Response::VT_COLS)?,
        output,
        queue_us: field(&tab, fb::Response::VT_QUEUE_US)?,
        compute_us: field(&tab, fb::Response::VT_COMPUTE_US)?,
        total_us: field(&tab, fb::Response::VT_TOTAL_US)?,
        cached: field(&tab, fb::Response::VT_CACHED)?,
        partial: field(&tab, fb::Response::VT_PARTIAL)?,
        ticket: field(&tab, fb::Response::VT_TICKET)?,
    };
    Some((at, runs_at))
}

#[cfg(test)]
mod tests {
    use super::{TEMPLATES_MAX, TEMPLATE_RUNS_MAX};
    use crate::wire::{
        check_frame, decode_response, response_frame_len_max, Encoder, FrameCheck, ResponseHeader,
        ResponseView, RunInfo, Status, Timings, FRAME_HEADER_LEN,
    };
    use rand::{rngs::StdRng, Rng, SeedableRng};

    fn body(frame: &[u8]) -> &[u8] {
        let FrameCheck::Complete { body_len } = check_frame(frame, 1 << 20) else {
            panic!("not one whole frame")
        };
        assert_eq!(frame.len(), FRAME_HEADER_LEN + body_len, "one frame only");
        &frame[FRAME_HEADER_LEN..]
    }

    fn same(a: &ResponseView<'_>, b: &ResponseView<'_>) {
        assert_eq!(
            (a.id, a.status, a.message, a.rows, a.cols, a.output),
            (b.id, b.status, b.message, b.rows, b.cols, b.output)
        );
        assert_eq!(a.timings, b.timings);
        assert_eq!(
            (a.cached, a.partial, a.ticket),
            (b.cached, b.partial, b.ticket)
        );
        assert_eq!(a.runs, b.runs);
    }

    #[test]
    fn a_templated_response_is_the_built_one_with_defaults_stored() {
        let mut rng = StdRng::seed_from_u64(10);
        let models = ["bench_a", "m", "a_longer_model_name_here"];
        let mut enc = Encoder::new();
        let mut plain = Encoder::new();
        for i in 0..3000 {
            let out_len = [0usize, 1, 2, 16, 33][rng.random_range(0..5)];
            let output: Vec<f32> = (0..out_len).map(|_| rng.random()).collect();
            let zero = i % 4 == 0; // defaults (0, false) must patch too
            let pick = |rng: &mut StdRng, n: u64| if zero { 0 } else { rng.random_range(0..n) };
            let h = ResponseHeader {
                id: pick(&mut rng, u64::MAX),
                status: Status::ALL[pick(&mut rng, Status::ALL.len() as u64) as usize],
                message: "",
                // The shape must match the output (decode checks it).
                rows: (out_len > 0) as u32,
                cols: out_len as u32,
                timings: Timings {
                    queue_us: pick(&mut rng, u32::MAX as u64) as u32,
                    compute_us: pick(&mut rng, 1000) as u32,
                    total_us: pick(&mut rng, 100_000) as u32,
                },
                cached: !zero && rng.random(),
                partial: !zero && rng.random(),
                ticket: pick(&mut rng, u64::MAX),
            };
            let run = [RunInfo {
                model: models[rng.random_range(0..models.len())],
                version: pick(&mut rng, 100) as u32,
                flops: pick(&mut rng, u64::MAX),
            }];
            let runs: &[RunInfo<'_>] = if rng.random_bool(0.7) { &run } else { &[] };
            let mut got = vec![7u8; 5]; // appended after what is there
            enc.response(&h, runs, &output, &mut got);
            let got = &got[5..];
            let mut want = Vec::new();
            plain.response_built(&h, runs, &output, &mut want, true);
            assert_eq!(got, &want[..], "response {i}");
            let mut minimal = Vec::new();
            plain.response_built(&h, runs, &output, &mut minimal, false);
            same(
                &decode_response(body(got)).unwrap(),
                &decode_response(body(&minimal)).unwrap(),
            );
            let bound = response_frame_len_max(0, out_len, runs.iter().map(|r| r.model.len()));
            assert!(got.len() <= bound, "{} > {bound}", got.len());
        }
        // 5 output lengths x (3 models + no run).
        assert_eq!(enc.templates_kept(), 20);
    }

    #[test]
    fn an_ensemble_answer_from_its_template_is_the_built_one() {
        let mut rng = StdRng::seed_from_u64(11);
        // Names of several lengths (the string padding differs), run lists
        // of several sizes and orders, as partial and cached answers give.
        let names = ["e", "abc", "bench_a", "a_member_with_a_long_name_x"];
        let sixteen: Vec<&str> = (0..TEMPLATE_RUNS_MAX).map(|i| names[i % 4]).collect();
        let lists: [&[&str]; 6] = [
            &names[..3],
            &[names[2], names[0]],
            &[names[3]],
            &[names[1], names[3], names[0], names[2]],
            &[names[2], names[1], names[0]],
            &sixteen,
        ];
        // (rows, cols): the same output length as 1 x 32 and 2 x 16.
        let shapes = [(0u32, 0u32), (1, 16), (2, 16), (1, 32), (3, 1), (4, 16)];
        let mut enc = Encoder::new();
        let mut plain = Encoder::new();
        for i in 0..4000 {
            let (rows, cols) = shapes[rng.random_range(0..shapes.len())];
            let out_len = (rows * cols) as usize;
            let output: Vec<f32> = (0..out_len).map(|_| rng.random::<f32>() - 0.5).collect();
            let list = lists[rng.random_range(0..lists.len())];
            let zero = i % 5 == 0;
            let pick = |rng: &mut StdRng, n: u64| if zero { 0 } else { rng.random_range(0..n) };
            let cached = !zero && rng.random_bool(0.3);
            let mut runs = [RunInfo {
                model: "",
                version: 0,
                flops: 0,
            }; TEMPLATE_RUNS_MAX];
            for (r, m) in runs.iter_mut().zip(list) {
                // A member answered from the cache ran no FLOPs.
                let from_cache = cached || rng.random_bool(0.2);
                *r = RunInfo {
                    model: m,
                    version: pick(&mut rng, 1 << 20) as u32,
                    flops: if from_cache {
                        0
                    } else {
                        pick(&mut rng, u64::MAX)
                    },
                };
            }
            let runs = &runs[..list.len()];
            let h = ResponseHeader {
                id: pick(&mut rng, u64::MAX),
                status: if zero {
                    Status::Ok
                } else {
                    Status::ALL[rng.random_range(0..Status::ALL.len())]
                },
                message: "",
                rows,
                cols,
                timings: Timings {
                    queue_us: pick(&mut rng, u32::MAX as u64) as u32,
                    compute_us: pick(&mut rng, 100_000) as u32,
                    total_us: pick(&mut rng, u32::MAX as u64) as u32,
                },
                cached,
                partial: !zero && rng.random(),
                ticket: pick(&mut rng, u64::MAX),
            };
            let mut got = vec![3u8; 7]; // appended after what is there
            enc.response(&h, runs, &output, &mut got);
            let got = &got[7..];
            let mut want = Vec::new();
            plain.response_built(&h, runs, &output, &mut want, true);
            assert_eq!(got, &want[..], "answer {i}");
            let mut minimal = Vec::new();
            plain.response_built(&h, runs, &output, &mut minimal, false);
            let (a, b) = (body(got), body(&minimal));
            let (a, b) = (decode_response(a).unwrap(), decode_response(b).unwrap());
            same(&a, &b);
            assert_eq!(a.runs.len(), list.len());
            for (&r, want) in a.runs.iter().zip(runs) {
                assert_eq!(r, (want.model, want.version, want.flops));
            }
            let bound = response_frame_len_max(0, out_len, runs.iter().map(|r| r.model.len()));
            assert!(got.len() <= bound, "{} > {bound}", got.len());
        }
        // 5 output lengths (1 x 32 and 2 x 16 share one) x 6 run lists.
        assert_eq!(enc.templates_kept(), 30);
    }

    #[test]
    fn messages_many_runs_and_shapes_past_the_bound_are_built() {
        let mut enc = Encoder::new();
        let mut plain = Encoder::new();
        let run = |m| RunInfo {
            model: m,
            version: 1,
            flops: 2,
        };
        let h = |message| ResponseHeader {
            id: 9,
            status: Status::Ok,
            message,
            rows: 1,
            cols: 1,
            timings: Timings::default(),
            cached: false,
            partial: false,
            ticket: 0,
        };
        let check =
            |enc: &mut Encoder, plain: &mut Encoder, h, runs: &[RunInfo<'_>], out: &[f32]| {
                let (mut a, mut b) = (Vec::new(), Vec::new());
                enc.response(&h, runs, out, &mut a);
                plain.response_built(&h, runs, out, &mut b, false);
                assert_eq!(a, b);
            };
        check(&mut enc, &mut plain, h("bad"), &[], &[]);
        let many = [run("a"); TEMPLATE_RUNS_MAX + 1];
        check(&mut enc, &mut plain, h(""), &many, &[1.0]);
        assert_eq!(enc.templates_kept(), 0);
        let out = vec![0.5f32; TEMPLATES_MAX + 3];
        for n in 0..TEMPLATES_MAX {
            enc.response(&h(""), &[], &out[..n], &mut Vec::new());
        }
        assert_eq!(enc.templates_kept(), TEMPLATES_MAX);
        // One shape more: built, still right, nothing kept.
        check(&mut enc, &mut plain, h(""), &[], &out[..TEMPLATES_MAX + 2]);
        assert_eq!(enc.templates_kept(), TEMPLATES_MAX);
    }
}
