//! The registry shards read from. Today: one immutable `Repository` shared by
//! `Arc`; hot reload swaps it atomically (a later issue).
