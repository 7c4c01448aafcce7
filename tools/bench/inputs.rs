//! What the generator sends: input rows (seeded random, or read from a
//! CSV/NPY file) and recorded traces (`offset_us,target,row_index`).
//!
//! A "row" here is one request's input: `--rows` consecutive data rows of a
//! target's width. Row `i` of the random pool is a pure function of
//! `(seed, width, i)`, so a trace that names row 17 means the same numbers
//! in every run with the same seed.

use super::dist::Rng;
use std::io::Write;
use std::path::Path;

/// Materialise random pools up to this many floats (64 MiB); beyond that,
/// rows are generated on demand into a scratch buffer (a few hundred ns).
const POOL_FLOATS_MAX: usize = 16 << 20;

/// Input rows for one width.
pub enum Pool {
    /// `n` request-inputs of `len` floats each, stored back to back.
    Stored {
        data: Vec<f32>,
        len: usize,
        n: usize,
    },
    /// Generated on demand: `n` distinct inputs of `len` floats.
    Generated { seed: u64, len: usize, n: usize },
}

impl Pool {
    pub fn random(seed: u64, distinct: usize, len: usize) -> Pool {
        if distinct.saturating_mul(len) <= POOL_FLOATS_MAX {
            let mut data = vec![0f32; distinct * len];
            for (i, chunk) in data.chunks_mut(len).enumerate() {
                fill_random(seed, i, chunk);
            }
            Pool::Stored {
                data,
                len,
                n: distinct,
            }
        } else {
            Pool::Generated {
                seed,
                len,
                n: distinct,
            }
        }
    }
    pub fn len(&self) -> usize {
        match self {
            Pool::Stored { n, .. } | Pool::Generated { n, .. } => *n,
        }
    }
    /// Input `i` (modulo the pool size); `scratch` is used when generated.
    pub fn get<'a>(&'a self, i: usize, scratch: &'a mut Vec<f32>) -> &'a [f32] {
        match self {
            Pool::Stored { data, len, n } => {
                let p = (i % n) * len;
                &data[p..p + len]
            }
            Pool::Generated { seed, len, n } => {
                scratch.resize(*len, 0.0);
                fill_random(*seed, i % n, scratch);
                scratch
            }
        }
    }
}

fn fill_random(seed: u64, i: usize, out: &mut [f32]) {
    let mut rng = Rng::new(seed ^ (i as u64).wrapping_mul(0xD6E8_FEB8_6659_FD93));
    for x in out {
        *x = (rng.next_f64() * 2.0 - 1.0) as f32;
    }
}

/// Rows of a CSV (an optional non-numeric header row is skipped, as
/// `beast predict` does) or a 2-D NPY file: (rows, cols, data).
pub fn read_rows(path: &Path, drop_last_column: bool) -> Result<(usize, usize, Vec<f32>), String> {
    let name = path.display();
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    let (rows, cols, data) = if ext.eq_ignore_ascii_case("npy") {
        let bytes = std::fs::read(path).map_err(|e| format!("--input-file {name}: {e}"))?;
        beast::client::npy::read_f32_matrix(&bytes)
            .map_err(|e| format!("--input-file {name}: {e}"))?
    } else {
        let text =
            std::fs::read_to_string(path).map_err(|e| format!("--input-file {name}: {e}"))?;
        parse_csv(&text).map_err(|e| format!("--input-file {name}: {e}"))?
    };
    if rows == 0 || cols == 0 {
        return Err(format!("--input-file {name}: no rows"));
    }
    if !drop_last_column {
        return Ok((rows, cols, data));
    }
    if cols < 2 {
        return Err(format!(
            "--input-file {name}: --drop-last-column needs at least 2 columns, found {cols}"
        ));
    }
    let kept: Vec<f32> = data
        .chunks(cols)
        .flat_map(|r| r[..cols - 1].iter().copied())
        .collect();
    Ok((rows, cols - 1, kept))
}

fn parse_csv(text: &str) -> Result<(usize, usize, Vec<f32>), String> {
    let (mut data, mut cols, mut rows) = (Vec::new(), 0, 0);
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let row: Result<Vec<f32>, String> = line
            .split(',')
            .map(str::trim)
            .map(|t| {
                t.parse::<f32>()
                    .map_err(|_| format!("line {}: '{t}' is not a number", i + 1))
            })
            .collect();
        match row {
            Ok(row) => {
                if cols == 0 {
                    cols = row.len();
                } else if row.len() != cols {
                    return Err(format!(
                        "line {}: {} values, expected {cols}",
                        i + 1,
                        row.len()
                    ));
                }
                data.extend(row);
                rows += 1;
            }
            Err(_) if rows == 0 && i == 0 => {} // header row
            Err(e) => return Err(e),
        }
    }
    Ok((rows, cols, data))
}

