//! `beast cache inspect`: a read-only report on an L2 file.

use super::layout::{read_header, unix_now, HEADER_BYTES};
use super::slots::{decode_slot, SlotState};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

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
