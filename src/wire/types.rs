//! The wire's plain types: statuses, enums, decode errors, and the borrowed
//! views the server and client read (no flatbuffers code here).

/// Response status, on the wire as a `ubyte` enum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Status {
    Ok = 0,
    BadRequest = 1,
    NotFound = 2,
    Overloaded = 3,
    DeadlineExceeded = 4,
    Internal = 5,
}

impl Status {
    pub const ALL: [Status; 6] = [
        Status::Ok,
        Status::BadRequest,
        Status::NotFound,
        Status::Overloaded,
        Status::DeadlineExceeded,
        Status::Internal,
    ];
    /// Lower-case label for metrics and logs ("ok", "bad_request", ...).
    pub fn label(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::BadRequest => "bad_request",
            Status::NotFound => "not_found",
            Status::Overloaded => "overloaded",
            Status::DeadlineExceeded => "deadline_exceeded",
            Status::Internal => "internal",
        }
    }
}

/// Per-request cache control.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CacheControl {
    /// Look up the cache; store a computed answer.
    #[default]
    Use,
    /// Neither read nor write the cache.
    Bypass,
    /// Compute afresh and overwrite the cached answer.
    Refresh,
}

/// Per-request member selection of an ensemble (`Default`: the ensemble's own).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
#[repr(u8)]
pub enum PolicyOverride {
    #[default]
    Default = 0,
    All = 1,
    Cascade = 2,
    Deadline = 3,
    Bandit = 4,
}

impl PolicyOverride {
    pub const ALL: [PolicyOverride; 5] = [
        PolicyOverride::Default,
        PolicyOverride::All,
        PolicyOverride::Cascade,
        PolicyOverride::Deadline,
        PolicyOverride::Bandit,
    ];
    pub fn from_wire(v: u8) -> Option<Self> {
        Self::ALL.get(v as usize).copied()
    }
    /// Lower-case name, as in ensembles.toml ("default" for `Default`).
    pub fn name(self) -> &'static str {
        match self {
            PolicyOverride::Default => "default",
            PolicyOverride::All => "all",
            PolicyOverride::Cascade => "cascade",
            PolicyOverride::Deadline => "deadline",
            PolicyOverride::Bandit => "bandit",
        }
    }
}

/// Element type of the input tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    F16,
    F32,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F16 => 2,
            DType::F32 => 4,
        }
    }
}

/// Why a frame body could not be read. Maps to BAD_REQUEST on the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeError {
    /// The flatbuffers verifier rejected the buffer.
    Verify,
    /// A valid message, but not of the kind expected here.
    WrongKind,
    /// Missing required field (target, input).
    Missing(&'static str),
    /// rows × cols × dtype size != input byte length, or rows/cols zero.
    Shape,
    /// An enum field (dtype, cache, policy) holds a value this build does
    /// not know.
    Unknown(&'static str),
}

impl DecodeError {
    pub fn message(self) -> &'static str {
        match self {
            DecodeError::Verify => "frame failed flatbuffers verification",
            DecodeError::WrongKind => "unexpected message kind",
            DecodeError::Missing("target") => "missing field: target",
            DecodeError::Missing("input") => "missing field: input",
            DecodeError::Missing(_) => "missing required field",
            DecodeError::Shape => "input length does not match rows x cols",
            DecodeError::Unknown("dtype") => "unknown dtype value",
            DecodeError::Unknown("cache") => "unknown cache value",
            DecodeError::Unknown("policy") => "unknown policy value",
            DecodeError::Unknown(_) => "unknown enum value",
        }
    }
}

/// A verified request, borrowing the frame buffer.
#[derive(Debug, Clone, Copy)]
pub struct RequestView<'a> {
    pub id: u64,
    pub target: &'a str,
    /// `None`: the latest loaded version.
    pub version: Option<u32>,
    pub rows: u32,
    pub cols: u32,
    pub dtype: DType,
    /// Raw little-endian input bytes, `rows * cols * dtype.size()` long.
    pub input: &'a [u8],
    /// Time budget from arrival, in microseconds; `None`: no deadline.
    pub deadline_us: Option<u64>,
    pub domain: Option<&'a str>,
    pub cache: CacheControl,
    pub policy: PolicyOverride,
}

