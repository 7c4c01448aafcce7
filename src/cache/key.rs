//! Cache keys: a 128-bit xxh3 fingerprint of everything that decides a
//! prediction — the target name, each model involved with its exact version
//! and content digest (xxh3-128 of its `model.toml` and weights bytes, taken
//! once at load), the ensemble definition fingerprint, and the input's
//! dtype, shape and bytes.
//!
//! Because versions and digests are inside the key, a new model version, or
//! new weights written into an existing version folder, can never be served
//! a stale answer (from L1, or from an L2 file kept across restarts): its
//! keys are simply different. An ensemble's key has every member's.
//!
//! Every field is folded into a 64-bit chain with its one-byte tag and its
//! length in the seed, so two different field sequences do not hash alike
//! (`("ab","c")` vs `("a","bc")`); the input bytes are hashed once to a
//! 128-bit digest (shared by every key of the request), which is then
//! hashed with xxh3-128 seeded by that chain.
//!
//! # Collision probability
//!
//! xxh3-128 is not cryptographic, but its output is well distributed. With
//! `n` distinct keys alive the birthday bound gives a probability of any
//! collision of about `n² / 2^129`. The metadata chain is 64 bits: two
//! different (target, versions, shape, generation) combinations collide
//! with probability ~2^-64 per pair, and there are at most a few thousand
//! such combinations in a deployment (~10^-13 in all). For `n = 10^9` live keys that is about
//! `1.5 · 10^-21`; a collision would serve the prediction of another input,
//! so the cache should not be used where an adversary can choose inputs to
//! collide on purpose (xxh3 is not collision-resistant against an attacker).
//!
//! The builder never allocates: it is two words on the stack.

use xxhash_rust::xxh3::{xxh3_128, xxh3_128_with_seed, xxh3_64, xxh3_64_with_seed};

/// A 128-bit fingerprint of (target, models, input).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default, PartialOrd, Ord)]
pub struct CacheKey(pub u128);

impl CacheKey {
    /// Low 64 bits.
    #[inline]
    pub fn lo(self) -> u64 {
        self.0 as u64
    }
    /// High 64 bits.
    #[inline]
    pub fn hi(self) -> u64 {
        (self.0 >> 64) as u64
    }
    /// Rebuild from the two halves (as stored in the L2 file).
    #[inline]
    pub fn from_parts(lo: u64, hi: u64) -> Self {
        CacheKey(((hi as u128) << 64) | lo as u128)
    }
}

/// The 128-bit digest of a request's input bytes (xxh3-128), the part of
/// every key built from that input.
#[inline]
pub fn input_digest(bytes: &[u8]) -> u128 {
    xxh3_128(bytes)
}

/// The 64-bit tag of a target name, stored beside each L2 entry so that
/// [`crate::cache::L2Cache::purge_target`] can drop one target's entries.
#[inline]
pub fn target_tag(target: &str) -> u64 {
    xxh3_64(target.as_bytes())
}

// Field tags: one byte before each field, so field boundaries are part of
// the hashed stream.
const TAG_TARGET: u8 = 1;
const TAG_MODEL: u8 = 2;
const TAG_ENSEMBLE: u8 = 3;
const TAG_SHAPE: u8 = 4;
const TAG_INPUT: u8 = 5;
const TAG_GENERATION: u8 = 6;

/// Allocation-free key builder.
///
/// Each metadata field (target, models, ensemble fingerprint, generation,
/// shape) is folded into a 64-bit chain with one-shot xxh3-64, seeded by the
/// chain so far and by the field's tag and length; the input's 128-bit
/// digest ([`input_digest`]) is then hashed with xxh3-128 seeded by the
/// chain. One-shot hashing of small
/// fields is several times cheaper than a streaming state (measured in
/// benches/cache.rs, "build a key"), and it is on every cache lookup.
///
/// ```
/// use beast::cache::KeyBuilder;
/// let input = [0u8; 16];
/// let key = KeyBuilder::new("fraud")
///     .model("fraud_mlp", 2, 0x5eed)
///     .shape(1, 4, 1)
///     .input(&input)
///     .finish();
/// assert_ne!(key.0, 0);
/// ```
#[derive(Clone, Copy)]
pub struct KeyBuilder {
    /// The metadata chain.
    acc: u64,
    /// The input's 128-bit hash, and the chain value it was taken at.
    input: Option<(u128, u64)>,
}

/// Fold one field into the chain: its tag and length are in the seed, so
/// field boundaries and kinds are part of what is hashed.
#[inline]
fn absorb(acc: u64, tag: u8, bytes: &[u8]) -> u64 {
    let seed = acc.rotate_left(7) ^ ((tag as u64) << 56) ^ (bytes.len() as u64);
    xxh3_64_with_seed(bytes, seed)
}

impl KeyBuilder {
    /// Start a key for `target` (a model or ensemble name as the client asked).
    #[inline]
    pub fn new(target: &str) -> Self {
        KeyBuilder {
            acc: absorb(0, TAG_TARGET, target.as_bytes()),
            input: None,
        }
    }

