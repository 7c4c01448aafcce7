//! The L2 file's format: constants, sizing ([`L2Config`] → [`Geometry`]) and
//! the header (layout in the parent module's docs).

use std::fs::File;
use std::io::Read;
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};
use xxhash_rust::xxh3::xxh3_64;

/// The file's magic bytes.
pub const MAGIC: [u8; 8] = *b"BEASTL2\0";
/// Bumped whenever the layout changes; another version is set aside.
pub const FORMAT_VERSION: u32 = 1;
/// Bytes before the first bucket.
pub const HEADER_BYTES: usize = 4096;
pub(super) const SLOT_HEADER_BYTES: usize = 64;
pub(super) const READ_RETRIES: u32 = 8;
pub(super) const FLAG_OCCUPIED: u32 = 1;
/// Saturation of the per-slot frequency counter.
pub(super) const FREQ_MAX: u64 = 3;

// Word indexes inside a slot.
pub(super) const W_SEQ: usize = 0;
pub(super) const W_KEY_LO: usize = 1;
pub(super) const W_KEY_HI: usize = 2;
pub(super) const W_TAG: usize = 3;
pub(super) const W_EXPIRES: usize = 4;
pub(super) const W_LEN_FLAGS: usize = 5;
pub(super) const W_CHECKSUM: usize = 6;
pub(super) const W_META: usize = 7;

/// L2 sizing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct L2Config {
    /// Size of the file, header included (rounded down to whole buckets).
    pub total_bytes: u64,
    /// Slots per bucket (1..=64).
    pub ways: u32,
    /// Largest value in f32s.
    pub value_f32_max: u32,
}

impl Default for L2Config {
    fn default() -> Self {
        L2Config {
            total_bytes: 256 << 20,
            ways: 8,
            value_f32_max: 16,
        }
    }
}

/// The geometry derived from a config (and stored in the header).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub slot_size: u32,
    pub value_f32_max: u32,
    pub ways: u32,
    pub bucket_count: u64,
    pub file_bytes: u64,
}

impl Geometry {
    /// Geometry for `cfg`, or why it is impossible.
    pub fn for_config(cfg: &L2Config) -> Result<Geometry, String> {
        if cfg.ways == 0 || cfg.ways > 64 {
            return Err(format!("beast: L2 ways must be 1..=64, got {}", cfg.ways));
        }
        if cfg.value_f32_max == 0 || cfg.value_f32_max > 1 << 20 {
            return Err(format!(
                "beast: L2 value_f32_max must be 1..=2^20, got {}",
                cfg.value_f32_max
            ));
        }
        let slot = SLOT_HEADER_BYTES as u64 + 4 * cfg.value_f32_max as u64;
        let slot_size = slot.div_ceil(64) * 64;
        let bucket_bytes = slot_size * cfg.ways as u64;
        let room = cfg.total_bytes.saturating_sub(HEADER_BYTES as u64);
        let bucket_count = room / bucket_bytes;
        if bucket_count == 0 {
            return Err(format!(
                "beast: L2 total_bytes {} holds no bucket of {} bytes",
                cfg.total_bytes, bucket_bytes
            ));
        }
        let file_bytes = HEADER_BYTES as u64 + bucket_count * bucket_bytes;
        if usize::try_from(file_bytes).is_err() {
            return Err("beast: L2 file too large for this address space".into());
        }
        Ok(Geometry {
            slot_size: slot_size as u32,
            value_f32_max: cfg.value_f32_max,
            ways: cfg.ways,
            bucket_count,
            file_bytes,
        })
    }

    /// Total slots.
    pub fn slots(&self) -> u64 {
        self.bucket_count * self.ways as u64
    }
}

/// A decoded, validated header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub format_version: u32,
    pub geometry: Geometry,
    pub created_unix: u64,
}

pub(super) fn encode_header(g: &Geometry, created_unix: u64) -> [u8; 56] {
    let mut h = [0u8; 56];
    h[0..8].copy_from_slice(&MAGIC);
    h[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&g.slot_size.to_le_bytes());
    h[16..20].copy_from_slice(&g.value_f32_max.to_le_bytes());
    h[20..24].copy_from_slice(&g.ways.to_le_bytes());
    h[24..32].copy_from_slice(&g.bucket_count.to_le_bytes());
    h[32..40].copy_from_slice(&created_unix.to_le_bytes());
    h[40..48].copy_from_slice(&g.file_bytes.to_le_bytes());
    let ck = xxh3_64(&h[..48]);
    h[48..56].copy_from_slice(&ck.to_le_bytes());
    h
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[o..o + 4]);
    u32::from_le_bytes(a)
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(a)
}

/// Parse and check a header (magic, checksum, format, self-consistent
/// geometry, file length). Never panics on garbage.
pub fn decode_header(b: &[u8; 56], file_len: u64) -> Result<Header, String> {
    if b[0..8] != MAGIC {
        return Err("bad magic".into());
    }
    if xxh3_64(&b[..48]) != u64_at(b, 48) {
        return Err("header checksum mismatch".into());
    }
    let format_version = u32_at(b, 8);
    if format_version != FORMAT_VERSION {
        return Err(format!(
            "format version {format_version}, this build reads {FORMAT_VERSION}"
        ));
    }
    let stored = Geometry {
        slot_size: u32_at(b, 12),
        value_f32_max: u32_at(b, 16),
        ways: u32_at(b, 20),
        bucket_count: u64_at(b, 24),
        file_bytes: u64_at(b, 40),
    };
    // The stored geometry must be one this code would build itself.
    let rebuilt = Geometry::for_config(&L2Config {
        total_bytes: stored.file_bytes,
        ways: stored.ways,
        value_f32_max: stored.value_f32_max,
    })?;
    if rebuilt != stored {
        return Err(format!("inconsistent geometry {stored:?}"));
    }
    if file_len != stored.file_bytes {
        return Err(format!(
            "file is {file_len} bytes, header says {}",
            stored.file_bytes
        ));
    }
    Ok(Header {
        format_version,
        geometry: stored,
        created_unix: u64_at(b, 32),
    })
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// What `open` found and did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OpenReport {
    /// A fresh file was created.
    pub created: bool,
    /// Where a bad or incompatible file was moved.
    pub moved_aside: Option<PathBuf>,
    /// Why it was moved.
    pub reason: Option<String>,
    /// Older `<path>.bad-*` files removed (only the newest is kept).
    pub old_bad_removed: Vec<PathBuf>,
    /// Live entries served from the reopened file.
    pub entries: u64,
    /// Slots left odd by a writer that died, cleared.
    pub odd_slots_cleared: u64,
    /// Slots whose checksum failed, cleared.
    pub corrupt_slots_cleared: u64,
}

/// Read and check the header of `file` (from its start); returns it and the file length.
pub(super) fn read_header(file: &mut File) -> Result<(Header, u64), String> {
    let len = file.metadata().map_err(|e| e.to_string())?.len();
    if len < HEADER_BYTES as u64 {
        return Err(format!("file too short ({len} bytes)"));
    }
    let mut b = [0u8; 56];
    file.read_exact(&mut b).map_err(|e| e.to_string())?;
    Ok((decode_header(&b, len)?, len))
}
