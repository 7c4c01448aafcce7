//! The protobuf decoder on hand-encoded messages: both encodings of
//! repeated fields, raw_data, and the errors for truncated or inconsistent input.

use super::*;

fn varint(mut v: u64, out: &mut Vec<u8>) {
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

fn key(field: u32, wire: u8, out: &mut Vec<u8>) {
    varint(((field as u64) << 3) | wire as u64, out);
}

fn bytes_field(field: u32, b: &[u8], out: &mut Vec<u8>) {
    key(field, 2, out);
    varint(b.len() as u64, out);
    out.extend_from_slice(b);
}

fn int_field(field: u32, v: u64, out: &mut Vec<u8>) {
    key(field, 0, out);
    varint(v, out);
}

/// A model whose graph holds one initializer `t` (the given tensor bytes).
fn model_with_tensor(tensor: &[u8]) -> Vec<u8> {
    let mut g = Vec::new();
    bytes_field(5, tensor, &mut g);
    let mut m = Vec::new();
    int_field(1, 8, &mut m);
    bytes_field(7, &g, &mut m);
    m
}

fn tensor(dims: &[u64], data: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut t = Vec::new();
    for &d in dims {
        int_field(1, d, &mut t); // unpacked dims
    }
    int_field(2, DT_FLOAT as u64, &mut t);
    bytes_field(8, b"t", &mut t);
    data(&mut t);
    t
}

#[test]
fn float_data_packed_unpacked_and_raw_agree() {
    let vals = [1.5f32, -2.0, 0.25];
    let le: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
    let packed = tensor(&[3], |t| bytes_field(4, &le, t));
    let unpacked = tensor(&[3], |t| {
        for v in vals {
            key(4, 5, t);
            t.extend_from_slice(&v.to_le_bytes());
        }
    });
    let raw = tensor(&[3], |t| bytes_field(9, &le, t));
    for t in [packed, unpacked, raw] {
        let m = decode_model(&model_with_tensor(&t)).unwrap();
        assert_eq!(m.ir_version, 8);
        let init = &m.graph.initializers[0];
        assert_eq!(
            (init.name.as_str(), init.dims.as_slice()),
            ("t", &[3i64][..])
        );
        assert_eq!(init.values, vals);
    }
}

#[test]
fn inconsistent_or_truncated_input_is_an_error_not_a_panic() {
    // raw_data of 8 bytes for 3 floats.
    let t = tensor(&[3], |t| bytes_field(9, &[0; 8], t));
    let e = decode_model(&model_with_tensor(&t)).unwrap_err();
    assert!(
        e.contains("raw_data holds 8 bytes") && e.contains("need 12"),
        "{e}"
    );
    // Two values for dims [3].
    let t = tensor(&[3], |t| bytes_field(4, &[0; 8], t));
    let e = decode_model(&model_with_tensor(&t)).unwrap_err();
    assert!(e.contains("holds 2 values"), "{e}");
    // Every prefix of a good model decodes or errs, never panics.
    let good = model_with_tensor(&tensor(&[2, 2], |t| bytes_field(9, &[0; 16], t)));
    for n in 0..good.len() {
        let _ = decode_model(&good[..n]);
    }
    assert!(decode_model(&good).is_ok());
    // A length past the end.
    let e = decode_model(&[0x3a, 0xff, 0x01]).unwrap_err();
    assert!(e.contains("runs past the end"), "{e}");
    // No graph at all.
    assert!(decode_model(&[0x08, 0x07])
        .unwrap_err()
        .contains("no graph"));
    // A huge element count is refused before anything is allocated.
    let t = tensor(&[1 << 20, 1 << 20], |_| {});
    let e = decode_model(&model_with_tensor(&t)).unwrap_err();
    assert!(e.contains("elements, more than"), "{e}");
}

#[test]
fn external_data_is_flagged() {
    let t = tensor(&[3], |t| int_field(14, 1, t));
    let m = decode_model(&model_with_tensor(&t)).unwrap();
    assert!(m.graph.initializers[0].external);
    assert!(m.graph.initializers[0].values.is_empty());
}
