//! L2: the cache shared by every core — one fixed-size file mapped (shared,
//! read-write) into the process. The file IS the cache: it survives a
//! restart, so a restarted server starts warm.
//!
//! # Layout
//!
//! ```text
//! [ header: 4096 bytes ][ bucket 0: W slots ][ bucket 1 ] ... [ bucket B-1 ]
//! header: magic "BEASTL2\0" | format u32 | slot_size u32 | value_f32_max u32
//!         | ways u32 | bucket_count u64 | created_unix u64 | file_bytes u64
//!         | xxh3-64 of the 48 bytes before it
//! slot (slot_size = round_up(64 + 4·value_f32_max, 64) bytes, 64-aligned):
//!   0 seq u64 (seqlock: odd = being written)   8 key lo   16 key hi
//!  24 target tag u64   32 expires_at (unix s, 0 = never)
//!  40 len u32 | flags u32 (bit 0: occupied)    48 checksum u64
//!  56 meta u64 (eviction bits; readers bump it; outside seq and checksum)
//!  64 value: len f32s
//! ```
//!
//! # Concurrency (seqlock per slot)
//!
//! Every access to the mapped slots goes through `AtomicU64`/`AtomicU32`
//! (relaxed for the payload), so concurrent readers and writers are never a
//! data race in the Rust memory model; the seqlock only decides whether
//! what a reader copied is one consistent version.
//!
//! - Writer: `compare_exchange(seq, s → s+1, Acquire)` with `s` even claims
//!   the slot (a failed CAS means another writer has it: pick another slot
//!   or drop the insert — writers never wait); `fence(Release)`; relaxed
//!   payload stores; `seq.store(s+2, Release)`.
//! - Reader: `s1 = seq.load(Acquire)` (odd → retry); relaxed payload loads
//!   into the caller's buffer; `fence(Acquire)`; `s2 = seq.load(Relaxed)`;
//!   `s1 != s2` → retry (bounded, then a miss). Then the checksum must match
//!   (xxh3-64 over key, tag, expiry, len/flags and the value); a mismatch is
//!   counted and served as a miss, never as a value.
//!
//! # Crashes
//!
//! A writer killed mid-write leaves its slot odd; [`L2Cache::open`] clears
//! such slots (and any whose checksum fails) before serving. The file is
//! locked with `flock(LOCK_EX)` while open, so one process owns it; `open`
//! takes the lock before it reads, sizes or moves the file, so a second
//! opener can never truncate the owner's mapping.
//!
//! # Disk space
//!
//! Every block of the file is reserved (`posix_fallocate`) at create and
//! again at open, before the mapping is touched: a store (or, on tmpfs, a
//! load) into an unbacked page of a full disk would kill the process with
//! SIGBUS. Where the disk cannot hold the file, `open` fails with the
//! reason and the caller runs without L2.
//!
//! # Eviction
//!
//! Per bucket, frequency with aging (a per-slot saturating counter in
//! `meta`, bumped by readers with relaxed atomics): the victim is the slot
//! with the lowest counter (newcomers start at 0, so a one-hit wonder goes
//! first); when even the victim was warm, the whole bucket is aged by the
//! victim's count (a GCLOCK sweep in one step). See docs/CACHE.md for the
//! measurement against an exact LRU.

use super::key::CacheKey;
use super::metrics::{bump, L2Counters, L2Stats};
use memmap2::{MmapMut, MmapOptions};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};
use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

/// The file's magic bytes.
pub const MAGIC: [u8; 8] = *b"BEASTL2\0";
/// Bumped whenever the layout changes; another version is set aside.
pub const FORMAT_VERSION: u32 = 1;
/// Bytes before the first bucket.
pub const HEADER_BYTES: usize = 4096;
const SLOT_HEADER_BYTES: usize = 64;
const READ_RETRIES: u32 = 8;
const FLAG_OCCUPIED: u32 = 1;
/// Saturation of the per-slot frequency counter.
const FREQ_MAX: u64 = 3;

// Word indexes inside a slot.
const W_SEQ: usize = 0;
const W_KEY_LO: usize = 1;
const W_KEY_HI: usize = 2;
const W_TAG: usize = 3;
const W_EXPIRES: usize = 4;
const W_LEN_FLAGS: usize = 5;
const W_CHECKSUM: usize = 6;
const W_META: usize = 7;

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

