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
/// `read_from`), whole frame bodies come out (`next_frame`). A caller that
/// drains `next_frame` between reads (`spare`/`filled`, `read_from`) grows it
/// to at most one maximal frame plus its header, so it is bounded by
/// `max_frame`; `feed` copies its whole slice in (see there).
#[derive(Debug)]
pub struct FrameReader {
    buf: Vec<u8>,
    /// Bytes before `start` are consumed frames.
    start: usize,
    /// Bytes in `start..end` are received and not yet framed.
    end: usize,
    max_frame: usize,
}

impl FrameReader {
    pub fn new(max_frame: usize) -> Self {
        Self::with_capacity(max_frame, 64 * 1024)
    }

    pub fn with_capacity(max_frame: usize, capacity: usize) -> Self {
        FrameReader {
            buf: vec![0; capacity.max(FRAME_HEADER_LEN)],
            start: 0,
            end: 0,
            max_frame,
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

    /// Room to receive into, at least `FRAME_HEADER_LEN` bytes and, once a
    /// frame header is buffered, enough for the whole frame. Call
    /// [`filled`](Self::filled) with the count written.
    pub fn spare(&mut self) -> &mut [u8] {
        // Move the unframed tail to the front only when that is cheap (no
        // tail) or needed (no room): a run of small frames costs no memmove.
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        let need = self.frame_need().max(FRAME_HEADER_LEN);
        let want = need.saturating_sub(self.buffered()).max(1);
        if self.buf.len() - self.end < want {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
            // A caller that drains `next_frame` first only ever grows to one
            // whole frame; one that does not still gets a non-empty slice.
            let len = self.end + want;
            if self.buf.len() < len {
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
