//! Reading `.npy` files (NumPy's format v1/v2/v3) as f32 matrices, for the
//! command-line tools. Supports little-endian f2/f4/f8, C order, 1-D (one
//! row) or 2-D shapes.

/// Parse a whole `.npy` file into (rows, cols, row-major data).
pub fn read_f32_matrix(bytes: &[u8]) -> Result<(usize, usize, Vec<f32>), String> {
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err("not an .npy file (bad magic)".into());
    }
    let major = bytes[6];
    let (hlen, hstart) = match major {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 => {
            if bytes.len() < 12 {
                return Err("truncated header".into());
            }
            (
                u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
                12,
            )
        }
        v => return Err(format!("unsupported .npy version {v}")),
    };
    let header = bytes
        .get(hstart..hstart + hlen)
        .and_then(|h| std::str::from_utf8(h).ok())
        .ok_or("truncated or non-UTF-8 header")?;
    let field = |name: &str| -> Result<&str, String> {
        let key = format!("'{name}':");
        let i = header.find(&key).ok_or(format!("header has no {name}"))?;
        Ok(header[i + key.len()..].trim_start())
    };
    let descr = field("descr")?;
    let descr = descr.trim_start_matches('\'');
    let dtype = &descr[..descr.find('\'').ok_or("bad descr")?];
    if field("fortran_order")?.starts_with("True") {
        return Err("fortran_order arrays are not supported (save with C order)".into());
    }
    let shape = field("shape")?;
    let shape = &shape[1..shape.find(')').ok_or("bad shape")?];
    let dims: Vec<usize> = shape
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().map_err(|_| format!("bad shape entry '{s}'")))
        .collect::<Result<_, _>>()?;
    let (rows, cols) = match dims.as_slice() {
        [n] => (1, *n),
        [r, c] => (*r, *c),
        _ => return Err(format!("shape {dims:?}: expected 1-D or 2-D")),
    };
    let data = &bytes[hstart + hlen..];
    let n = rows * cols;
    let out: Vec<f32> = match dtype {
        "<f4" => chunks(data, 4, n)?
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        "<f8" => chunks(data, 8, n)?
            .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32)
            .collect(),
        "<f2" => chunks(data, 2, n)?
            .map(|c| half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
            .collect(),
        d => return Err(format!("dtype {d} not supported (use <f2, <f4 or <f8)")),
    };
    Ok((rows, cols, out))
}

fn chunks(data: &[u8], size: usize, n: usize) -> Result<std::slice::ChunksExact<'_, u8>, String> {
    if data.len() < size * n {
        return Err(format!(
            "data has {} bytes, shape needs {}",
            data.len(),
            size * n
        ));
    }
    Ok(data[..size * n].chunks_exact(size))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn npy(descr: &str, shape: &str, data: &[u8]) -> Vec<u8> {
        let mut h = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
        while (10 + h.len() + 1) % 64 != 0 {
            h.push(' ');
        }
        h.push('\n');
        let mut v = b"\x93NUMPY\x01\x00".to_vec();
        v.extend_from_slice(&(h.len() as u16).to_le_bytes());
        v.extend_from_slice(h.as_bytes());
        v.extend_from_slice(data);
        v
    }

    #[test]
    fn reads_f4_and_f8() {
        let d: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        assert_eq!(
            read_f32_matrix(&npy("<f4", "(2, 3)", &d)).unwrap(),
            (2, 3, vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
        );
        let d: Vec<u8> = [0.5f64, -1.0]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        assert_eq!(
            read_f32_matrix(&npy("<f8", "(2,)", &d)).unwrap(),
            (1, 2, vec![0.5, -1.0])
        );
    }

    #[test]
    fn refuses_bad_files() {
        assert!(read_f32_matrix(b"hello world").is_err());
        assert!(read_f32_matrix(&npy("<i4", "(1,)", &[0; 4]))
            .unwrap_err()
            .contains("dtype"));
        assert!(read_f32_matrix(&npy("<f4", "(2, 3)", &[0; 8]))
            .unwrap_err()
            .contains("bytes"));
    }
}
