//! The slot area of the mapping: every access through atomics, one seqlock
//! per slot (protocol in the parent module's docs), and the slot checksum.

use super::layout::{
    Geometry, FLAG_OCCUPIED, HEADER_BYTES, READ_RETRIES, SLOT_HEADER_BYTES, W_CHECKSUM, W_EXPIRES,
    W_KEY_HI, W_KEY_LO, W_LEN_FLAGS, W_META, W_SEQ, W_TAG,
};
use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};
use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

/// Raw view of the slot area: a base pointer and the geometry. Every load
/// and store goes through atomics.
#[derive(Clone, Copy)]
pub(super) struct Slots {
    pub(super) base: *mut u8,
    pub(super) geo: Geometry,
}

/// What a full read of one slot found (scans: open, inspect).
pub(super) enum SlotState {
    Empty,
    Odd,
    Corrupt,
    Live { tag: u64, expires: u64 },
}

pub(super) fn checksum(
    lo: u64,
    hi: u64,
    tag: u64,
    expires: u64,
    len_flags: u64,
    value: &[f32],
) -> u64 {
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
pub(super) fn decode_slot(b: &[u8], buf: &mut [f32]) -> SlotState {
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
    pub(super) fn slot_ptr(&self, idx: u64) -> *mut u8 {
        debug_assert!(idx < self.geo.slots());
        // SAFETY: idx < slots, and HEADER + slots·slot_size == file_bytes,
        // the length of the mapping, so the offset stays inside it.
        unsafe {
            self.base
                .add(HEADER_BYTES + idx as usize * self.geo.slot_size as usize)
        }
    }

    #[inline]
    pub(super) fn word(&self, slot: *mut u8, w: usize) -> &AtomicU64 {
        // SAFETY: slot is 64-aligned inside the mapping (page-aligned base,
        // 4096-byte header, slot_size a multiple of 64), w < 8, so the
        // 8 bytes are in bounds and aligned. The mapping lives as long as
        // `self` is used (the owner keeps it), and all access to these bytes
        // is atomic, so handing out `&AtomicU64` is sound.
        unsafe { &*(slot.add(w * 8) as *const AtomicU64) }
    }

    #[inline]
    pub(super) fn value_word(&self, slot: *mut u8, i: usize) -> &AtomicU32 {
        debug_assert!(i < self.geo.value_f32_max as usize);
        // SAFETY: i < value_f32_max, so 64 + 4i + 4 ≤ slot_size; aligned to 4.
        // Same lifetime and all-atomic argument as `word`.
        unsafe { &*(slot.add(SLOT_HEADER_BYTES + i * 4) as *const AtomicU32) }
    }

    /// Read a whole slot consistently (scan path). `buf` holds value_f32_max.
    pub(super) fn read_any(&self, idx: u64, buf: &mut [f32]) -> SlotState {
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
    pub(super) fn claim(&self, slot: *mut u8) -> Option<u64> {
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
    pub(super) fn release(&self, slot: *mut u8, s: u64) {
        self.word(slot, W_SEQ)
            .store(s.wrapping_add(2), Ordering::Release);
    }

    /// Mark a claimed slot empty.
    pub(super) fn clear_claimed(&self, slot: *mut u8) {
        self.word(slot, W_LEN_FLAGS).store(0, Ordering::Relaxed);
        self.word(slot, W_CHECKSUM).store(0, Ordering::Relaxed);
        self.word(slot, W_META).store(0, Ordering::Relaxed);
    }
}