/// A verified feedback message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FeedbackView {
    pub id: u64,
    pub ticket: u64,
    pub label: u32,
}

/// What a client may send.
#[derive(Debug, Clone, Copy)]
pub enum Incoming<'a> {
    Request(RequestView<'a>),
    Feedback(FeedbackView),
}

impl RequestView<'_> {
    /// Convert the input to f32 into `out` (`rows * cols` long).
    pub fn read_f32_into(&self, out: &mut [f32]) {
        let n = self.rows as usize * self.cols as usize;
        assert_eq!(out.len(), n);
        match self.dtype {
            DType::F32 => {
                for (o, c) in out.iter_mut().zip(self.input.chunks_exact(4)) {
                    *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
            DType::F16 => {
                for (o, c) in out.iter_mut().zip(self.input.chunks_exact(2)) {
                    *o = half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
                }
            }
        }
    }
}

/// Server-side time split of one request, microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Timings {
    pub queue_us: u32,
    pub compute_us: u32,
    pub total_us: u32,
}

/// What one model contributed to a response.
#[derive(Debug, Clone, Copy)]
pub struct RunInfo<'a> {
    pub model: &'a str,
    pub version: u32,
    pub flops: u64,
}

/// Everything in a response but the output tensor.
#[derive(Debug, Clone, Copy)]
pub struct ResponseHeader<'a> {
    pub id: u64,
    pub status: Status,
    /// Empty on OK; a human-readable reason otherwise.
    pub message: &'a str,
    pub rows: u32,
    pub cols: u32,
    pub timings: Timings,
    /// The answer came from the cache.
    pub cached: bool,
    /// Some ensemble members were cut off (straggler/deadline); output is
    /// combined from those that ran.
    pub partial: bool,
    /// Names this answer in a later feedback message; 0 = none.
    pub ticket: u64,
}

/// What a client sends.
#[derive(Debug, Clone, Copy)]
pub struct RequestSpec<'a> {
    pub target: &'a str,
    pub version: Option<u32>,
    pub rows: u32,
    pub cols: u32,
    pub input: Input<'a>,
    pub deadline_us: Option<u64>,
    pub domain: Option<&'a str>,
    pub cache: CacheControl,
    pub policy: PolicyOverride,
}

impl<'a> RequestSpec<'a> {
    /// One f32 row for `target`'s newest version: no deadline, cache on,
    /// the target's own policy.
    pub fn row(target: &'a str, x: &'a [f32]) -> Self {
        RequestSpec {
            target,
            version: None,
            rows: 1,
            cols: x.len() as u32,
            input: Input::F32(x),
            deadline_us: None,
            domain: None,
            cache: CacheControl::Use,
            policy: PolicyOverride::Default,
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub enum Input<'a> {
    F32(&'a [f32]),
    /// FP16 as raw bits.
    F16(&'a [u16]),
}

/// A verified response, borrowing the frame buffer.
#[derive(Debug, Clone)]
pub struct ResponseView<'a> {
    pub id: u64,
    pub status: Status,
    pub message: &'a str,
    pub rows: u32,
    pub cols: u32,
    /// Raw little-endian f32 output bytes, `rows * cols * 4` long (empty on errors).
    pub output: &'a [u8],
    pub timings: Timings,
    pub cached: bool,
    pub partial: bool,
    pub ticket: u64,
    /// (model, version, flops) per member that ran.
    pub runs: Vec<(&'a str, u32, u64)>,
}

impl ResponseView<'_> {
    pub fn output_f32(&self) -> Vec<f32> {
        self.output
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    }
}

impl Status {
    /// The status for a wire value; `None` for a value this build does not know.
    pub fn from_wire(v: u8) -> Option<Status> {
        Status::ALL.get(v as usize).copied()
    }
}
