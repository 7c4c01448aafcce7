//! Encode → decode on both sides; decode of hostile bytes is in
//! `tests/hostile.rs`.

use super::*;
use rand::{rngs::StdRng, Rng, SeedableRng};

mod hostile;

fn spec<'a>(input: Input<'a>, rows: u32, cols: u32) -> RequestSpec<'a> {
    RequestSpec {
        target: "fraud_mlp",
        version: None,
        rows,
        cols,
        input,
        deadline_us: None,
        domain: None,
        cache: CacheControl::Use,
        policy: crate::wire::PolicyOverride::Default,
    }
}

fn encode_request(id: u64, r: &RequestSpec<'_>) -> Vec<u8> {
    let mut out = Vec::new();
    Encoder::new().request(id, r, &mut out);
    out
}

/// The body of the single frame in `frame`, checking the header.
fn body(frame: &[u8]) -> &[u8] {
    match check_frame(frame, MAX_FRAME_BYTES_DEFAULT) {
        FrameCheck::Complete { body_len } => {
            assert_eq!(FRAME_HEADER_LEN + body_len, frame.len());
            &frame[FRAME_HEADER_LEN..]
        }
        other => panic!("not one whole frame: {other:?}"),
    }
}

/// Build a Message by hand, for what the Encoder cannot produce.
fn raw_request(target: Option<&str>, input: Option<&[u8]>, dtype: u8, cache: u8) -> Vec<u8> {
    let mut fbb = flatbuffers::FlatBufferBuilder::new();
    let target = target.map(|t| fbb.create_string(t));
    let input = input.map(|i| fbb.create_vector(i));
    let req = fb::Request::create(
        &mut fbb,
        &fb::RequestArgs {
            target,
            input,
            rows: 1,
            cols: 1,
            dtype: fb::DType(dtype),
            cache: fb::CacheControl(cache),
            ..Default::default()
        },
    );
    let msg = fb::Message::create(
        &mut fbb,
        &fb::MessageArgs {
            body_type: fb::Body::Request,
            body: Some(req.as_union_value()),
        },
    );
    fbb.finish(msg, None);
    fbb.finished_data().to_vec()
}

#[test]
fn request_round_trip_f32_all_fields() {
    let input = [1.0f32, -2.5, 3.25, f32::MAX, f32::MIN_POSITIVE, 0.0];
    let mut enc = Encoder::new();
    for cache in [
        CacheControl::Use,
        CacheControl::Bypass,
        CacheControl::Refresh,
    ] {
        let r = RequestSpec {
            target: "ens/ranker",
            version: Some(7),
            rows: 2,
            cols: 3,
            input: Input::F32(&input),
            deadline_us: Some(1500),
            domain: Some("checkout"),
            cache,
            policy: crate::wire::PolicyOverride::Default,
        };
        let mut out = vec![0xAA]; // appends, never overwrites
        enc.request(u64::MAX - 1, &r, &mut out);
        assert_eq!(out[0], 0xAA);
        let v = decode_request(body(&out[1..])).unwrap();
        assert_eq!(v.id, u64::MAX - 1);
        assert_eq!(v.target, "ens/ranker");
        assert_eq!(v.version, Some(7));
        assert_eq!((v.rows, v.cols, v.dtype), (2, 3, DType::F32));
        assert_eq!(v.deadline_us, Some(1500));
        assert_eq!(v.domain, Some("checkout"));
        assert_eq!(v.cache, cache);
        assert_eq!(v.input, bytemuck::cast_slice::<f32, u8>(&input));
        let mut back = [0f32; 6];
        v.read_f32_into(&mut back);
        assert_eq!(back, input);
    }
}

#[test]
fn request_round_trip_f16_optional_absent() {
    let vals = [0.5f32, -1.0, 65504.0, 0.0];
    let bits: Vec<u16> = vals
        .iter()
        .map(|&x| half::f16::from_f32(x).to_bits())
        .collect();
    let frame = encode_request(3, &spec(Input::F16(&bits), 1, 4));
    let v = decode_request(body(&frame)).unwrap();
    assert_eq!(v.id, 3);
    assert_eq!(v.version, None);
    assert_eq!(v.deadline_us, None);
    assert_eq!(v.domain, None);
    assert_eq!(v.cache, CacheControl::Use);
    assert_eq!(v.dtype, DType::F16);
    assert_eq!(v.input.len(), 8);
    let mut back = [0f32; 4];
    v.read_f32_into(&mut back);
    assert_eq!(back, vals);
}

