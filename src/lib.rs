//! beast: a bare-metal inference server.
//!
//! The request path, module by module:
//!
//! ```text
//! server (socket, frame) ─▶ wire (verify, decode) ─▶ cache ─▶ ensemble (select members)
//!        ─▶ batch (per-model queue) ─▶ backend (CPU FP16 / CUDA) ─▶ ensemble (combine;
//!        a cascade may enqueue its next member) ─▶ wire (encode) ─▶ server (write)
//! ```
//!
//! Feedback messages go server ─▶ wire ─▶ ensemble (learn) ─▶ wire ─▶ server.
//!
//! - [`server`]: shards (one glommio executor per core), listeners, the
//!   connection loop — the only place that drives a request from start to end.
//! - [`wire`]: flatbuffers schema, framing, encode/decode; knows nothing of models.
//! - [`model`]: repository format and loading (shards share the loaded
//!   `Repository` through an `Arc`; `server::lifecycle` reloads it without
//!   a restart).
//! - [`batch`]: per-model bounded queues and the batching policy.
//! - [`backend`]: the `Backend` trait and its CPU implementation.
//! - [`ensemble`]: combiners, per-request member selection (cascade,
//!   deadline, bandit), feedback and what is learned from it (docs/SELECTION.md).
//! - [`metrics`]: per-core counters and histograms.
//! - [`client`]: the Rust clients: one connection (`Client`) and several nodes (`Cluster`, docs/CLIENT.md).
//! - [`config`]: every limit and default, validated once.

pub mod backend;
pub mod batch;
pub mod cache;
pub mod cli;
pub mod client;
pub mod config;
pub mod ensemble;
pub mod import;
pub mod metrics;
pub mod model;
pub mod server;
pub mod wire;