fn encode_header(g: &Geometry, created_unix: u64) -> [u8; 56] {
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

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Raw view of the slot area: a base pointer and the geometry. Every load
/// and store goes through atomics.
#[derive(Clone, Copy)]
struct Slots {
    base: *mut u8,
    geo: Geometry,
}

/// What a full read of one slot found (scans: open, inspect).
enum SlotState {
    Empty,
    Odd,
    Corrupt,
    Live { tag: u64, expires: u64 },
}

fn checksum(lo: u64, hi: u64, tag: u64, expires: u64, len_flags: u64, value: &[f32]) -> u64 {
    let mut h = [0u8; 40];
    h[0..8].copy_from_slice(&lo.to_le_bytes());
    h[8..16].copy_from_slice(&hi.to_le_bytes());
    h[16..24].copy_from_slice(&tag.to_le_bytes());
    h[24..32].copy_from_slice(&expires.to_le_bytes());
    h[32..40].copy_from_slice(&len_flags.to_le_bytes());
    let bytes: &[u8] = bytemuck::cast_slice(value);
    if bytes.len() <= 128 {
        // Small values (the common case): one hash over one stack buffer.
        let mut b = [0u8; 168];
        b[..40].copy_from_slice(&h);
        b[40..40 + bytes.len()].copy_from_slice(bytes);
        xxh3_64(&b[..40 + bytes.len()])
    } else {
        xxh3_64_with_seed(bytes, xxh3_64(&h))
    }
}

/// Decode one slot from a plain copy of its bytes (`inspect`: a copy read
/// beside a live writer may be torn, which shows as odd or corrupt).
/// `buf` holds value_f32_max.
fn decode_slot(b: &[u8], buf: &mut [f32]) -> SlotState {
    let w = |i: usize| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[i * 8..i * 8 + 8]);
        u64::from_ne_bytes(a)
    };
    if w(W_SEQ) & 1 == 1 {
        return SlotState::Odd;
    }
    let lf = w(W_LEN_FLAGS);
    if (lf >> 32) as u32 & FLAG_OCCUPIED == 0 {
        return SlotState::Empty;
    }
    let len = lf as u32 as usize;
    if len > buf.len() {
        return SlotState::Corrupt;
    }
    for (i, v) in buf[..len].iter_mut().enumerate() {
        let o = SLOT_HEADER_BYTES + i * 4;
        let mut a = [0u8; 4];
        a.copy_from_slice(&b[o..o + 4]);
        *v = f32::from_ne_bytes(a);
    }
    let (tag, expires) = (w(W_TAG), w(W_EXPIRES));
    if checksum(w(W_KEY_LO), w(W_KEY_HI), tag, expires, lf, &buf[..len]) != w(W_CHECKSUM) {
        return SlotState::Corrupt;
    }
    SlotState::Live { tag, expires }
}

impl Slots {
    #[inline]
    fn slot_ptr(&self, idx: u64) -> *mut u8 {
        debug_assert!(idx < self.geo.slots());
        // SAFETY: idx < slots, and HEADER + slots·slot_size == file_bytes,
        // the length of the mapping, so the offset stays inside it.
        unsafe {
            self.base
                .add(HEADER_BYTES + idx as usize * self.geo.slot_size as usize)
        }
    }

    #[inline]
    fn word(&self, slot: *mut u8, w: usize) -> &AtomicU64 {
        // SAFETY: slot is 64-aligned inside the mapping (page-aligned base,
        // 4096-byte header, slot_size a multiple of 64), w < 8, so the
        // 8 bytes are in bounds and aligned. The mapping lives as long as
        // `self` is used (the owner keeps it), and all access to these bytes
        // is atomic, so handing out `&AtomicU64` is sound.
        unsafe { &*(slot.add(w * 8) as *const AtomicU64) }
    }

    #[inline]
    fn value_word(&self, slot: *mut u8, i: usize) -> &AtomicU32 {
        debug_assert!(i < self.geo.value_f32_max as usize);
        // SAFETY: i < value_f32_max, so 64 + 4i + 4 ≤ slot_size; aligned to 4.
        // Same lifetime and all-atomic argument as `word`.
        unsafe { &*(slot.add(SLOT_HEADER_BYTES + i * 4) as *const AtomicU32) }
    }

    /// Read a whole slot consistently (scan path). `buf` holds value_f32_max.
    fn read_any(&self, idx: u64, buf: &mut [f32]) -> SlotState {
        let slot = self.slot_ptr(idx);
        let seq = self.word(slot, W_SEQ);
        for _ in 0..READ_RETRIES {
            let s1 = seq.load(Ordering::Acquire);
            if s1 & 1 == 1 {
                std::hint::spin_loop();
                continue;
            }
            let lo = self.word(slot, W_KEY_LO).load(Ordering::Relaxed);
            let hi = self.word(slot, W_KEY_HI).load(Ordering::Relaxed);
            let tag = self.word(slot, W_TAG).load(Ordering::Relaxed);
            let expires = self.word(slot, W_EXPIRES).load(Ordering::Relaxed);
            let lf = self.word(slot, W_LEN_FLAGS).load(Ordering::Relaxed);
            let ck = self.word(slot, W_CHECKSUM).load(Ordering::Relaxed);
            let len = (lf as u32 as usize).min(buf.len());
            for (i, v) in buf[..len].iter_mut().enumerate() {
                *v = f32::from_bits(self.value_word(slot, i).load(Ordering::Relaxed));
            }
            fence(Ordering::Acquire);
            if seq.load(Ordering::Relaxed) != s1 {
                continue;
            }
            if (lf >> 32) as u32 & FLAG_OCCUPIED == 0 {
                return SlotState::Empty;
            }
            if lf as u32 as usize > buf.len()
                || checksum(lo, hi, tag, expires, lf, &buf[..len]) != ck
            {
                return SlotState::Corrupt;
            }
            return SlotState::Live { tag, expires };
        }
        SlotState::Odd
    }

    /// Try to claim a slot for writing: even → odd. Returns the even seq.
    #[inline]
    fn claim(&self, slot: *mut u8) -> Option<u64> {
        let seq = self.word(slot, W_SEQ);
        let s = seq.load(Ordering::Relaxed);
        if s & 1 == 1 {
            return None;
        }
        seq.compare_exchange(s, s + 1, Ordering::Acquire, Ordering::Relaxed)
            .ok()?;
        // Payload stores below must not become visible before the odd seq.
        fence(Ordering::Release);
        Some(s)
    }

