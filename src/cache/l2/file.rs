//! The L2 file's lifecycle: open (lock, check, move a bad file aside),
//! create, reserve every block, map, the repair scan, flush and drop.

use super::layout::{
    encode_header, read_header, unix_now, Geometry, L2Config, OpenReport, HEADER_BYTES, W_SEQ,
};
use super::slots::{SlotState, Slots};
use super::L2Cache;
use crate::cache::metrics::L2Counters;
use memmap2::{MmapMut, MmapOptions};
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

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
