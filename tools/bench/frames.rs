//! Pre-encoded request frames and the generator's thread split.
//!
//! A request of a given (target, input row) is the same bytes every time
//! but for its id, so the generator encodes each one once, before the run,
//! and per request only copies the frame and patches the 8 id bytes: no
//! flatbuffers builder, no f32 → f16 conversion on the sending path. The id
//! is a `u64` scalar field of the `Request` table; its position inside a
//! frame is found by encoding the same request with two different non-zero
//! ids and diffing (a non-default scalar is always stored, at a position
//! that does not depend on its value).

use beast::wire::{Encoder, RequestSpec};

/// Pre-encode at most this many bytes of frames in all (beyond: encode per
/// request, as before).
pub const PREBUILT_BYTES_MAX: usize = 64 << 20;

/// Frames of one target: frame `row` starts at `offsets[row]`.
pub struct TargetFrames {
    bytes: Vec<u8>,
    offsets: Vec<usize>,
    /// Where the id's 8 little-endian bytes sit inside each frame.
    id_at: usize,
}

/// Where the ids of two encodings of one request differ: the start of the
/// 8 id bytes, or `None` if the frames differ elsewhere (or in length).
fn find_id(a: &[u8], b: &[u8]) -> Option<usize> {
    if a.len() != b.len() {
        return None;
    }
    let diff: Vec<usize> = (0..a.len()).filter(|&i| a[i] != b[i]).collect();
    let (&first, &last) = (diff.first()?, diff.last()?);
    (last - first < 8 && first + 8 <= a.len()).then_some(first)
}

