//! Length-prefixed framing: `u32` little-endian body length, then the body.

pub const FRAME_HEADER_LEN: usize = 4;

/// What the start of a receive buffer holds. "Incomplete" is a normal
/// answer, not an error: read more and ask again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameCheck {
    /// Not yet a whole frame.
    Incomplete,
    /// A whole frame: the body is `buf[4..4 + body_len]`.
    Complete { body_len: usize },
    /// The declared length exceeds the limit (or is zero): the connection
    /// cannot resynchronise and must be closed.
    Invalid { declared: u32 },
}

#[inline]
pub fn check_frame(buf: &[u8], max_frame: usize) -> FrameCheck {
    if buf.len() < FRAME_HEADER_LEN {
        return FrameCheck::Incomplete;
    }
    let declared = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]);
    let body_len = declared as usize;
    if body_len == 0 || body_len > max_frame {
        return FrameCheck::Invalid { declared };
    }
    if buf.len() < FRAME_HEADER_LEN + body_len {
        FrameCheck::Incomplete
    } else {
        FrameCheck::Complete { body_len }
    }
}

/// Default largest frame body; the server's `frame_bytes_max` overrides it.
pub const MAX_FRAME_BYTES_DEFAULT: usize = 4 << 20;

/// The stream declared a frame length of zero or over the limit. The stream
/// cannot be resynchronised: close the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameError {
    pub declared: u32,
    pub max_frame: usize,
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "invalid frame length {} (must be 1..={})",
            self.declared, self.max_frame
        )
    }
}

impl std::error::Error for FrameError {}

/// Sans-IO receive buffer: bytes go in (`feed`, or `spare` + `filled`, or
/// `read_from`), whole frame bodies come out (`next_frame`). The server's
/// connections and the client both read through it.
///
/// Memory: it starts at `capacity` bytes and grows only for a frame larger
/// than that, by doubling as that frame's bytes arrive (so a length prefix
/// alone never makes it allocate a whole maximal frame), to at most one
/// maximal frame plus its header (bounded by `max_frame`). Once nothing is
/// buffered it shrinks back to `capacity`, so an idle connection holds
/// only its initial buffer. A run of small frames costs no memmove: the
/// unframed tail moves to the front only when there is no room after it.
///
/// `feed` copies its whole slice in (see there), so the bound holds for a
/// caller that drains `next_frame` between reads, as the server does.
#[derive(Debug)]
pub struct FrameReader {
    buf: Vec<u8>,
    /// Bytes before `start` are consumed frames.
    start: usize,
    /// Bytes in `start..end` are received and not yet framed.
    end: usize,
    max_frame: usize,
    /// The size the buffer shrinks back to once empty.
    initial: usize,
}

impl FrameReader {
    pub fn new(max_frame: usize) -> Self {
        Self::with_capacity(max_frame, 64 * 1024)
    }

    pub fn with_capacity(max_frame: usize, capacity: usize) -> Self {
        let initial = capacity.max(FRAME_HEADER_LEN);
        FrameReader {
            buf: vec![0; initial],
            start: 0,
            end: 0,
            max_frame,
            initial,
        }
    }

