//! Prediction cache: what the server consults before computing.
//!
//! Owns the cache key ([`key`]), the per-core L1 table ([`l1`]), the shared
//! persistent L2 file ([`l2`]), coalescing of identical in-flight misses
//! ([`coalesce`]) and their counters ([`metrics`]). It knows nothing of
//! sockets, the server or the wire protocol: callers pass keys and `f32`
//! slices. Layout, protocol and tuning: docs/CACHE.md.
//!
//! Request path: build a [`CacheKey`] → [`L1Cache::get`] → [`L2Cache::get`]
//! (on a hit, fill L1) → [`Coalescer::begin`] (leader computes, followers
//! wait) → compute → [`L2Cache::insert`] + [`L1Cache::insert`] →
//! [`Coalescer::complete`] drains the waiters.

pub mod coalesce;
pub mod key;
pub mod l1;
pub mod l2;
pub mod l3;
mod l3_conn;
pub mod metrics;
pub mod names;

pub use coalesce::{Begin, CoalesceConfig, Coalescer, Drain};
pub use key::{input_digest, target_tag, CacheKey, KeyBuilder};
pub use l1::{L1Cache, L1Config};
pub use l2::{inspect, unix_now, Geometry, L2Cache, L2Config, OpenReport};
pub use metrics::{CoalesceStats, L1Stats, L2Stats};