    /// One model involved in the answer, with its exact version and its
    /// content digest ([`crate::model::Model::digest`]). Call once per
    /// member, in a fixed order (the ensemble's member order).
    ///
    /// Version and digest go in as one 16-byte field (the digest folded to
    /// 64 bits, like the rest of the metadata chain): one xxh3-64 call on
    /// 16 bytes costs what the former 8-byte version field did.
    #[inline]
    pub fn model(mut self, name: &str, version: u64, digest: u128) -> Self {
        self.acc = absorb(self.acc, TAG_MODEL, name.as_bytes());
        let fold = (digest as u64) ^ ((digest >> 64) as u64);
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&version.to_le_bytes());
        b[8..].copy_from_slice(&fold.to_le_bytes());
        self.acc = absorb(self.acc, TAG_MODEL, &b);
        self
    }

    /// The fingerprint of an ensemble definition (members, versions,
    /// combiner, policy) computed by the caller when the ensemble is loaded.
    #[inline]
    pub fn ensemble(mut self, fingerprint: u64) -> Self {
        self.acc = absorb(self.acc, TAG_ENSEMBLE, &fingerprint.to_le_bytes());
        self
    }

    /// The target's purge generation: bumping it (an admin purge) makes
    /// every older entry of the target unreachable on every core at once.
    #[inline]
    pub fn generation(mut self, generation: u64) -> Self {
        self.acc = absorb(self.acc, TAG_GENERATION, &generation.to_le_bytes());
        self
    }

    /// Input shape and dtype (the caller's dtype tag, e.g. the wire enum value).
    #[inline]
    pub fn shape(mut self, rows: u32, cols: u32, dtype_tag: u8) -> Self {
        let mut b = [0u8; 9];
        b[0..4].copy_from_slice(&rows.to_le_bytes());
        b[4..8].copy_from_slice(&cols.to_le_bytes());
        b[8] = dtype_tag;
        self.acc = absorb(self.acc, TAG_SHAPE, &b);
        self
    }

    /// The raw input bytes.
    #[inline]
    pub fn input(self, bytes: &[u8]) -> Self {
        self.input_digest(input_digest(bytes))
    }

    /// The input by its [`input_digest`]: a request whose input goes into
    /// several keys (an ensemble and each of its members) hashes it once.
    #[inline]
    pub fn input_digest(mut self, digest: u128) -> Self {
        let seed = self.acc.rotate_left(7) ^ ((TAG_INPUT as u64) << 56) ^ 16;
        let h = xxh3_128_with_seed(&digest.to_le_bytes(), seed);
        self.acc = absorb(self.acc, TAG_INPUT, &h.to_le_bytes());
        self.input = Some((h, self.acc));
        self
    }

    /// The 128-bit key.
    #[inline]
    pub fn finish(self) -> CacheKey {
        match self.input {
            // Nothing was added after the input: its hash is the key.
            Some((h, at)) if at == self.acc => CacheKey(h),
            _ => CacheKey(xxh3_128_with_seed(&[], self.acc)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(t: &str, m: &str, v: u64, input: &[u8]) -> CacheKey {
        KeyBuilder::new(t)
            .model(m, v, 7)
            .shape(1, input.len() as u32 / 4, 1)
            .input(input)
            .finish()
    }

    #[test]
    fn cache_key_deterministic_and_sensitive() {
        let a = k("t", "m", 1, &[1, 2, 3, 4]);
        assert_eq!(a, k("t", "m", 1, &[1, 2, 3, 4]));
        assert_ne!(a, k("t", "m", 2, &[1, 2, 3, 4]), "version must change key");
        assert_ne!(a, k("u", "m", 1, &[1, 2, 3, 4]), "target must change key");
        assert_ne!(a, k("t", "n", 1, &[1, 2, 3, 4]), "model must change key");
        assert_ne!(a, k("t", "m", 1, &[1, 2, 3, 5]), "input must change key");
        let d = |digest: u128| {
            KeyBuilder::new("t")
                .model("m", 1, digest)
                .shape(1, 1, 1)
                .input(&[1, 2, 3, 4])
                .finish()
        };
        assert_eq!(a, d(7));
        assert_ne!(a, d(8), "the digest must change the key");
        assert_ne!(a, d(7 | 1 << 100), "every half of the digest counts");
        let s1 = KeyBuilder::new("t").shape(2, 1, 1).input(&[0; 8]).finish();
        let s2 = KeyBuilder::new("t").shape(1, 2, 1).input(&[0; 8]).finish();
        assert_ne!(s1, s2, "shape must change key");
        let d = KeyBuilder::new("t").shape(1, 2, 2).input(&[0; 8]).finish();
        assert_ne!(s2, d, "dtype must change key");
    }

    #[test]
    fn cache_key_field_boundaries() {
        let a = KeyBuilder::new("ab").model("c", 1, 0).finish();
        let b = KeyBuilder::new("a").model("bc", 1, 0).finish();
        assert_ne!(a, b);
        let e1 = KeyBuilder::new("t").ensemble(7).finish();
        let e2 = KeyBuilder::new("t").ensemble(8).finish();
        assert_ne!(e1, e2);
        // Order matters, and a field after the input still counts.
        let o1 = KeyBuilder::new("t")
            .model("m", 1, 0)
            .shape(1, 2, 0)
            .finish();
        let o2 = KeyBuilder::new("t")
            .shape(1, 2, 0)
            .model("m", 1, 0)
            .finish();
        assert_ne!(o1, o2);
        let i1 = KeyBuilder::new("t").input(&[1, 2]).finish();
        let i2 = KeyBuilder::new("t").input(&[1, 2]).generation(1).finish();
        assert_ne!(i1, i2);
        assert_ne!(
            KeyBuilder::new("t").input(&[]).finish(),
            KeyBuilder::new("t").finish()
        );
        // A digest taken once builds the same key as the bytes themselves.
        let x = [9u8; 40];
        assert_eq!(
            KeyBuilder::new("t").model("m", 1, 0).input(&x).finish(),
            KeyBuilder::new("t")
                .model("m", 1, 0)
                .input_digest(input_digest(&x))
                .finish()
        );
        let kk = CacheKey(0x0123_4567_89ab_cdef_fedc_ba98_7654_3210);
        assert_eq!(CacheKey::from_parts(kk.lo(), kk.hi()), kk);
    }
}