    #[inline]
    fn release(&self, slot: *mut u8, s: u64) {
        self.word(slot, W_SEQ)
            .store(s.wrapping_add(2), Ordering::Release);
    }

    /// Mark a claimed slot empty.
    fn clear_claimed(&self, slot: *mut u8) {
        self.word(slot, W_LEN_FLAGS).store(0, Ordering::Relaxed);
        self.word(slot, W_CHECKSUM).store(0, Ordering::Relaxed);
        self.word(slot, W_META).store(0, Ordering::Relaxed);
    }
}

/// The shared, persistent L2 cache. `Send + Sync`: share one `Arc<L2Cache>`.
pub struct L2Cache {
    slots: Slots,
    counters: L2Counters,
    path: PathBuf,
    // Keeps the mapping (and the flock on the file) alive; all access to
    // the slot area goes through `slots.base`.
    mmap: MmapMut,
    _file: File,
}

// SAFETY: `slots.base` points into `mmap`, which is owned by the same struct
// and never remapped; after `open` returns, every access to the mapped bytes
// is an atomic load/store/CAS, so sharing across threads is data-race free.
unsafe impl Send for L2Cache {}
// SAFETY: as above: `&L2Cache` only gives atomic access to the mapping.
unsafe impl Sync for L2Cache {}

fn lock_exclusive(file: &File, path: &Path) -> Result<(), String> {
    // SAFETY: flock on a valid, owned descriptor; no memory is passed.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        Ok(())
    } else {
        Err(format!(
            "beast: L2 file {} is locked by another process (another server uses it): {}",
            path.display(),
            std::io::Error::last_os_error()
        ))
    }
}

fn read_header(file: &mut File) -> Result<(Header, u64), String> {
    let len = file.metadata().map_err(|e| e.to_string())?.len();
    if len < HEADER_BYTES as u64 {
        return Err(format!("file too short ({len} bytes)"));
    }
    let mut b = [0u8; 56];
    file.read_exact(&mut b).map_err(|e| e.to_string())?;
    Ok((decode_header(&b, len)?, len))
}

/// Reserve the blocks of `file`'s first `len` bytes (and extend it to
/// `len`), so that no later write through the mapping needs a free block:
/// a mapping of a sparse file on a full disk dies of SIGBUS at the first
/// store into a hole (or, on tmpfs, at the first load).
fn reserve(file: &File, len: u64) -> Result<(), String> {
    let len = libc::off_t::try_from(len).map_err(|_| "file too large".to_string())?;
    loop {
        // SAFETY: a valid, owned descriptor; no memory is passed. Returns
        // an error number instead of setting errno.
        let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len) };
        match rc {
            0 => return Ok(()),
            libc::EINTR => continue,
            e => return Err(std::io::Error::from_raw_os_error(e).to_string()),
        }
    }
}