/// One request of a trace: when (µs from the run's start, warm-up
/// included), which target (by name), which input row (index into the pool).
#[derive(Clone, Debug, PartialEq)]
pub struct TraceEntry {
    pub offset_us: u64,
    pub target: String,
    pub row: usize,
}

pub const TRACE_HEADER: &str = "offset_us,target,row_index";

/// Read a trace CSV: header `offset_us,target,row_index` (optional), then
/// one request per line. Lines need not be sorted; they are sorted here.
pub fn read_trace(path: &Path) -> Result<Vec<TraceEntry>, String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("--trace {}: {e}", path.display()))?;
    parse_trace(&text).map_err(|e| format!("--trace {}: {e}", path.display()))
}

pub fn parse_trace(text: &str) -> Result<Vec<TraceEntry>, String> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || (out.is_empty() && line == TRACE_HEADER) {
            continue;
        }
        let f: Vec<&str> = line.split(',').map(str::trim).collect();
        if f.len() != 3 {
            return Err(format!(
                "line {}: expected offset_us,target,row_index, got '{line}'",
                i + 1
            ));
        }
        let offset_us = f[0]
            .parse::<u64>()
            .map_err(|_| format!("line {}: offset_us '{}' is not a whole number", i + 1, f[0]))?;
        let row = f[2]
            .parse::<usize>()
            .map_err(|_| format!("line {}: row_index '{}' is not a whole number", i + 1, f[2]))?;
        if f[1].is_empty() {
            return Err(format!("line {}: empty target", i + 1));
        }
        out.push(TraceEntry {
            offset_us,
            target: f[1].to_string(),
            row,
        });
    }
    if out.is_empty() {
        return Err("no requests in the trace".into());
    }
    out.sort_by_key(|e| e.offset_us);
    Ok(out)
}

pub fn write_trace(w: &mut dyn Write, entries: &[TraceEntry]) -> std::io::Result<()> {
    writeln!(w, "{TRACE_HEADER}")?;
    for e in entries {
        writeln!(w, "{},{},{}", e.offset_us, e.target, e.row)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_csv_round_trip() {
        let entries = vec![
            TraceEntry {
                offset_us: 0,
                target: "bench_ens".into(),
                row: 3,
            },
            TraceEntry {
                offset_us: 250,
                target: "bench_a".into(),
                row: 0,
            },
            TraceEntry {
                offset_us: 1_000_000,
                target: "bench_ens".into(),
                row: 99_999,
            },
        ];
        let mut buf = Vec::new();
        write_trace(&mut buf, &entries).unwrap();
        let text = String::from_utf8(buf).unwrap();
        assert!(text.starts_with("offset_us,target,row_index\n0,bench_ens,3\n"));
        assert_eq!(parse_trace(&text).unwrap(), entries);
        // Unsorted input is sorted; comments and blank lines are skipped.
        let t = parse_trace("# x\n500,a,1\n\n100,b,2\n").unwrap();
        assert_eq!(t[0].offset_us, 100);
        for bad in ["", "1,a", "x,a,1", "1,a,-2", "1,,2", "1,a,2,3"] {
            assert!(parse_trace(bad).is_err(), "'{bad}' should fail");
        }
    }

    #[test]
    fn csv_rows_header_and_drop_last() {
        let (r, c, d) = parse_csv("f1,f2,label\n1,2,0\n3,4,1\n").unwrap();
        assert_eq!((r, c), (2, 3));
        assert_eq!(d, vec![1., 2., 0., 3., 4., 1.]);
        assert!(parse_csv("1,2\n3\n").is_err());
        let dir = std::env::temp_dir().join(format!("beast-bench-csv-{}", std::process::id()));
        std::fs::write(&dir, "a,b,label\n1,2,0\n3,4,1\n").unwrap();
        let (r, c, d) = read_rows(&dir, true).unwrap();
        std::fs::remove_file(&dir).unwrap();
        assert_eq!((r, c, d), (2, 2, vec![1., 2., 3., 4.]));
    }

    #[test]
    fn random_pool_is_deterministic_either_way() {
        let stored = Pool::random(5, 10, 4);
        let generated = Pool::Generated {
            seed: 5,
            len: 4,
            n: 10,
        };
        let (mut s1, mut s2) = (Vec::new(), Vec::new());
        for i in [0, 3, 9, 13] {
            assert_eq!(
                stored.get(i, &mut s1).to_vec(),
                generated.get(i, &mut s2).to_vec()
            );
        }
        assert!(stored
            .get(1, &mut s1)
            .iter()
            .all(|x| (-1.0..1.0).contains(x)));
    }
}