impl TargetFrames {
    /// Encode `rows` requests, `spec_of(row)` each. `None` if the id's
    /// position cannot be found or differs between rows.
    pub fn build(
        rows: usize,
        mut spec_of: impl FnMut(usize, &mut dyn FnMut(&RequestSpec<'_>)),
    ) -> Option<TargetFrames> {
        let mut enc = Encoder::new();
        let (mut bytes, mut offsets, mut id_at) = (Vec::new(), Vec::with_capacity(rows), None);
        let (mut a, mut b) = (Vec::new(), Vec::new());
        let mut ok = true;
        for row in 0..rows {
            spec_of(row, &mut |spec| {
                a.clear();
                b.clear();
                // Both ids have all 8 bytes different, so the diff spans them all.
                enc.request(0x0101_0101_0101_0101, spec, &mut a);
                enc.request(0x0202_0202_0202_0202, spec, &mut b);
            });
            match find_id(&a, &b) {
                Some(at) if id_at.is_none_or(|x| x == at) && a[at..at + 8] == [1; 8] => {
                    id_at = Some(at)
                }
                _ => ok = false,
            }
            if !ok {
                return None;
            }
            offsets.push(bytes.len());
            bytes.extend_from_slice(&a);
        }
        Some(TargetFrames {
            bytes,
            offsets,
            id_at: id_at?,
        })
    }

    /// Append frame `row` (modulo the rows built) with `id` to `out`.
    #[inline]
    pub fn push(&self, row: usize, id: u64, out: &mut Vec<u8>) {
        let row = row % self.offsets.len();
        let start = self.offsets[row];
        let end = self
            .offsets
            .get(row + 1)
            .copied()
            .unwrap_or(self.bytes.len());
        let at = out.len() + self.id_at;
        out.extend_from_slice(&self.bytes[start..end]);
        out[at..at + 8].copy_from_slice(&id.to_le_bytes());
    }
}

/// The generator threads: `threads` executors (default: one per CPU in
/// `cpus`), thread `t` pinned to `cpus[t % len]` (unpinned when `cpus` is
/// empty). Errors name the flag.
pub fn generator_threads(cpus: &str, threads: Option<usize>) -> Result<Vec<Option<usize>>, String> {
    let list: Vec<usize> = if cpus.trim().is_empty() {
        Vec::new()
    } else {
        cpus.split(',')
            .map(|s| {
                s.trim().parse::<usize>().map_err(|_| {
                    format!("--cpus: '{s}' is not a CPU number (expected e.g. 1 or 1,3)")
                })
            })
            .collect::<Result<_, _>>()?
    };
    let n = match threads {
        Some(0) => return Err("--threads must be at least 1".into()),
        Some(n) => n,
        None => list.len().max(1),
    };
    Ok((0..n)
        .map(|t| (!list.is_empty()).then(|| list[t % list.len()]))
        .collect())
}

/// The connections thread `t` of `nthreads` drives: every `nthreads`-th.
pub fn connections_of(
    t: usize,
    nthreads: usize,
    connections: usize,
) -> impl Iterator<Item = usize> {
    (0..connections).filter(move |c| c % nthreads == t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use beast::wire::{
        check_frame, decode_request, CacheControl, FrameCheck, Input, PolicyOverride,
    };

    fn spec<'a>(x: &'a [f32], name: &'a str) -> RequestSpec<'a> {
        RequestSpec {
            target: name,
            version: None,
            rows: 1,
            cols: x.len() as u32,
            input: Input::F32(x),
            deadline_us: Some(5000),
            domain: None,
            cache: CacheControl::Use,
            policy: PolicyOverride::Default,
        }
    }

    #[test]
    fn a_patched_frame_is_the_request_encoded_with_that_id() {
        let rows: Vec<Vec<f32>> = (0..5)
            .map(|r| (0..7).map(|i| (r * 10 + i) as f32).collect())
            .collect();
        let f = TargetFrames::build(rows.len(), |r, k| k(&spec(&rows[r], "bench_a"))).unwrap();
        let mut enc = Encoder::new();
        for (row, id) in [
            (0usize, 1u64),
            (3, 77),
            (4, u64::MAX),
            (7, 0x1234_5678_9abc),
        ] {
            let mut want = Vec::new();
            enc.request(id, &spec(&rows[row % 5], "bench_a"), &mut want);
            let mut got = vec![9u8; 3]; // appended after what is there
            f.push(row, id, &mut got);
            assert_eq!(&got[3..], &want[..], "row {row} id {id}");
            let FrameCheck::Complete { body_len } = check_frame(&got[3..], 1 << 20) else {
                panic!("not a frame")
            };
            let v = decode_request(&got[3 + 4..3 + 4 + body_len]).unwrap();
            assert_eq!(v.id, id);
            assert_eq!(v.target, "bench_a");
        }
    }

    #[test]
    fn the_id_is_found_only_where_the_frames_differ_in_8_bytes() {
        assert_eq!(
            find_id(
                &[0, 1, 1, 1, 1, 1, 1, 1, 1, 0],
                &[0, 2, 2, 2, 2, 2, 2, 2, 2, 0]
            ),
            Some(1)
        );
        assert_eq!(
            find_id(&[1, 0, 0, 0, 0, 0, 0, 0, 1], &[2, 0, 0, 0, 0, 0, 0, 0, 2]),
            None
        );
        assert_eq!(find_id(&[1, 2], &[1, 2, 3]), None);
        assert_eq!(find_id(&[1, 2], &[1, 2]), None);
    }

    #[test]
    fn threads_split_over_the_cpus_and_connections_over_the_threads() {
        assert_eq!(generator_threads("", None).unwrap(), vec![None]);
        assert_eq!(generator_threads("1", None).unwrap(), vec![Some(1)]);
        assert_eq!(
            generator_threads("1,3", None).unwrap(),
            vec![Some(1), Some(3)]
        );
        assert_eq!(
            generator_threads("1,3", Some(3)).unwrap(),
            vec![Some(1), Some(3), Some(1)]
        );
        assert_eq!(generator_threads("", Some(2)).unwrap(), vec![None, None]);
        assert!(generator_threads("1", Some(0))
            .unwrap_err()
            .contains("--threads"));
        assert!(generator_threads("x", None).unwrap_err().contains("--cpus"));
        // Every connection goes to exactly one thread, and the shares differ by at most one.
        for (n, conns) in [(1, 5), (3, 50), (4, 4), (7, 3)] {
            let mut seen = vec![0; conns];
            let mut sizes = Vec::new();
            for t in 0..n {
                let mine: Vec<usize> = connections_of(t, n, conns).collect();
                sizes.push(mine.len());
                for c in mine {
                    seen[c] += 1;
                }
            }
            assert!(seen.iter().all(|&s| s == 1), "{n} threads, {conns} conns");
            assert!(sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1);
        }
    }
}
