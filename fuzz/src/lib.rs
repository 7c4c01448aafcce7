//! The fuzz targets' bodies, shared by the cargo-fuzz binaries in
//! `fuzz/fuzz_targets/` (nightly, libFuzzer) and by `tests/fuzz_corpus.rs`
//! (stable, `cargo test`), which replays every input kept under
//! `fuzz/corpus/<target>/` and `fuzz/artifacts/<target>/` through the very
//! same functions. Each function takes arbitrary bytes and panics only when
//! beast breaks a promise: a panic inside beast, or a property checked here
//! (the frame reader agrees with `check_frame`, a decoded request re-encodes
//! to the same request, a reopened L2 file keeps what was inserted, ...).
//!
//! Only beast's public API (plus a few `#[doc(hidden)] pub` entry points)
//! and its own dependencies are used, so the test can `#[path]`-include
//! this file.

use std::path::PathBuf;

/// A target's body: arbitrary bytes in, a panic only on a broken promise.
pub type Target = fn(&[u8]);

/// Every target, by name (the folder names under `fuzz/corpus/`).
pub const TARGETS: [(&str, Target); 6] = [
    ("frame", frame),
    ("request", request),
    ("admin_head", admin_head),
    ("model", model),
    ("l2_open", l2_open),
    ("onnx", onnx),
];

/// A small deterministic generator, so chunk sizes come from the input.
struct Xorshift(u64);

impl Xorshift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

// ---------------------------------------------------------------- frame

/// `FrameReader` fed the stream in input-chosen pieces (by `feed`, or by
/// `spare` + a partial `filled`) must return exactly the frames, and the
/// error, that `check_frame` finds walking the whole stream; and a reader
/// drained after each read never holds more than one maximal frame plus its
/// header (plus, for `feed`, the slice fed: it copies all of it in).
///
/// Input: `[max_frame lo, max_frame hi, chunk seed, initial capacity, stream...]`.
pub fn frame(data: &[u8]) {
    use beast::wire::{check_frame, FrameCheck, FrameReader, FRAME_HEADER_LEN};
    if data.len() < 4 {
        return;
    }
    let max_frame = 1 + u16::from_le_bytes([data[0], data[1]]) as usize % 2048;
    let seed = data[2];
    let capacity = data[3] as usize;
    let stream = &data[4..];

    // The reference: walk the whole stream with check_frame.
    let mut want: Vec<&[u8]> = Vec::new();
    let mut want_err = None;
    let mut at = 0;
    loop {
        match check_frame(&stream[at..], max_frame) {
            FrameCheck::Incomplete => break,
            FrameCheck::Invalid { declared } => {
                want_err = Some(declared);
                break;
            }
            FrameCheck::Complete { body_len } => {
                want.push(&stream[at + FRAME_HEADER_LEN..at + FRAME_HEADER_LEN + body_len]);
                at += FRAME_HEADER_LEN + body_len;
            }
        }
    }

    for mode in 0..3 {
        let mut r = FrameReader::with_capacity(max_frame, capacity);
        let bound = r.capacity().max(FRAME_HEADER_LEN + max_frame);
        let mut rng = Xorshift(0x9E37_79B9_7F4A_7C15 ^ (seed as u64) << 8 ^ mode as u64 | 1);
        let mut got: Vec<Vec<u8>> = Vec::new();
        let mut got_err = None;
        let mut rest = stream;
        let mut fed_max = 0;
        'feed: while !rest.is_empty() {
            let n = (1 + rng.next() as usize % 64).min(rest.len());
            match mode {
                // Whole pieces copied in.
                0 => r.feed(&rest[..n]),
                // What a socket read does: fill part of the spare room.
                _ => {
                    let spare = r.spare();
                    assert!(!spare.is_empty(), "spare() returned no room");
                    let k = n.min(spare.len());
                    spare[..k].copy_from_slice(&rest[..k]);
                    r.filled(k);
                    rest = &rest[k..];
                    assert!(r.buffered() <= r.capacity());
                    if mode == 2 && !rng.next().is_multiple_of(4) {
                        // A caller that reads on before draining.
                        continue;
                    }
                    loop {
                        match r.next_frame() {
                            Ok(Some(b)) => got.push(b.to_vec()),
                            Ok(None) => break,
                            Err(e) => {
                                got_err = Some(e.declared);
                                break 'feed;
                            }
                        }
                    }
                    if mode == 1 {
                        assert!(
                            r.capacity() <= bound,
                            "reader grew to {} bytes, bound {bound}",
                            r.capacity()
                        );
                    }
                    continue;
                }
            }
            rest = &rest[n..];
            loop {
                match r.next_frame() {
                    Ok(Some(b)) => got.push(b.to_vec()),
                    Ok(None) => break,
                    Err(e) => {
                        got_err = Some(e.declared);
                        break 'feed;
                    }
                }
            }
            // fuzz/artifacts/frame/crash-30e6…: a slice holding more than
            // one frame is held whole (documented on `feed`), and the
            // buffer keeps its size (crash-418d…: the largest slice counts).
            fed_max = fed_max.max(n);
            let feed_bound = bound.max(FRAME_HEADER_LEN + max_frame + fed_max);
            assert!(
                r.capacity() <= feed_bound,
                "reader grew to {} bytes, bound {feed_bound}",
                r.capacity()
            );
        }
        if got_err.is_none() {
            loop {
                match r.next_frame() {
                    Ok(Some(b)) => got.push(b.to_vec()),
                    Ok(None) => break,
                    Err(e) => {
                        got_err = Some(e.declared);
                        break;
                    }
                }
            }
        }
        assert_eq!(got.len(), want.len(), "mode {mode}: frame count");
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(&g[..], *w, "mode {mode}: frame {i}");
        }
        assert_eq!(got_err, want_err, "mode {mode}: error");
    }
}

