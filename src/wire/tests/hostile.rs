//! Decode of hostile bytes: wrong kinds, bad shapes, missing and unknown
//! fields, every truncation, random bytes. A child of `wire/tests.rs`, whose
//! helpers (`spec`, `encode_request`, `body`, `raw_request`) it uses.

use super::*;

#[test]
fn decode_request_rejects_response_and_vice_versa() {
    let mut out = Vec::new();
    let h = ResponseHeader {
        id: 1,
        status: Status::NotFound,
        message: "no such model",
        rows: 0,
        cols: 0,
        timings: Timings::default(),
        cached: false,
        partial: false,
        ticket: 0,
    };
    Encoder::new().response(&h, &[], &[], &mut out);
    assert_eq!(
        decode_request(body(&out)).unwrap_err(),
        DecodeError::WrongKind
    );
    let req = encode_request(1, &spec(Input::F32(&[1.0]), 1, 1));
    assert_eq!(
        decode_response(body(&req)).unwrap_err(),
        DecodeError::WrongKind
    );
}

#[test]
fn decode_request_rejects_bad_shapes() {
    let x = [0f32; 8];
    for (rows, cols, n) in [
        (2, 3, 5),
        (2, 3, 7),
        (0, 3, 0),
        (3, 0, 0),
        (0, 0, 0),
        (u32::MAX, u32::MAX, 6),
    ] {
        let frame = encode_request(1, &spec(Input::F32(&x[..n]), rows, cols));
        assert_eq!(
            decode_request(body(&frame)).unwrap_err(),
            DecodeError::Shape,
            "{rows}x{cols} n={n}"
        );
    }
    // F16 data declared with the F32 element count: half the bytes.
    let frame = encode_request(1, &spec(Input::F16(&[0u16; 6]), 2, 6));
    assert_eq!(
        decode_request(body(&frame)).unwrap_err(),
        DecodeError::Shape
    );
}

#[test]
fn decode_request_rejects_missing_and_unknown() {
    let four = [0u8; 4];
    assert!(decode_request(&raw_request(Some("m"), Some(&four), 0, 0)).is_ok());
    assert_eq!(
        decode_request(&raw_request(None, Some(&four), 0, 0)).unwrap_err(),
        DecodeError::Missing("target")
    );
    assert_eq!(
        decode_request(&raw_request(Some("m"), None, 0, 0)).unwrap_err(),
        DecodeError::Missing("input")
    );
    assert_eq!(
        decode_request(&raw_request(Some("m"), Some(&four), 2, 0)).unwrap_err(),
        DecodeError::Unknown("dtype")
    );
    assert_eq!(
        decode_request(&raw_request(Some("m"), Some(&four), 0, 3)).unwrap_err(),
        DecodeError::Unknown("cache")
    );
    // A message with no body, and a body kind from the future (Feedback = 3).
    let mut fbb = flatbuffers::FlatBufferBuilder::new();
    let msg = fb::Message::create(
        &mut fbb,
        &fb::MessageArgs {
            body_type: fb::Body::NONE,
            body: None,
        },
    );
    fbb.finish(msg, None);
    assert_eq!(
        decode_request(fbb.finished_data()).unwrap_err(),
        DecodeError::WrongKind
    );
    let mut fbb = flatbuffers::FlatBufferBuilder::new();
    let req = fb::Request::create(&mut fbb, &fb::RequestArgs::default());
    let msg = fb::Message::create(
        &mut fbb,
        &fb::MessageArgs {
            body_type: fb::Body(3),
            body: Some(req.as_union_value()),
        },
    );
    fbb.finish(msg, None);
    assert_eq!(
        decode_request(fbb.finished_data()).unwrap_err(),
        DecodeError::WrongKind
    );
    assert_eq!(
        decode_response(fbb.finished_data()).unwrap_err(),
        DecodeError::WrongKind
    );
}

#[test]
fn decode_rejects_every_truncation() {
    let x = [1f32; 8];
    let req = encode_request(
        42,
        &RequestSpec {
            domain: Some("d"),
            version: Some(2),
            ..spec(Input::F32(&x), 2, 4)
        },
    );
    let req = body(&req);
    let full = decode_request(req).unwrap();
    // Cutting only the trailing alignment padding leaves a valid buffer; any
    // prefix that decodes must then decode to the same message.
    for n in 0..req.len() {
        if let Ok(v) = decode_request(&req[..n]) {
            assert!(n + 8 > req.len(), "prefix {n} of {} decoded", req.len());
            assert_eq!(format!("{v:?}"), format!("{full:?}"));
        }
    }
    let mut resp = Vec::new();
    let h = ResponseHeader {
        id: 1,
        status: Status::Ok,
        message: "",
        rows: 2,
        cols: 4,
        timings: Timings::default(),
        cached: true,
        partial: false,
        ticket: 0,
    };
    Encoder::new().response(
        &h,
        &[RunInfo {
            model: "m",
            version: 1,
            flops: 9,
        }],
        &x,
        &mut resp,
    );
    let resp = body(&resp);
    let full = decode_response(resp).unwrap();
    for n in 0..resp.len() {
        if let Ok(v) = decode_response(&resp[..n]) {
            assert!(n + 8 > resp.len(), "prefix {n} of {} decoded", resp.len());
            assert_eq!(format!("{v:?}"), format!("{full:?}"));
        }
    }
}

#[test]
fn decode_never_panics_on_random_bytes() {
    let mut rng = StdRng::seed_from_u64(0xBEA57);
    let x = [0.5f32; 4];
    let valid_req = encode_request(
        7,
        &RequestSpec {
            domain: Some("dom"),
            ..spec(Input::F32(&x), 1, 4)
        },
    );
    let mut valid_resp = Vec::new();
    let h = ResponseHeader {
        id: 7,
        status: Status::Ok,
        message: "",
        rows: 1,
        cols: 4,
        timings: Timings::default(),
        cached: false,
        partial: true,
        ticket: 0,
    };
    Encoder::new().response(
        &h,
        &[RunInfo {
            model: "m",
            version: 1,
            flops: 9,
        }],
        &x,
        &mut valid_resp,
    );
    let mut buf = Vec::new();
    for i in 0..20_000 {
        buf.clear();
        if i % 2 == 0 {
            // Pure noise, of every small length.
            let len = rng.random_range(0..256);
            buf.extend((0..len).map(|_| rng.random::<u8>()));
        } else {
            // A valid message with a few bytes flipped: reaches deep paths.
            let src = if i % 4 == 1 { &valid_req } else { &valid_resp };
            buf.extend_from_slice(body(src));
            for _ in 0..rng.random_range(1..4) {
                let at = rng.random_range(0..buf.len());
                buf[at] = rng.random();
            }
        }
        let _ = decode_request(&buf);
        let _ = decode_response(&buf);
        let _ = decode_incoming(&buf);
    }
}
