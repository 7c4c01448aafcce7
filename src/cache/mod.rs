//! Prediction cache (a later issue): fingerprints, L1 per core, L2 mmap, coalescing.
