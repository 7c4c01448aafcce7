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