#[test]
fn decode_reads_unaligned_buffers() {
    let input = [1.0f32, 2.0, 3.0];
    let frame = encode_request(9, &spec(Input::F32(&input), 1, 3));
    for shift in 1..8 {
        let mut buf = vec![0u8; shift];
        buf.extend_from_slice(body(&frame));
        let v = decode_request(&buf[shift..]).unwrap();
        let mut back = [0f32; 3];
        v.read_f32_into(&mut back);
        assert_eq!(back, input);
    }
}

#[test]
fn response_round_trip_every_status() {
    let mut enc = Encoder::new();
    let mut out = Vec::new();
    for (i, status) in Status::ALL.into_iter().enumerate() {
        out.clear();
        let ok = status == Status::Ok;
        let output = [0.25f32, 0.75, -1.0, 1e-30];
        let runs = [
            RunInfo {
                model: "a",
                version: 1,
                flops: 1 << 40,
            },
            RunInfo {
                model: "b",
                version: 2,
                flops: 3,
            },
        ];
        let h = ResponseHeader {
            id: i as u64,
            status,
            message: if ok { "" } else { status.label() },
            rows: if ok { 2 } else { 0 },
            cols: if ok { 2 } else { 0 },
            timings: Timings {
                queue_us: 1,
                compute_us: 2,
                total_us: 4,
            },
            cached: i % 2 == 0,
            partial: i % 3 == 0,
            ticket: 0,
        };
        enc.response(
            &h,
            if ok { &runs } else { &[] },
            if ok { &output } else { &[] },
            &mut out,
        );
        let v = decode_response(body(&out)).unwrap();
        assert_eq!(v.id, i as u64);
        assert_eq!(v.status, status);
        assert_eq!(v.message, h.message);
        assert_eq!((v.rows, v.cols), (h.rows, h.cols));
        assert_eq!(v.timings, h.timings);
        assert_eq!((v.cached, v.partial), (h.cached, h.partial));
        if ok {
            assert_eq!(v.output_f32(), output);
            assert_eq!(v.runs, vec![("a", 1, 1 << 40), ("b", 2, 3)]);
        } else {
            assert!(v.output.is_empty());
            assert!(v.runs.is_empty());
        }
    }
}

#[test]
fn status_wire_values() {
    for s in Status::ALL {
        assert_eq!(Status::from_wire(s as u8), Some(s));
        assert!(fb::Status(s as u8).variant_name().is_some());
    }
    assert_eq!(Status::from_wire(6), None);
}

#[test]
fn policy_ticket_and_feedback_round_trip() {
    let x = [0.5f32; 4];
    for policy in PolicyOverride::ALL {
        let f = encode_request(
            3,
            &RequestSpec {
                policy,
                ..spec(Input::F32(&x), 1, 4)
            },
        );
        assert_eq!(decode_request(body(&f)).unwrap().policy, policy);
        match decode_incoming(body(&f)).unwrap() {
            Incoming::Request(r) => assert_eq!((r.id, r.policy), (3, policy)),
            other => panic!("{other:?}"),
        }
    }
    let fb = FeedbackView {
        id: 9,
        ticket: (5 << 48) | 77,
        label: 4,
    };
    let mut out = Vec::new();
    Encoder::new().feedback(&fb, &mut out);
    match decode_incoming(body(&out)).unwrap() {
        Incoming::Feedback(got) => assert_eq!(got, fb),
        other => panic!("{other:?}"),
    }
    // Feedback is not a request, nor a response.
    assert_eq!(
        decode_request(body(&out)).unwrap_err(),
        DecodeError::WrongKind
    );
    assert!(decode_response(body(&out)).is_err());
    let h = ResponseHeader {
        id: 1,
        status: Status::Ok,
        message: "",
        rows: 0,
        cols: 0,
        timings: Timings::default(),
        cached: false,
        partial: false,
        ticket: u64::MAX - 3,
    };
    let mut r = Vec::new();
    Encoder::new().response(&h, &[], &[], &mut r);
    assert_eq!(decode_response(body(&r)).unwrap().ticket, u64::MAX - 3);
    // A response is not something a client sends.
    assert_eq!(
        decode_incoming(body(&r)).unwrap_err(),
        DecodeError::WrongKind
    );
}