// -------------------------------------------------------------- request

/// Decoding never panics; a request (or feedback, or response) that decodes
/// obeys its documented invariants and re-encodes to the same message.
pub fn request(data: &[u8]) {
    use beast::wire::{
        decode_incoming, decode_request, decode_response, CacheControl, DType, Encoder, Incoming,
        Input, RequestSpec, ResponseHeader, RunInfo, Status, Timings,
    };
    let mut enc = Encoder::new();
    let mut out = Vec::new();

    // `decode_request` and `decode_incoming` agree on requests.
    let direct = decode_request(data);
    match decode_incoming(data) {
        Ok(Incoming::Request(r)) => {
            let d = direct.expect("decode_incoming read a request that decode_request refused");
            assert_eq!((d.id, d.target, d.input), (r.id, r.target, r.input));
            assert!(r.rows > 0 && r.cols > 0);
            assert_eq!(
                r.input.len(),
                r.rows as usize * r.cols as usize * r.dtype.size()
            );
            assert!(r.domain != Some(""));
            assert!(r.version != Some(0) && r.deadline_us != Some(0));
            let mut x = vec![0f32; r.rows as usize * r.cols as usize];
            r.read_f32_into(&mut x);
            let (f32s, f16s): (Vec<f32>, Vec<u16>) = match r.dtype {
                DType::F32 => (
                    r.input
                        .chunks_exact(4)
                        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect(),
                    Vec::new(),
                ),
                DType::F16 => (
                    Vec::new(),
                    r.input
                        .chunks_exact(2)
                        .map(|c| u16::from_le_bytes([c[0], c[1]]))
                        .collect(),
                ),
            };
            let input = match r.dtype {
                DType::F32 => Input::F32(&f32s),
                DType::F16 => Input::F16(&f16s),
            };
            let spec = RequestSpec {
                target: r.target,
                version: r.version,
                rows: r.rows,
                cols: r.cols,
                input,
                deadline_us: r.deadline_us,
                domain: r.domain,
                cache: r.cache,
                policy: r.policy,
            };
            enc.request(r.id, &spec, &mut out);
            let again = decode_request(&out[4..]).expect("a re-encoded request decodes");
            assert_eq!(
                (
                    again.id,
                    again.target,
                    again.version,
                    again.rows,
                    again.cols
                ),
                (r.id, r.target, r.version, r.rows, r.cols)
            );
            assert_eq!((again.dtype, again.input), (r.dtype, r.input));
            assert_eq!(
                (again.deadline_us, again.domain, again.policy),
                (r.deadline_us, r.domain, r.policy)
            );
            assert!(matches!(
                (again.cache, r.cache),
                (CacheControl::Use, CacheControl::Use)
                    | (CacheControl::Bypass, CacheControl::Bypass)
                    | (CacheControl::Refresh, CacheControl::Refresh)
            ));
        }
        Ok(Incoming::Feedback(f)) => {
            assert!(direct.is_err(), "a feedback message decoded as a request");
            out.clear();
            enc.feedback(&f, &mut out);
            match decode_incoming(&out[4..]) {
                Ok(Incoming::Feedback(g)) => assert_eq!(f, g),
                other => panic!("re-encoded feedback decoded as {other:?}"),
            }
        }
        Err(e) => {
            assert!(
                direct.is_err(),
                "decode_request accepted what decode_incoming refused"
            );
            assert!(!e.message().is_empty());
        }
    }

    // Responses (what the client reads from a server).
    if let Ok(v) = decode_response(data) {
        assert_eq!(v.output.len(), v.rows as usize * v.cols as usize * 4);
        assert!(Status::from_wire(v.status as u8) == Some(v.status));
        let output = v.output_f32();
        let runs: Vec<RunInfo<'_>> = v
            .runs
            .iter()
            .map(|&(model, version, flops)| RunInfo {
                model,
                version,
                flops,
            })
            .collect();
        let h = ResponseHeader {
            id: v.id,
            status: v.status,
            message: v.message,
            rows: v.rows,
            cols: v.cols,
            timings: Timings {
                queue_us: v.timings.queue_us,
                compute_us: v.timings.compute_us,
                total_us: v.timings.total_us,
            },
            cached: v.cached,
            partial: v.partial,
            ticket: v.ticket,
        };
        out.clear();
        enc.response(&h, &runs, &output, &mut out);
        let w = decode_response(&out[4..]).expect("a re-encoded response decodes");
        assert_eq!(
            (w.id, w.status, w.message, w.rows, w.cols, w.output),
            (v.id, v.status, v.message, v.rows, v.cols, v.output)
        );
        assert_eq!(
            (w.timings, w.cached, w.partial, w.ticket),
            (v.timings, v.cached, v.partial, v.ticket)
        );
        assert_eq!(w.runs, v.runs);
    }
}