/// Whether `file` is still the file at `path` (not renamed away or
/// replaced between our open and our lock).
fn still_at(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// `<name>.bad-<digits>` files beside `path` other than `keep`, removed:
/// only the newest moved-aside file is kept. Returns what was removed.
fn prune_bad_files(path: &Path, keep: &Path) -> Vec<PathBuf> {
    let (Some(name), dir) = (path.file_name(), path.parent()) else {
        return Vec::new();
    };
    let dir = match dir {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let prefix = format!("{}.bad-", name.to_string_lossy());
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for e in entries.flatten() {
        let n = e.file_name();
        let n = n.to_string_lossy();
        let ours = n
            .strip_prefix(&prefix)
            .is_some_and(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()));
        let p = e.path();
        if !ours || p.file_name() == keep.file_name() {
            continue;
        }
        match std::fs::remove_file(&p) {
            Ok(()) => {
                eprintln!("beast: removed older bad L2 file {}", p.display());
                removed.push(p);
            }
            Err(err) => eprintln!(
                "beast: cannot remove old bad L2 file {}: {err}",
                p.display()
            ),
        }
    }
    removed
}

impl L2Cache {
    /// Open (or create) the cache file at `path` sized by `cfg`.
    ///
    /// The file is locked (`flock`, exclusive, non-blocking) before anything
    /// reads, sizes or moves it, so a second opener gets an error and never
    /// touches the owner's file. A file with a valid header and the same
    /// format and geometry is served as is (odd or corrupt slots are
    /// cleared first). An empty file is sized as a new cache. Any other
    /// file is renamed to `<path>.bad-<unix time>` (older `.bad-*` files of
    /// this path are removed) and a fresh one is made. Every block of the
    /// file is reserved before it is mapped; where the disk cannot hold it,
    /// `open` fails with the reason (a new file is removed again).
    pub fn open(path: impl AsRef<Path>, cfg: L2Config) -> Result<(L2Cache, OpenReport), String> {
        let path = path.as_ref();
        let geo = Geometry::for_config(&cfg)?;
        let mut report = OpenReport::default();
        // Retried only when the path was replaced between open and lock
        // (another opener moved a bad file aside), or after a move aside.
        for _ in 0..8 {
            let mut file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(path)
                .map_err(|e| format!("beast: cannot open L2 file {}: {e}", path.display()))?;
            lock_exclusive(&file, path)?;
            if !still_at(&file, path) {
                continue;
            }
            let len = file
                .metadata()
                .map_err(|e| format!("beast: cannot stat L2 file {}: {e}", path.display()))?
                .len();
            if len == 0 {
                return Self::create(path, file, geo, report);
            }
            let why = match read_header(&mut file) {
                Ok((h, _)) if h.geometry == geo => {
                    return Self::map_existing(path, file, geo, report)
                }
                Ok((h, _)) => format!(
                    "geometry {:?} differs from configured {:?}",
                    h.geometry, geo
                ),
                Err(e) => e,
            };
            // Still holding the lock: nobody else may be using it.
            let aside = PathBuf::from(format!("{}.bad-{}", path.display(), unix_now()));
            std::fs::rename(path, &aside)
                .map_err(|e| format!("beast: cannot move bad L2 file {}: {e}", path.display()))?;
            eprintln!(
                "beast: L2 cache file {} unusable ({why}); moved to {}, starting cold",
                path.display(),
                aside.display()
            );
            report.old_bad_removed = prune_bad_files(path, &aside);
            report.moved_aside = Some(aside);
            report.reason = Some(why);
        }
        Err(format!(
            "beast: L2 file {} kept being replaced while opening it",
            path.display()
        ))
    }

    /// Size the new (empty, locked) `file` and write its header.
    fn create(
        path: &Path,
        file: File,
        geo: Geometry,
        mut report: OpenReport,
    ) -> Result<(L2Cache, OpenReport), String> {
        if let Err(e) = reserve(&file, geo.file_bytes) {
            // Give the space back; a later start tries again.
            let _ = file.set_len(0);
            let _ = std::fs::remove_file(path);
            let mut why = format!(
                "beast: cannot reserve {} bytes for L2 file {}: {e}",
                geo.file_bytes,
                path.display()
            );
            if let Some(aside) = &report.moved_aside {
                let held = std::fs::metadata(aside).map(|m| m.len()).unwrap_or(0);
                why.push_str(&format!(
                    " (the moved-aside {} holds {held} bytes)",
                    aside.display()
                ));
            }
            return Err(why);
        }
        // SAFETY: the file is ours (exclusive flock), sized and its blocks
        // reserved; nothing else maps or truncates it while the mapping lives.
        let mut mmap = unsafe { MmapOptions::new().map_mut(&file) }
            .map_err(|e| format!("beast: cannot map L2 file: {e}"))?;
        let h = encode_header(&geo, unix_now());
        // Plain writes are fine: nothing else sees the mapping yet.
        mmap[..h.len()].copy_from_slice(&h);
        mmap.flush_range(0, HEADER_BYTES)
            .map_err(|e| format!("beast: cannot write L2 header: {e}"))?;
        report.created = true;
        Ok((Self::from_parts(path, file, mmap, geo), report))
    }

    fn map_existing(
        path: &Path,
        file: File,
        geo: Geometry,
        mut report: OpenReport,
    ) -> Result<(L2Cache, OpenReport), String> {
        // A file left sparse (by an older version, a copy, a restore) must
        // have its holes backed before the scan below touches them.
        reserve(&file, geo.file_bytes).map_err(|e| {
            format!(
                "beast: cannot reserve the {} bytes of L2 file {}: {e}",
                geo.file_bytes,
                path.display()
            )
        })?;
        // SAFETY: as in `create`: exclusive flock, file length checked
        // against the header (read_header), blocks reserved.
        let mmap = unsafe { MmapOptions::new().map_mut(&file) }
            .map_err(|e| format!("beast: cannot map L2 file: {e}"))?;
        let cache = Self::from_parts(path, file, mmap, geo);
        // Repair before serving: slots a dead writer left odd, and slots
        // whose checksum fails, become free.
        let s = cache.slots;
        let mut buf = vec![0f32; geo.value_f32_max as usize];
        for idx in 0..geo.slots() {
            let slot = s.slot_ptr(idx);
            match s.read_any(idx, &mut buf) {
                SlotState::Empty => {}
                SlotState::Live { .. } => report.entries += 1,
                SlotState::Odd => {
                    let seq = s.word(slot, W_SEQ);
                    let v = seq.load(Ordering::Relaxed);
                    s.clear_claimed(slot);
                    // A file may hold any seq, u64::MAX too: wrap, never
                    // overflow (found by fuzz/l2_open).
                    seq.store((v | 1).wrapping_add(1), Ordering::Release);
                    report.odd_slots_cleared += 1;
                }
                SlotState::Corrupt => {
                    if let Some(v) = s.claim(slot) {
                        s.clear_claimed(slot);
                        s.release(slot, v);
                    }
                    report.corrupt_slots_cleared += 1;
                }
            }
        }
        // Every occupied slot left is a live (possibly expired) entry.
        cache
            .counters
            .occupancy
            .store(report.entries, Ordering::Relaxed);
        if report.odd_slots_cleared + report.corrupt_slots_cleared > 0 {
            eprintln!(
                "beast: L2 cache {}: cleared {} half-written and {} corrupt slots, {} entries kept",
                path.display(),
                report.odd_slots_cleared,
                report.corrupt_slots_cleared,
                report.entries
            );
        }
        Ok((cache, report))
    }

    fn from_parts(path: &Path, file: File, mut mmap: MmapMut, geo: Geometry) -> L2Cache {
        let base = mmap.as_mut_ptr();
        L2Cache {
            slots: Slots { base, geo },
            counters: L2Counters::default(),
            path: path.to_path_buf(),
            mmap,
            _file: file,
        }
    }

    /// Geometry in use.
    pub fn geometry(&self) -> Geometry {
        self.slots.geo
    }

    /// The file path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    #[inline]
    fn bucket_of(&self, key: &CacheKey) -> u64 {
        // Multiply-shift: any bucket count, no modulo. Uses the high half so
        // it is independent of the bits L1 sets use.
        ((key.hi() as u128 * self.slots.geo.bucket_count as u128) >> 64) as u64
    }

    /// Look `key` up; on a hit copy the value into `out` and return its
    /// length. Entries with a TTL are checked against the wall clock.
    #[inline]
    pub fn get(&self, key: &CacheKey, out: &mut [f32]) -> Option<usize> {
        self.get_at(key, out, None)
    }

    /// As [`get`](Self::get), with `now` (unix seconds) given by the caller
    /// (a coarse per-shard clock); `None` reads the clock only when the
    /// entry has a TTL.
    pub fn get_at(&self, key: &CacheKey, out: &mut [f32], now: Option<u64>) -> Option<usize> {
        let s = self.slots;
        let ways = s.geo.ways as u64;
        let first = self.bucket_of(key) * ways;
        let (want_lo, want_hi) = (key.lo(), key.hi());
        for idx in first..first + ways {
            let slot = s.slot_ptr(idx);
            let seq = s.word(slot, W_SEQ);
            let mut attempt = 0;
            loop {
                let s1 = seq.load(Ordering::Acquire);
                if s1 & 1 == 1 {
                    attempt += 1;
                    bump(&self.counters.torn_read_retries);
                    if attempt >= READ_RETRIES {
                        bump(&self.counters.torn_read_misses);
                        break;
                    }
                    std::hint::spin_loop();
                    continue;
                }
                // A different key (even if torn) is simply not this slot.
                if s.word(slot, W_KEY_LO).load(Ordering::Relaxed) != want_lo
                    || s.word(slot, W_KEY_HI).load(Ordering::Relaxed) != want_hi
                {
                    break;
                }
                let lf = s.word(slot, W_LEN_FLAGS).load(Ordering::Relaxed);
                let len = lf as u32 as usize;
                if (lf >> 32) as u32 & FLAG_OCCUPIED == 0
                    || len > out.len()
                    || len > s.geo.value_f32_max as usize
                {
                    // Not live here, or too long for `out`, or corrupt: a miss
                    // either way (a corrupt length is caught by the scans).
                    break;
                }
                let tag = s.word(slot, W_TAG).load(Ordering::Relaxed);
                let expires = s.word(slot, W_EXPIRES).load(Ordering::Relaxed);
                let ck = s.word(slot, W_CHECKSUM).load(Ordering::Relaxed);
                for (i, v) in out[..len].iter_mut().enumerate() {
                    *v = f32::from_bits(s.value_word(slot, i).load(Ordering::Relaxed));
                }
                fence(Ordering::Acquire);
                if seq.load(Ordering::Relaxed) != s1 {
                    attempt += 1;
                    bump(&self.counters.torn_read_retries);
                    if attempt >= READ_RETRIES {
                        bump(&self.counters.torn_read_misses);
                        break;
                    }
                    continue;
                }
                if checksum(want_lo, want_hi, tag, expires, lf, &out[..len]) != ck {
                    bump(&self.counters.checksum_failures);
                    break;
                }
                if expires != 0 && expires <= now.unwrap_or_else(unix_now) {
                    bump(&self.counters.expired);
                    break;
                }
                // Frequency bit: racy on purpose (a lost bump only costs
                // eviction precision), relaxed, outside the seqlock.
                let meta = s.word(slot, W_META);
                let m = meta.load(Ordering::Relaxed);
                if m < FREQ_MAX {
                    meta.store(m + 1, Ordering::Relaxed);
                }
                bump(&self.counters.hits);
                return Some(len);
            }
        }
        bump(&self.counters.misses);
        None
    }

    /// Insert or replace the value of `key` for target `tag`
    /// (see [`crate::cache::target_tag`]), expiring at `expires_at`
    /// (unix seconds, 0 = never). Returns false when the value is too long
    /// or every candidate slot was being written by another core (the
    /// insert is dropped rather than waited for).
    pub fn insert(&self, key: &CacheKey, tag: u64, value: &[f32], expires_at: u64) -> bool {
        let s = self.slots;
        if value.len() > s.geo.value_f32_max as usize {
            return false;
        }
        let ways = s.geo.ways as u64;
        let first = self.bucket_of(key) * ways;
        let (lo, hi) = (key.lo(), key.hi());
        for _round in 0..2 {
            // Choose: same key, else a free or expired slot, else the victim
            // with the lowest frequency (start at a key-dependent way so ties
            // spread). Peeks are racy; the claim below settles races.
            let mut same = None;
            let mut free = None;
            let mut victim = None;
            let mut victim_freq = u64::MAX;
            let start = lo % ways;
            let mut now = None;
            for j in 0..ways {
                let idx = first + (start + j) % ways;
                let slot = s.slot_ptr(idx);
                let lf = s.word(slot, W_LEN_FLAGS).load(Ordering::Relaxed);
                let occupied = (lf >> 32) as u32 & FLAG_OCCUPIED != 0;
                if occupied
                    && s.word(slot, W_KEY_LO).load(Ordering::Relaxed) == lo
                    && s.word(slot, W_KEY_HI).load(Ordering::Relaxed) == hi
                {
                    same = Some(idx);
                    break;
                }
                let expired = occupied && {
                    let e = s.word(slot, W_EXPIRES).load(Ordering::Relaxed);
                    e != 0 && e <= *now.get_or_insert_with(unix_now)
                };
                if !occupied || expired {
                    if free.is_none() {
                        free = Some(idx);
                    }
                    continue;
                }
                let f = s.word(slot, W_META).load(Ordering::Relaxed);
                if f < victim_freq {
                    victim_freq = f;
                    victim = Some(idx);
                }
            }
            let (idx, evicting) = match (same, free, victim) {
                (Some(i), _, _) => (i, false),
                (None, Some(i), _) => (i, false),
                (None, None, Some(i)) => (i, true),
                (None, None, None) => continue,
            };
            let slot = s.slot_ptr(idx);
            let Some(v) = s.claim(slot) else { continue };
            if evicting {
                bump(&self.counters.evictions);
                // Age the bucket only when no slot was cold: every slot
                // loses what the victim had (a GCLOCK sweep in one step), so
                // favourites keep their lead and stale ones drift down.
                if victim_freq > 0 {
                    for j in first..first + ways {
                        let m = s.word(s.slot_ptr(j), W_META);
                        let f = m.load(Ordering::Relaxed);
                        m.store(f.saturating_sub(victim_freq), Ordering::Relaxed);
                    }
                }
            }
            // Under the claim the slot's state is settled: count a fill.
            let was = s.word(slot, W_LEN_FLAGS).load(Ordering::Relaxed);
            if (was >> 32) as u32 & FLAG_OCCUPIED == 0 {
                bump(&self.counters.occupancy);
            }
            let lf = ((FLAG_OCCUPIED as u64) << 32) | value.len() as u64;
            s.word(slot, W_KEY_LO).store(lo, Ordering::Relaxed);
            s.word(slot, W_KEY_HI).store(hi, Ordering::Relaxed);
            s.word(slot, W_TAG).store(tag, Ordering::Relaxed);
            s.word(slot, W_EXPIRES).store(expires_at, Ordering::Relaxed);
            s.word(slot, W_LEN_FLAGS).store(lf, Ordering::Relaxed);
            for (i, x) in value.iter().enumerate() {
                s.value_word(slot, i).store(x.to_bits(), Ordering::Relaxed);
            }
            s.word(slot, W_CHECKSUM).store(
                checksum(lo, hi, tag, expires_at, lf, value),
                Ordering::Relaxed,
            );
            if same.is_none() {
                // A newcomer starts cold: it must earn a hit to outlive the
                // next eviction in its bucket (keeps one-hit wonders out).
                s.word(slot, W_META).store(0, Ordering::Relaxed);
            }
            s.release(slot, v);
            bump(&self.counters.inserts);
            return true;
        }
        bump(&self.counters.insert_contended);
        false
    }

    /// Remove `key`; returns whether an entry was removed.
    pub fn remove(&self, key: &CacheKey) -> bool {
        let s = self.slots;
        let ways = s.geo.ways as u64;
        let first = self.bucket_of(key) * ways;
        let mut removed = false;
        for idx in first..first + ways {
            let slot = s.slot_ptr(idx);
            if s.word(slot, W_KEY_LO).load(Ordering::Relaxed) != key.lo()
                || s.word(slot, W_KEY_HI).load(Ordering::Relaxed) != key.hi()
            {
                continue;
            }
            if let Some(v) = self.claim_spin(slot) {
                // Re-check under the claim: the slot may have changed.
                if s.word(slot, W_KEY_LO).load(Ordering::Relaxed) == key.lo()
                    && s.word(slot, W_KEY_HI).load(Ordering::Relaxed) == key.hi()
                    && (s.word(slot, W_LEN_FLAGS).load(Ordering::Relaxed) >> 32) as u32
                        & FLAG_OCCUPIED
                        != 0
                {
                    s.clear_claimed(slot);
                    self.counters.occupancy.fetch_sub(1, Ordering::Relaxed);
                    removed = true;
                }
                s.release(slot, v);
            }
        }
        removed
    }

    // Maintenance paths (remove, purge) may wait a little for a writer.
    fn claim_spin(&self, slot: *mut u8) -> Option<u64> {
        for _ in 0..1000 {
            if let Some(v) = self.slots.claim(slot) {
                return Some(v);
            }
            std::hint::spin_loop();
        }
        None
    }

    /// Remove every entry stored with target tag `tag` (e.g. after the
    /// target's models change). O(slots). Returns how many were removed.
    pub fn purge_target(&self, tag: u64) -> u64 {
        self.purge_where(|t| t == tag)
    }

    /// Remove every entry whose target tag satisfies `pred`. O(slots).
    pub fn purge_where(&self, pred: impl Fn(u64) -> bool) -> u64 {
        let s = self.slots;
        let mut n = 0;
        for idx in 0..s.geo.slots() {
            let slot = s.slot_ptr(idx);
            let live = |s: &Slots| {
                (s.word(slot, W_LEN_FLAGS).load(Ordering::Relaxed) >> 32) as u32 & FLAG_OCCUPIED
                    != 0
                    && pred(s.word(slot, W_TAG).load(Ordering::Relaxed))
            };
            if !live(&s) {
                continue;
            }
            if let Some(v) = self.claim_spin(slot) {
                if live(&s) {
                    s.clear_claimed(slot);
                    n += 1;
                }
                s.release(slot, v);
            }
        }
        self.counters.purged.fetch_add(n, Ordering::Relaxed);
        self.counters.occupancy.fetch_sub(n, Ordering::Relaxed);
        n
    }

    /// Counters and occupancy: O(1), whatever the file size (occupancy is
    /// a counter kept by every path that fills or empties a slot).
    pub fn stats(&self) -> L2Stats {
        self.counters.snapshot(self.slots.geo.slots())
    }

    /// Write dirty pages back to the file (msync). Also done on drop.
    pub fn flush(&self) -> Result<(), String> {
        self.mmap
            .flush()
            .map_err(|e| format!("beast: L2 flush: {e}"))
    }
}

impl Drop for L2Cache {
    fn drop(&mut self) {
        if let Err(e) = self.flush() {
            eprintln!("{e}");
        }
    }
}

/// Describe a cache file: header, allocated bytes, occupancy, per-target-tag
/// counts. Checks the length against the header first, then reads the file
/// with plain reads (never maps it), so it needs only read access, cannot
/// be killed by a sparse file on a full disk, and may run beside a live
/// server (it sees a moving snapshot).
pub fn inspect(path: impl AsRef<Path>) -> Result<String, String> {
    use std::fmt::Write;
    let path = path.as_ref();
    let mut file =
        File::open(path).map_err(|e| format!("beast: cannot open {}: {e}", path.display()))?;
    // The header, and the file length against it, before anything else.
    let (h, _) = read_header(&mut file).map_err(|e| format!("beast: {}: {e}", path.display()))?;
    let geo = h.geometry;
    let allocated = {
        use std::os::unix::fs::MetadataExt;
        file.metadata().map(|m| m.blocks() * 512).unwrap_or(0)
    };
    // Plain reads, not a mapping: a hole in a sparse file on a full disk
    // reads as zeros instead of killing the process (a mapped tmpfs page
    // must be allocated even to be read).
    file.seek(SeekFrom::Start(HEADER_BYTES as u64))
        .map_err(|e| format!("beast: {}: {e}", path.display()))?;
    let slot_size = geo.slot_size as usize;
    let bucket_bytes = slot_size * geo.ways as usize;
    let per_chunk = ((4 << 20) / bucket_bytes).max(1) as u64;
    let mut chunk = vec![0u8; per_chunk as usize * bucket_bytes];
    let now = unix_now();
    let mut buf = vec![0f32; geo.value_f32_max as usize];
    let (mut live, mut odd, mut corrupt, mut expired) = (0u64, 0u64, 0u64, 0u64);
    let mut per_tag: std::collections::HashMap<u64, u64> = std::collections::HashMap::new();
    let mut bucket = 0;
    while bucket < geo.bucket_count {
        let n = per_chunk.min(geo.bucket_count - bucket) as usize;
        let bytes = &mut chunk[..n * bucket_bytes];
        file.read_exact(bytes)
            .map_err(|e| format!("beast: cannot read {}: {e}", path.display()))?;
        for slot in bytes.chunks_exact(slot_size) {
            match decode_slot(slot, &mut buf) {
                SlotState::Empty => {}
                SlotState::Odd => odd += 1,
                SlotState::Corrupt => corrupt += 1,
                SlotState::Live { tag, expires } => {
                    if expires != 0 && expires <= now {
                        expired += 1;
                    } else {
                        live += 1;
                        *per_tag.entry(tag).or_insert(0) += 1;
                    }
                }
            }
        }
        bucket += n as u64;
    }
    let slots = geo.slots();
    let mut o = String::new();
    let _ = writeln!(o, "file           {}", path.display());
    let _ = writeln!(o, "format         {}", h.format_version);
    let _ = writeln!(o, "created_unix   {}", h.created_unix);
    let _ = writeln!(o, "file_bytes     {}", geo.file_bytes);
    let _ = writeln!(
        o,
        "allocated      {allocated}{}",
        if allocated < geo.file_bytes {
            " (sparse: a server reserves the rest at start, or runs without L2)"
        } else {
            ""
        }
    );
    let _ = writeln!(o, "slot_size      {}", geo.slot_size);
    let _ = writeln!(o, "value_f32_max  {}", geo.value_f32_max);
    let _ = writeln!(o, "ways           {}", geo.ways);
    let _ = writeln!(o, "buckets        {}", geo.bucket_count);
    let _ = writeln!(o, "slots          {slots}");
    let _ = writeln!(
        o,
        "live           {live} ({:.2}%)",
        100.0 * live as f64 / slots as f64
    );
    let _ = writeln!(o, "expired        {expired}");
    let _ = writeln!(o, "odd            {odd}");
    let _ = writeln!(o, "corrupt        {corrupt}");
    let mut tags: Vec<(u64, u64)> = per_tag.into_iter().collect();
    tags.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let _ = writeln!(o, "targets        {}", tags.len());
    for (tag, n) in tags {
        let _ = writeln!(o, "  tag {tag:016x}  {n}");
    }
    Ok(o)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::key::{target_tag, KeyBuilder};

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("beast-l2-unit-{}-{name}", std::process::id()));
        let _ = std::fs::remove_file(&d);
        d
    }

    fn key(t: &str, i: u64) -> CacheKey {
        KeyBuilder::new(t).input(&i.to_le_bytes()).finish()
    }

    const CFG: L2Config = L2Config {
        total_bytes: 1 << 20,
        ways: 8,
        value_f32_max: 16,
    };

    #[test]
    fn cache_l2_geometry() {
        let g = Geometry::for_config(&CFG).unwrap();
        assert_eq!(g.slot_size, 128);
        assert_eq!(g.file_bytes, HEADER_BYTES as u64 + g.bucket_count * 8 * 128);
        assert!(g.file_bytes <= CFG.total_bytes);
        assert!(Geometry::for_config(&L2Config {
            total_bytes: 4096,
            ..CFG
        })
        .is_err());
        assert!(Geometry::for_config(&L2Config { ways: 0, ..CFG }).is_err());
        let h = encode_header(&g, 7);
        assert_eq!(decode_header(&h, g.file_bytes).unwrap().created_unix, 7);
        assert!(decode_header(&h, g.file_bytes + 1).is_err());
        let mut bad = h;
        bad[20] ^= 1;
        assert!(decode_header(&bad, g.file_bytes).is_err());
    }

    #[test]
    fn cache_l2_get_insert_remove() {
        let p = tmp("basic");
        let (c, r) = L2Cache::open(&p, CFG).unwrap();
        assert!(r.created);
        let mut out = [0f32; 16];
        let k = key("t", 1);
        assert_eq!(c.get(&k, &mut out), None);
        assert!(c.insert(&k, 1, &[1.0, 2.0, 3.0], 0));
        assert_eq!(c.get(&k, &mut out), Some(3));
        assert_eq!(&out[..3], &[1.0, 2.0, 3.0]);
        assert!(c.insert(&k, 1, &[4.0], 0));
        assert_eq!(c.get(&k, &mut out), Some(1));
        assert_eq!(out[0], 4.0);
        assert!(!c.insert(&k, 1, &[0.0; 17], 0), "too long");
        let mut short = [0f32; 0];
        assert_eq!(c.get(&k, &mut short), None);
        assert!(c.remove(&k));
        assert_eq!(c.get(&k, &mut out), None);
        let st = c.stats();
        assert_eq!((st.hits, st.inserts, st.occupancy), (2, 2, 0));
        drop(c);
        let _ = std::fs::remove_file(&p);
    }

    #[test]
    fn cache_l2_ttl_expiry() {
        let p = tmp("ttl");
        let (c, _) = L2Cache::open(&p, CFG).unwrap();
        let mut out = [0f32; 16];
        let (k1, k2) = (key("t", 1), key("t", 2));
        c.insert(&k1, 1, &[1.0], 1_000);
        c.insert(&k2, 1, &[2.0], 0);
        assert_eq!(c.get_at(&k1, &mut out, Some(999)), Some(1));
        assert_eq!(
            c.get_at(&k1, &mut out, Some(1_000)),
            None,
            "expired at its second"
        );
        assert_eq!(
            c.get_at(&k2, &mut out, Some(u64::MAX)),
            Some(1),
            "0 = never"
        );
        assert_eq!(c.get(&k1, &mut out), None, "wall clock is past 1000");
        let far = unix_now() + 3600;
        c.insert(&k1, 1, &[3.0], far);
        assert_eq!(c.get(&k1, &mut out), Some(1));
        assert_eq!(c.stats().expired, 2);
        drop(c);
        let _ = std::fs::remove_file(&p);
    }

    #[test]
    fn cache_l2_purge_target() {
        let p = tmp("purge");
        let (c, _) = L2Cache::open(&p, CFG).unwrap();
        let (ta, tb) = (target_tag("a"), target_tag("b"));
        for i in 0..100 {
            c.insert(&key("a", i), ta, &[i as f32], 0);
            c.insert(&key("b", i), tb, &[i as f32], 0);
        }
        let mut out = [0f32; 16];
        let before_b = (0..100)
            .filter(|&i| c.get(&key("b", i), &mut out).is_some())
            .count();
        let before_a = (0..100)
            .filter(|&i| c.get(&key("a", i), &mut out).is_some())
            .count();
        assert!(before_a > 90 && before_b > 90);
        assert_eq!(c.purge_target(ta), before_a as u64);
        assert_eq!(
            (0..100)
                .filter(|&i| c.get(&key("a", i), &mut out).is_some())
                .count(),
            0
        );
        let after_b = (0..100)
            .filter(|&i| c.get(&key("b", i), &mut out).is_some())
            .count();
        assert_eq!(after_b, before_b, "other target untouched");
        drop(c);
        let _ = std::fs::remove_file(&p);
    }
}