#[test]
fn unknown_policy_value_is_malformed() {
    let x = [0.5f32; 4];
    let with = |policy| {
        encode_request(
            3,
            &RequestSpec {
                policy,
                ..spec(Input::F32(&x), 1, 4)
            },
        )
    };
    // Two encodings that differ only in the policy byte locate it.
    let (mut g, h) = (with(PolicyOverride::Bandit), with(PolicyOverride::Cascade));
    assert_eq!(g.len(), h.len());
    let at = (0..g.len()).find(|&i| g[i] != h[i]).unwrap();
    g[at] = 200;
    assert_eq!(
        decode_request(body(&g)).unwrap_err(),
        DecodeError::Unknown("policy")
    );
    // The body verified: its id is kept for the answer.
    assert_eq!(
        decode_incoming_with_id(body(&g)).unwrap_err(),
        Refused {
            id: 3,
            error: DecodeError::Unknown("policy")
        }
    );
}

#[test]
fn refusals_keep_the_id_only_of_verified_requests() {
    let x = [0f32; 8];
    let frame = encode_request(77, &spec(Input::F32(&x[..5]), 2, 3));
    assert_eq!(
        decode_incoming_with_id(body(&frame)).unwrap_err(),
        Refused {
            id: 77,
            error: DecodeError::Shape
        }
    );
    let four = [0u8; 4];
    assert_eq!(
        decode_incoming_with_id(&raw_request(None, Some(&four), 0, 0))
            .unwrap_err()
            .error,
        DecodeError::Missing("target")
    );
    let mut bad = body(&frame).to_vec();
    bad[0] = 0xff;
    assert_eq!(
        decode_incoming_with_id(&bad).unwrap_err(),
        Refused {
            id: 0,
            error: DecodeError::Verify
        }
    );
}

/// The worked example of docs/PROTOCOL.md: a request with the default
/// policy encodes exactly as before the field existed (defaults are omitted).
#[test]
fn default_policy_keeps_the_documented_bytes() {
    let hex = "60000000 0c000000 08000e00 07000800 08000000 00000001 18000000 00001200\
               1c001400 04000000 08000c00 00001000 12000000 24000000 01000000 02000000\
               0c000000 01000000 00000000 08000000 0000803f 00000040 04000000 64656d6f\
               00000000";
    let digits: Vec<u8> = hex.bytes().filter(u8::is_ascii_hexdigit).collect();
    let want: Vec<u8> = digits
        .chunks(2)
        .map(|p| u8::from_str_radix(std::str::from_utf8(p).unwrap(), 16).unwrap())
        .collect();
    let x = [1.0f32, 2.0];
    let got = encode_request(
        1,
        &RequestSpec {
            target: "demo",
            ..spec(Input::F32(&x), 1, 2)
        },
    );
    assert_eq!(got, want);
}

#[test]
fn response_frame_len_max_bounds_what_the_encoder_writes() {
    let mut rng = StdRng::seed_from_u64(5);
    let names = ["a", "model_with_a_longer_name", &"n".repeat(300)];
    let mut enc = Encoder::new();
    for _ in 0..500 {
        let values = rng.random_range(0..3000usize);
        let out = vec![1.5f32; values];
        let msg = "m".repeat(rng.random_range(0..1100usize));
        let nruns = rng.random_range(0..17usize);
        let runs: Vec<RunInfo<'_>> = (0..nruns)
            .map(|i| RunInfo {
                model: names[i % 3],
                version: i as u32,
                flops: u64::MAX - i as u64,
            })
            .collect();
        let h = ResponseHeader {
            id: u64::MAX,
            status: if values > 0 {
                Status::Ok
            } else {
                Status::Internal
            },
            message: &msg,
            rows: values as u32,
            cols: (values > 0) as u32,
            timings: Timings {
                queue_us: u32::MAX,
                compute_us: u32::MAX,
                total_us: u32::MAX,
            },
            cached: true,
            partial: true,
            ticket: u64::MAX,
        };
        let mut frame = Vec::new();
        enc.response(&h, &runs, &out, &mut frame);
        let bound = response_frame_len_max(msg.len(), values, runs.iter().map(|r| r.model.len()));
        assert!(frame.len() <= bound, "{} > {bound}", frame.len());
        // Not wildly loose either.
        assert!(
            bound - frame.len() <= 512 + 64 * nruns,
            "{} vs {bound}",
            frame.len()
        );
    }
}