// ----------------------------------------------------------- admin_head

/// The admin port's request-head parser: never panics, and what it returns
/// is a part of the request line, as documented.
///
/// Input: `[key length, key..., head...]` (the query key looked up).
pub fn admin_head(data: &[u8]) {
    use beast::server::admin::{fuzz_request_head, REQUEST_BYTES_MAX};
    let Some((&k, rest)) = data.split_first() else {
        return;
    };
    let k = (k as usize % 16).min(rest.len());
    let (key, head) = rest.split_at(k);
    let key = String::from_utf8_lossy(key);
    let Some((method, path, query, value)) = fuzz_request_head(head, &key) else {
        return;
    };
    let head = std::str::from_utf8(&head[..head.len().min(REQUEST_BYTES_MAX)])
        .expect("a head that parsed is UTF-8");
    let line = head.lines().next().unwrap();
    assert!(!method.is_empty() && !method.contains(' '));
    assert!(path.starts_with('/') && !path.contains(' ') && !path.contains('?'));
    assert!(!query.contains(' '));
    assert!(
        !line.bytes().any(|b| b.is_ascii_control()),
        "control bytes in {line:?}"
    );
    let mut parts = line.split(' ');
    assert_eq!(parts.next(), Some(method));
    let target = parts.next().unwrap();
    if query.is_empty() {
        assert!(
            target == path || target == format!("{path}?"),
            "{target:?} is not {path:?}"
        );
    } else {
        assert_eq!(target, format!("{path}?{query}"));
    }
    assert!(
        matches!(parts.next(), Some("HTTP/1.0" | "HTTP/1.1")),
        "{line:?}"
    );
    if let Some(v) = value {
        assert!(
            query.split('&').any(|kv| kv == format!("{key}={v}")),
            "{key}={v} is not a parameter of {query:?}"
        );
        // What /debug/trace does with it.
        let _ = v.parse::<f64>();
    }
}

// ---------------------------------------------------------------- model

/// Cap on a fuzzed model's work per row, so one input cannot stall the run.
const MODEL_FLOPS_MAX: u64 = 1 << 20;

/// Section separator in a `model` input.
pub const MODEL_SEP: &[u8] = b"\n%%\n";