    /// Received bytes not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.end - self.start
    }

    /// Bytes the buffer holds now (it grows to fit one whole frame).
    pub fn capacity(&self) -> usize {
        self.buf.len()
    }

    /// The next whole frame body, if one is buffered. `Ok(None)`: feed more.
    /// The body is valid until the next call that takes `&mut self`.
    pub fn next_frame(&mut self) -> Result<Option<&[u8]>, FrameError> {
        match check_frame(&self.buf[self.start..self.end], self.max_frame) {
            FrameCheck::Incomplete => Ok(None),
            FrameCheck::Invalid { declared } => Err(FrameError {
                declared,
                max_frame: self.max_frame,
            }),
            FrameCheck::Complete { body_len } => {
                let body = self.start + FRAME_HEADER_LEN;
                self.start = body + body_len;
                Ok(Some(&self.buf[body..body + body_len]))
            }
        }
    }

    /// Room to receive into: never empty, and once a frame header is
    /// buffered, never more than that frame still needs beyond what the
    /// buffer already holds (the buffer doubles toward the whole frame as
    /// its bytes arrive). Call [`filled`](Self::filled) with the count
    /// written.
    pub fn spare(&mut self) -> &mut [u8] {
        // Move the unframed tail to the front only when that is cheap (no
        // tail) or needed (no room): a run of small frames costs no memmove.
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
            // A large frame grew the buffer: give the memory back once it
            // has been taken.
            if self.buf.len() > self.initial {
                self.buf.truncate(self.initial);
                self.buf.shrink_to_fit();
            }
        }
        let need = self.frame_need().max(FRAME_HEADER_LEN);
        let want = need.saturating_sub(self.buffered()).max(1);
        if self.buf.len() - self.end < want {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
            // Grow (doubling, never past the whole frame) only when the
            // move left no room at all. A caller that drains `next_frame`
            // first only ever grows to one whole frame; one that does not
            // still gets a non-empty slice.
            if self.end == self.buf.len() {
                let len = (self.buf.len() * 2).min(self.end + want);
                self.buf.resize(len, 0);
            }
        }
        &mut self.buf[self.end..]
    }

    /// Mark `n` bytes of [`spare`](Self::spare) as received.
    pub fn filled(&mut self, n: usize) {
        assert!(self.end + n <= self.buf.len(), "filled past spare");
        self.end += n;
    }

    /// Copy `bytes` in — all of them: a slice holding several frames grows
    /// the buffer to the whole slice (fuzzing found the struct's bound
    /// claimed for it). Feed socket-sized pieces and drain between them.
    pub fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let spare = self.spare();
            let n = spare.len().min(bytes.len());
            spare[..n].copy_from_slice(&bytes[..n]);
            self.filled(n);
            bytes = &bytes[n..];
        }
    }

    /// One `read` into the buffer; `Ok(0)` is end of stream.
    pub fn read_from<R: std::io::Read>(&mut self, r: &mut R) -> std::io::Result<usize> {
        let n = r.read(self.spare())?;
        self.filled(n);
        Ok(n)
    }

    /// Bytes the frame at `start` needs in all (header + body), or 0 when
    /// the header is not yet here or declares an invalid length.
    fn frame_need(&self) -> usize {
        let b = &self.buf[self.start..self.end];
        if b.len() < FRAME_HEADER_LEN {
            return 0;
        }
        let declared = u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize;
        if declared == 0 || declared > self.max_frame {
            return 0;
        }
        FRAME_HEADER_LEN + declared
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(body: &[u8]) -> Vec<u8> {
        let mut f = (body.len() as u32).to_le_bytes().to_vec();
        f.extend_from_slice(body);
        f
    }

    #[test]
    fn frames_come_out_whole_however_the_bytes_are_split() {
        let bodies: Vec<Vec<u8>> = (1..40u8).map(|n| vec![n; n as usize * 7]).collect();
        let stream: Vec<u8> = bodies.iter().flat_map(|b| frame(b)).collect();
        for step in [1, 3, 64, 1000, stream.len()] {
            let mut r = FrameReader::with_capacity(1 << 20, 16);
            let mut got = Vec::new();
            for chunk in stream.chunks(step) {
                r.feed(chunk);
                while let Some(b) = r.next_frame().unwrap() {
                    got.push(b.to_vec());
                }
            }
            assert_eq!(got, bodies, "step {step}");
            assert_eq!(r.buffered(), 0);
        }
    }

    #[test]
    fn a_length_prefix_alone_does_not_allocate_the_frame() {
        let mut r = FrameReader::with_capacity(64 << 20, 4096);
        r.feed(&((64u32 << 20) - 1).to_le_bytes());
        assert_eq!(r.next_frame().unwrap(), None);
        let _ = r.spare();
        assert!(r.capacity() <= 8192, "{}", r.capacity());
    }

    #[test]
    fn a_large_frame_grows_the_buffer_to_the_frame_then_it_shrinks_back() {
        let body = vec![9u8; 100_000];
        let mut r = FrameReader::with_capacity(1 << 20, 4096);
        let f = frame(&body);
        for chunk in f.chunks(5000) {
            r.feed(chunk);
            assert!(r.capacity() <= f.len().max(4096), "{}", r.capacity());
        }
        assert_eq!(r.next_frame().unwrap(), Some(&body[..]));
        assert_eq!(r.spare().len(), 4096);
        assert_eq!(r.capacity(), 4096);
    }

    #[test]
    fn bad_lengths_are_errors() {
        let mut r = FrameReader::new(1024);
        r.feed(&0u32.to_le_bytes());
        assert_eq!(
            r.next_frame().unwrap_err(),
            FrameError {
                declared: 0,
                max_frame: 1024
            }
        );
        let mut r = FrameReader::new(1024);
        r.feed(&1025u32.to_le_bytes());
        assert!(r.next_frame().is_err());
    }
}