/// A repository folder made from the input — `model.toml`, `%%`, an
/// `ensembles.toml`, `%%`, a `weights.safetensors` — loads without a
/// panic; every refusal names a file; a model that loads is consistent with
/// its manifest and runs one row on the CPU backend without a panic.
pub fn model(data: &[u8]) {
    use beast::model::{load, manifest, BatchLimits};
    let mut parts = split3(data, MODEL_SEP);
    let toml = parts.next().unwrap_or_default();
    let ensembles = parts.next();
    let weights = parts.next();
    let defaults = BatchLimits::default();
    // The parsers on their own (cheap: no files).
    let toml_text = String::from_utf8_lossy(toml);
    let parsed = manifest::parse_model_manifest(&toml_text, &defaults);
    if let Some(e) = ensembles {
        let _ = manifest::parse_ensembles(&String::from_utf8_lossy(e));
    }
    let Some(weights) = weights else {
        return;
    };
    if parsed.is_err() {
        // load_repository would refuse it at once: nothing more to reach.
        return;
    }
    let dir = scratch_dir("model");
    let mdir = dir.join("m");
    let vdir = mdir.join("1");
    std::fs::create_dir_all(&vdir).unwrap();
    std::fs::write(mdir.join("model.toml"), toml).unwrap();
    std::fs::write(vdir.join(load::WEIGHTS_FILE), weights).unwrap();
    match ensembles {
        Some(e) => std::fs::write(dir.join("ensembles.toml"), e).unwrap(),
        None => {
            let _ = std::fs::remove_file(dir.join("ensembles.toml"));
        }
    }
    let repo = load::load_repository(&dir, &defaults).expect("a readable folder loads");
    let d = dir.display().to_string();
    for e in &repo.errors {
        assert!(
            e.starts_with(&d) || e.contains("ensembles"),
            "refusal names no file: {e}"
        );
    }
    let Some(m) = repo.model("m", None) else {
        return;
    };
    let man = parsed.unwrap();
    assert_eq!(m.input_width, man.input_width);
    assert_eq!(m.layers.len(), man.layers.len());
    for (l, (i, o)) in m.layers.iter().zip(man.layer_dims()) {
        assert_eq!((l.in_dim, l.out_dim), (i, o));
        assert_eq!(l.weight().len(), i * o);
        assert_eq!(l.bias.len(), o);
        assert!(l.weight().iter().all(|w| w.is_finite()));
    }
    if m.flops_per_row() <= MODEL_FLOPS_MAX {
        use beast::backend::Backend;
        let mut b = beast::backend::cpu::CpuBackend::new();
        let x = vec![0.5f32; m.input_width];
        let mut y = vec![0f32; m.output_width];
        let _ = b.run(m, &x, 1, &mut y);
    }
}

fn split3<'a>(data: &'a [u8], sep: &'a [u8]) -> impl Iterator<Item = &'a [u8]> {
    let mut rest = Some(data);
    let mut n = 0;
    std::iter::from_fn(move || {
        let r = rest?;
        n += 1;
        if n == 3 {
            rest = None;
            return Some(r);
        }
        match r.windows(sep.len()).position(|w| w == sep) {
            Some(i) => {
                rest = Some(&r[i + sep.len()..]);
                Some(&r[..i])
            }
            None => {
                rest = None;
                Some(r)
            }
        }
    })
}

/// A per-process, per-target folder under the temp dir, emptied of files.
fn scratch_dir(target: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("beast-fuzz-{target}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

// -------------------------------------------------------------- l2_open

/// Largest L2 file a fuzz input may make (keeps an iteration fast).
const L2_BYTES_MAX: u64 = 256 << 10;

/// `L2Cache::open` on a file the input wrote: never panics; a bad file is
/// moved aside (and the reason given) and a fresh one made; a file it
/// serves works (an insert is read back, and survives a reopen); `inspect`
/// never panics either.
///
/// Input: `[flags, ways, value_f32_max, buckets, file...]`. Flags: bit 0
/// puts a valid header for (ways, value_f32_max, buckets) before the file
/// bytes (which then fill the slots); bit 1 then corrupts one header byte
/// chosen by the next input byte; bit 2 recomputes the header checksum last;
/// bit 3 opens with another geometry than the file's; bit 4 truncates or
/// pads the file to a length chosen by the next two input bytes.
pub fn l2_open(data: &[u8]) {
    use beast::cache::key::CacheKey;
    use beast::cache::l2::{self, Geometry, L2Cache, L2Config, HEADER_BYTES, MAGIC};
    if data.len() < 4 {
        return;
    }
    let (flags, ways, vmax, buckets) = (data[0], data[1], data[2], data[3]);
    let mut rest = &data[4..];
    let mut take = |n: usize| -> u64 {
        let mut v = 0u64;
        for i in 0..n {
            v |= (*rest.get(i).unwrap_or(&0) as u64) << (8 * i);
        }
        rest = &rest[n.min(rest.len())..];
        v
    };
    let cfg = L2Config {
        ways: 1 + ways as u32 % 8,
        value_f32_max: 1 + vmax as u32 % 40,
        total_bytes: 0,
    };
    let slot = (64 + 4 * cfg.value_f32_max as u64).div_ceil(64) * 64;
    let cfg = L2Config {
        total_bytes: HEADER_BYTES as u64 + (1 + buckets as u64 % 16) * slot * cfg.ways as u64,
        ..cfg
    };
    let geo = Geometry::for_config(&cfg).expect("a small geometry is valid");
    let corrupt_at = take(1) as usize;
    let new_len = take(2);
    let mut file: Vec<u8> = Vec::new();
    if flags & 1 != 0 {
        let mut h = vec![0u8; HEADER_BYTES];
        h[0..8].copy_from_slice(&MAGIC);
        h[8..12].copy_from_slice(&l2::FORMAT_VERSION.to_le_bytes());
        h[12..16].copy_from_slice(&geo.slot_size.to_le_bytes());
        h[16..20].copy_from_slice(&geo.value_f32_max.to_le_bytes());
        h[20..24].copy_from_slice(&geo.ways.to_le_bytes());
        h[24..32].copy_from_slice(&geo.bucket_count.to_le_bytes());
        h[32..40].copy_from_slice(&1u64.to_le_bytes());
        h[40..48].copy_from_slice(&geo.file_bytes.to_le_bytes());
        file.extend_from_slice(&h);
        file.extend_from_slice(rest);
        file.resize(geo.file_bytes as usize, 0);
        if flags & 2 != 0 {
            file[corrupt_at % 56] ^= 1 + (corrupt_at >> 6) as u8;
        }
    } else {
        file.extend_from_slice(rest);
    }
    if flags & 4 != 0 && file.len() >= 56 {
        let ck = xxhash_rust::xxh3::xxh3_64(&file[..48]);
        file[48..56].copy_from_slice(&ck.to_le_bytes());
    }
    if flags & 16 != 0 {
        file.resize((new_len % L2_BYTES_MAX) as usize, 0);
    }
    let open_cfg = if flags & 8 != 0 {
        // Room for a bucket of the other width (crash-477b…: 4224 bytes
        // held no bucket of 8 ways).
        L2Config {
            ways: cfg.ways % 8 + 1,
            total_bytes: cfg.total_bytes + 8 * slot,
            ..cfg
        }
    } else {
        cfg
    };
    let open_geo = Geometry::for_config(&open_cfg).unwrap();

    let dir = scratch_dir("l2");
    for e in std::fs::read_dir(&dir).unwrap().flatten() {
        let _ = std::fs::remove_file(e.path());
    }
    let path = dir.join("l2.cache");
    std::fs::write(&path, &file).unwrap();
    // inspect reads any file without changing it.
    let _ = l2::inspect(&path);
    assert_eq!(
        std::fs::read(&path).unwrap(),
        file,
        "inspect changed the file"
    );

    let (cache, report) = L2Cache::open(&path, open_cfg).expect("open of a writable file");
    assert_eq!(cache.geometry(), open_geo);
    if let Some(aside) = &report.moved_aside {
        assert!(report.reason.is_some() && report.created);
        assert_eq!(
            std::fs::read(aside).unwrap(),
            file,
            "the bad file was moved as it was"
        );
    } else if !report.created {
        assert!(report.reason.is_none());
        assert_eq!(
            file.len() as u64,
            open_geo.file_bytes,
            "served a file of the wrong length"
        );
    }
    assert!(report.entries <= open_geo.slots());
    assert_eq!(std::fs::metadata(&path).unwrap().len(), open_geo.file_bytes);
    // What it serves works: a value inserted is read back.
    let key = CacheKey(u128::from_le_bytes(*b"beast-fuzz-key!!"));
    let value: Vec<f32> = (0..open_geo.value_f32_max).map(|i| i as f32).collect();
    let mut out = vec![0f32; open_geo.value_f32_max as usize];
    let _ = cache.get(&key, &mut out);
    let stored = cache.insert(&key, 7, &value, 0);
    if stored {
        assert_eq!(cache.get(&key, &mut out), Some(value.len()));
        assert_eq!(out, value);
    }
    let _ = cache.stats();
    drop(cache);
    // And it survives a reopen with the same geometry.
    let (again, r2) = L2Cache::open(&path, open_cfg).expect("reopen");
    assert!(
        r2.moved_aside.is_none(),
        "reopened file set aside: {:?}",
        r2.reason
    );
    assert_eq!(r2.odd_slots_cleared + r2.corrupt_slots_cleared, 0);
    if stored {
        assert_eq!(again.get(&key, &mut out), Some(value.len()));
        assert_eq!(out, value);
    }
    drop(again);
    l2::inspect(&path).expect("inspect a file open served");
}

// ---------------------------------------------------------------- onnx

/// `beast import-onnx`'s decoder and converter on arbitrary bytes: an error
/// or a network whose layers chain, whose tensors have the sizes their dims
/// say, whose `model.toml` the server's manifest parser accepts with the same
/// shapes, and whose f32 forward pass runs.
pub fn onnx(data: &[u8]) {
    use beast::import::onnx::{forward_f32, import_bytes, manifest_text, proto};
    use beast::model::manifest::{parse_model_manifest, WIDTH_MAX};
    let decoded = proto::decode_model(data);
    let imported = import_bytes(data, None);
    let Ok(net) = imported else {
        return;
    };
    assert!(decoded.is_ok(), "imported what does not decode");
    let mut w = net.input_width;
    for l in &net.layers {
        assert_eq!(l.in_dim, w, "layers do not chain");
        assert_eq!(l.weight.len(), l.in_dim * l.out_dim);
        assert_eq!(l.bias.len(), l.out_dim);
        if let Some((g, b)) = &l.layer_norm {
            assert_eq!((g.len(), b.len()), (l.out_dim, l.out_dim));
        }
        w = l.out_dim;
    }
    let widths_ok = std::iter::once(net.input_width)
        .chain(net.layers.iter().map(|l| l.out_dim))
        .all(|w| w <= WIDTH_MAX);
    if widths_ok {
        let man = parse_model_manifest(&manifest_text(&net), &Default::default())
            .expect("the written model.toml parses");
        assert_eq!(man.input_width, net.input_width);
        assert_eq!(man.layers.len(), net.layers.len());
        assert_eq!(man.output, net.output);
    }
    if net.input_width * net.layers.iter().map(|l| l.out_dim).max().unwrap_or(1) < 1 << 20 {
        let y = forward_f32(&net, &vec![0.5; net.input_width], 1);
        assert_eq!(y.len(), w);
    }
}

/// Inputs that start each target's corpus (written by
/// `cargo test --release --test fuzz_corpus -- --ignored write_seeds`, and
/// replayed by the test whether or not they are on disk).
pub fn seeds(target: &str) -> Vec<Vec<u8>> {
    use beast::wire::{CacheControl, Encoder, FeedbackView, Input, PolicyOverride, RequestSpec};
    let mut enc = Encoder::new();
    let req = |enc: &mut Encoder, dtype16: bool, domain: Option<&str>| {
        let x32 = [0.5f32, -1.0, 2.0, 3.5, 0.0, 1e-3];
        let x16 = [0x3c00u16, 0x4000, 0xbc00, 0, 0x3800, 0x4200];
        let spec = RequestSpec {
            target: "digits",
            version: Some(2),
            rows: 2,
            cols: 3,
            input: if dtype16 {
                Input::F16(&x16)
            } else {
                Input::F32(&x32)
            },
            deadline_us: Some(5000),
            domain,
            cache: CacheControl::Refresh,
            policy: PolicyOverride::Cascade,
        };
        let mut out = Vec::new();
        enc.request(42, &spec, &mut out);
        out
    };
    match target {
        "frame" => {
            let mut s = vec![0x40, 0x00, 7, 16];
            let a = req(&mut enc, false, None);
            s.extend_from_slice(&a);
            s.extend_from_slice(&a);
            s.extend_from_slice(&[3, 0, 0, 0, b'a', b'b', b'c', 0, 0, 0, 0]);
            vec![s, vec![8, 0, 1, 4, 9, 0, 0, 0, 1, 2, 3]]
        }
        "request" => {
            let mut fb = Vec::new();
            enc.feedback(
                &FeedbackView {
                    id: 1,
                    ticket: 99,
                    label: 3,
                },
                &mut fb,
            );
            let resp = {
                use beast::wire::{ResponseHeader, RunInfo, Status, Timings};
                let mut out = Vec::new();
                enc.response(
                    &ResponseHeader {
                        id: 5,
                        status: Status::Ok,
                        message: "",
                        rows: 1,
                        cols: 2,
                        timings: Timings {
                            queue_us: 1,
                            compute_us: 2,
                            total_us: 3,
                        },
                        cached: true,
                        partial: false,
                        ticket: 8,
                    },
                    &[RunInfo {
                        model: "a",
                        version: 1,
                        flops: 100,
                    }],
                    &[0.25, 0.75],
                    &mut out,
                );
                out
            };
            [
                req(&mut enc, false, None),
                req(&mut enc, true, Some("shop")),
                fb,
                resp,
            ]
            .into_iter()
            .map(|f| f[4..].to_vec())
            .collect()
        }
        "admin_head" => [
            "\x07secondsGET /debug/trace?seconds=2&x=1 HTTP/1.1\r\nHost: x\r\n\r\n",
            "\x06targetPOST /v1/cache/purge?target=digits HTTP/1.1\r\n\r\n",
            "\x00GET /metrics HTTP/1.0\n\n",
        ]
        .iter()
        .map(|s| s.as_bytes().to_vec())
        .collect(),
        "model" => {
            let ens = "[ensembles.e]\nmembers = [\"m\", \"m\"]\ncombiner = \"weighted_mean\"\nweights = [1.0, 2.0]\n";
            let m = beast::model::Model::random_with_layer_norm(
                "m",
                &[3, 4, 2],
                beast::model::Activation::Relu,
                true,
                beast::model::OutputTransform::Softmax,
                1,
            );
            let dir = scratch_dir("seed");
            beast::model::demo::write_model(&dir, &m).unwrap();
            let toml = std::fs::read(dir.join("m/model.toml")).unwrap();
            let w = std::fs::read(dir.join("m/1").join(beast::model::load::WEIGHTS_FILE)).unwrap();
            let _ = std::fs::remove_dir_all(&dir);
            let mut s = toml;
            s.extend_from_slice(MODEL_SEP);
            s.extend_from_slice(ens.as_bytes());
            s.extend_from_slice(MODEL_SEP);
            s.extend_from_slice(&w);
            vec![s]
        }
        "l2_open" => {
            let mut a = vec![1 | 4, 3, 7, 2, 0, 0, 0];
            // One slot left odd (seq 1) and one with a bad checksum.
            let mut slot = vec![0u8; 64];
            slot[0] = 1;
            a.extend_from_slice(&slot);
            slot[0] = 2;
            slot[44] = 1; // occupied
            slot[40] = 3; // len 3
            a.extend_from_slice(&slot);
            vec![
                a,
                vec![1 | 4 | 8, 0, 3, 1, 0, 0, 0],
                vec![1 | 2, 1, 1, 1, 13, 0, 0],
                vec![1 | 16, 1, 1, 1, 0, 0, 16],
                b"\x00\x00\x00\x00BEASTL2\x00garbage".to_vec(),
            ]
        }
        "onnx" => vec![
            include_bytes!("../../tests/fixtures/onnx/handmade_mlp.onnx").to_vec(),
            include_bytes!("../../tests/fixtures/onnx/handmade_gelu_flatten.onnx").to_vec(),
            include_bytes!("../../tests/fixtures/onnx/sklearn_breast_cancer_binary.onnx").to_vec(),
            include_bytes!("../../tests/fixtures/onnx/refuse_external_data.onnx").to_vec(),
        ],
        _ => panic!("unknown fuzz target {target}"),
    }
}
