//! Every limit and default in one place, validated once at start-up.
//!
//! A config file (`--config FILE`, TOML) may set any field; command-line
//! flags override it. Unknown keys are refused so a typo is not silently
//! ignored. Relations between limits are checked in [`Config::validate`].

use crate::backend::cuda::Precision;
use crate::backend::{BackendChoice, BackendKind};
use crate::model::BatchLimits;
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// Most members an ensemble may have (responses carry per-member run info
/// in a fixed-size array, so this is a compile-time bound).
pub const ENSEMBLE_MEMBERS_MAX: usize = 16;

/// Longest connection timeout (`frame_timeout_ms`, `idle_timeout_ms`,
/// `write_stall_timeout_ms`): one day.
pub const TIMEOUT_MS_MAX: u64 = 24 * 3600 * 1000;

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address every shard listens on (SO_REUSEPORT). Port 0 picks a free port.
    pub listen: String,
    /// CPUs to run one shard each on; empty: every online CPU.
    pub cores: Vec<usize>,
    /// Pin each shard's thread to its CPU.
    pub pin_shards: bool,
    /// Model repository folder.
    pub models_dir: PathBuf,
    /// Open connections per shard; beyond it new connections are closed at once.
    pub connections_per_shard_max: usize,
    /// Largest frame body accepted; a larger declared length closes the connection.
    pub frame_bytes_max: usize,
    /// Requests in flight on one connection; beyond it: OVERLOADED.
    pub in_flight_per_connection_max: usize,
    /// Rows in one request.
    pub rows_per_request_max: usize,
    /// Ensemble requests in flight per shard (each holds one accumulator); beyond it: OVERLOADED.
    pub ensemble_in_flight_per_shard_max: usize,
    /// A request without a deadline whose predicted queue wait exceeds this
    /// (µs) is answered OVERLOADED at once; 0: never (requests with a
    /// deadline are refused when the prediction exceeds their budget).
    pub queue_wait_max_us: u64,
    /// Initial receive buffer per connection; it grows (once) up to
    /// `frame_bytes_max + 4` only if a larger frame arrives.
    pub read_buffer_bytes: usize,
    /// Answer bytes one connection may hold: encoded and not yet written,
    /// plus room for the answer of every request in flight (each counted
    /// at the largest answer the server's targets can give). A hard bound:
    /// at it the server stops reading that connection until its peer reads
    /// (backpressure). `write_buffer_bytes_max` is its former name.
    #[serde(alias = "write_buffer_bytes_max")]
    pub pending_bytes_per_connection_max: usize,
    /// A frame whose first bytes arrived must be complete within this;
    /// beyond it the connection is closed (after answering what is in flight).
    pub frame_timeout_ms: u64,
    /// A connection with nothing in flight that receives nothing for this
    /// long is closed.
    pub idle_timeout_ms: u64,
    /// A connection whose peer reads none of its pending answers for this
    /// long is closed (the peer is not reading).
    pub write_stall_timeout_ms: u64,
    /// glommio's registered I/O memory per shard. Kept small so the server
    /// runs under the default 8 MiB memlock limit as a non-root user.
    pub io_memory_bytes: usize,
    /// Connections receive and send through the shard's own io_uring
    /// (`DEFER_TASKRUN`: no interrupt per arriving packet, one syscall per
    /// turn for every connection; src/server/uring.rs); false: through
    /// glommio's streams. Falls back to glommio's streams (with a log
    /// line) where the kernel refuses such a ring.
    pub uring_sockets: bool,
    /// How long a graceful shutdown waits for in-flight requests.
    pub shutdown_grace_ms: u64,
    /// SIGTERM drains first: `/readyz` answers 503 at once while requests
    /// are still served for this many seconds, then the server stops
    /// (0: stop at once). `POST /v1/drain` does the same on demand.
    pub drain_s: f64,
    /// Rescan the repository every this many seconds and apply what
    /// changed (0: only on SIGHUP or `POST /v1/repository/reload`).
    pub repository_poll_s: f64,
    /// Batching defaults for models whose model.toml does not set them.
    pub batch: BatchDefaults,
    /// Admin HTTP port (/metrics, /healthz, /readyz, /v1/models, /v1/stats,
    /// /debug/trace), served by a plain thread off the shards. "" or "off"
    /// disables it; port 0 picks a free port.
    pub admin_listen: String,
    /// Fraction of requests (0..=1) whose stage timings go into the trace
    /// ring; 0 turns tracing off (no ring is allocated).
    pub trace_sample_rate: f64,
    /// Trace records kept per shard (oldest overwritten), when tracing is on.
    pub trace_ring_records: usize,
    /// The prediction cache.
    pub cache: CacheSettings,
    /// Recent ensemble answers per shard that feedback can name by ticket
    /// (a ring: older tickets expire and read NOT_FOUND).
    pub feedback_window: usize,
    /// Distinct request domains per ensemble and shard that get their own
    /// counters and learned state; later domains share the default one.
    pub selection_domains_max: usize,
    /// File (one per shard: `<path>.<shard>`) where learned selection state
    /// is saved on clean shutdown and read at start; "" = not kept.
    pub selection_state_path: PathBuf,
    /// Sharing learned selection state between nodes (`[learning.share]`).
    pub learning: LearningSettings,
    /// Answer `/readyz` 200 even when a model or ensemble was refused at
    /// load (the rest is served either way); by default a refusal keeps
    /// the server not ready, with the refusals as the reason.
    pub ready_with_refused: bool,
    /// Deadline-policy ensemble requests whose deadline the straggler
    /// cutoff watches per shard (its heap also holds answered requests
    /// until their deadline passes). `None`: 2 × `ensemble_in_flight_per_shard_max`.
    /// Must be >= `ensemble_in_flight_per_shard_max`; below 2× that the
    /// heap is purged of answered requests more often (CPU, not correctness).
    pub deadline_heap_max: Option<usize>,
    /// Which backend computes: `auto` (CUDA if it starts, else CPU), `cpu`
    /// or `cuda` (CPU with one log line if CUDA does not start). Default
    /// `auto` when built with the `cuda` feature, `cpu` otherwise.
    /// `BEAST_BACKEND` overrides it, `beast serve --backend` overrides both.
    pub backend: String,
    /// CUDA device ordinal (`BEAST_CUDA_DEVICE` overrides it).
    pub cuda_device: usize,
    /// `split` (f32-level accuracy) or `half` (activations in FP16): see
    /// docs/CUDA.md (`BEAST_CUDA_PRECISION` overrides it).
    pub cuda_precision: String,
    /// Models whose weights the CUDA backend keeps on the device (per
    /// shard); the least recently used is dropped for another one.
    pub cuda_models_max: usize,
    /// Test only: when > 0 the CPU backend's batches complete this many µs
    /// after the previous one (`backend::delayed`), as a device's would, so
    /// the asynchronous batcher can be tested without a GPU. 0 (default)
    /// in production.
    pub backend_test_delay_us: u64,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BatchDefaults {
    pub max_batch: usize,
    pub min_batch: usize,
    pub max_queue_delay_us: u64,
    pub queue_rows_max: usize,
}

impl Default for BatchDefaults {
    fn default() -> Self {
        let d = BatchLimits::default();
        BatchDefaults {
            max_batch: d.max_batch,
            min_batch: d.min_batch,
            max_queue_delay_us: d.max_queue_delay_us,
            queue_rows_max: d.queue_rows_max,
        }
    }
}

impl BatchDefaults {
    pub fn limits(&self) -> BatchLimits {
        BatchLimits {
            max_batch: self.max_batch,
            min_batch: self.min_batch,
            max_queue_delay_us: self.max_queue_delay_us,
            queue_rows_max: self.queue_rows_max,
        }
    }
}

/// The repository that ships with the project (digits ensemble).
pub fn default_models_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models")
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "127.0.0.1:7878".to_string(),
            cores: Vec::new(),
            pin_shards: true,
            models_dir: default_models_dir(),
            connections_per_shard_max: 4096,
            frame_bytes_max: 4 << 20,
            in_flight_per_connection_max: 1024,
            rows_per_request_max: 1024,
            ensemble_in_flight_per_shard_max: 16384,
            queue_wait_max_us: 0,
            feedback_window: 65536,
            selection_domains_max: 64,
            selection_state_path: PathBuf::new(),
            learning: LearningSettings::default(),
            read_buffer_bytes: 64 << 10,
            pending_bytes_per_connection_max: 8 << 20,
            frame_timeout_ms: 10_000,
            idle_timeout_ms: 300_000,
            write_stall_timeout_ms: 10_000,
            io_memory_bytes: 512 << 10,
            uring_sockets: true,
            shutdown_grace_ms: 10_000,
            drain_s: 0.0,
            repository_poll_s: 0.0,
            batch: BatchDefaults::default(),
            admin_listen: "127.0.0.1:9464".to_string(),
            trace_sample_rate: 0.0,
            trace_ring_records: 16384,
            cache: CacheSettings::default(),
            ready_with_refused: false,
            deadline_heap_max: None,
            backend: default_backend().to_string(),
            cuda_device: 0,
            cuda_precision: "split".to_string(),
            cuda_models_max: crate::backend::cuda::MODELS_MAX_DEFAULT,
            backend_test_delay_us: 0,
        }
    }
}

/// `auto` when built with the `cuda` feature, `cpu` otherwise.
pub fn default_backend() -> &'static str {
    if cfg!(feature = "cuda") {
        "auto"
    } else {
        "cpu"
    }
}

/// The environment variables that override the backend fields (docs/CUDA.md).
pub const BACKEND_ENV: [(&str, &str); 3] = [
    ("BEAST_BACKEND", "backend"),
    ("BEAST_CUDA_DEVICE", "cuda_device"),
    ("BEAST_CUDA_PRECISION", "cuda_precision"),
];

impl Config {
    /// Read a TOML config file; errors name the file (and the field, via toml's message).
    pub fn from_file(path: &Path) -> Result<Config, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// The CPUs shards run on.
    pub fn shard_cpus(&self) -> Vec<usize> {
        if !self.cores.is_empty() {
            return self.cores.clone();
        }
        let n = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        (0..n).collect()
    }

    /// The admin port's address; `None` when it is disabled.
    pub fn admin_addr(&self) -> Result<Option<std::net::SocketAddr>, String> {
        match self.admin_listen.trim() {
            "" | "off" => Ok(None),
            a => a
                .parse()
                .map(Some)
                .map_err(|e| format!("admin_listen {a}: {e}")),
        }
    }

    /// Waiters the coalescer holds per shard, all keys together.
    pub fn coalesce_waiters_max(&self) -> usize {
        self.cache
            .coalesce_waiters_max
            .unwrap_or(self.cache.coalesce_keys_max.saturating_mul(4))
    }

    /// Capacity of the straggler cutoff's deadline heap per shard.
    pub fn deadline_heap_max(&self) -> usize {
        self.deadline_heap_max
            .unwrap_or(self.ensemble_in_flight_per_shard_max.saturating_mul(2))
    }

    /// The backend fields as the backend module takes them.
    pub fn backend_choice(&self) -> Result<BackendChoice, String> {
        let kind = match self.backend.as_str() {
            "auto" => BackendKind::Auto,
            "cpu" => BackendKind::Cpu,
            "cuda" => BackendKind::Cuda,
            other => {
                return Err(format!(
                    "backend: unknown backend {other:?} (auto, cpu, cuda)"
                ))
            }
        };
        let cuda_precision = Precision::from_name(&self.cuda_precision).ok_or_else(|| {
            format!(
                "cuda_precision: unknown precision {:?} (split, half)",
                self.cuda_precision
            )
        })?;
        Ok(BackendChoice {
            kind,
            cuda_device: self.cuda_device,
            cuda_precision,
            cuda_models_max: self.cuda_models_max,
            test_delay_us: self.backend_test_delay_us,
        })
    }

    /// Apply the backend environment variables (`BEAST_BACKEND`,
    /// `BEAST_CUDA_DEVICE`, `BEAST_CUDA_PRECISION`; `var` reads one): each
    /// one set overrides its config field. Returns a line per override, for
    /// the log; a value that cannot be read is an error naming the variable.
    pub fn apply_backend_env(
        &mut self,
        var: impl Fn(&str) -> Option<String>,
    ) -> Result<Vec<String>, String> {
        let mut applied = Vec::new();
        for (name, field) in BACKEND_ENV {
            let Some(v) = var(name) else { continue };
            let bad = |expected: &str| format!("{name}={v:?}: expected {expected}");
            match field {
                "backend" if ["auto", "cpu", "cuda"].contains(&v.as_str()) => {
                    self.backend = v.clone()
                }
                "backend" => return Err(bad("auto, cpu or cuda")),
                "cuda_device" => {
                    self.cuda_device = v.parse().map_err(|_| bad("a device ordinal (0, 1, ...)"))?
                }
                _ if Precision::from_name(&v).is_some() => self.cuda_precision = v.clone(),
                _ => return Err(bad("split or half")),
            }
            applied.push(format!("{name}={v} overrides the config's {field}"));
        }
        Ok(applied)
    }

    /// Check every limit and the relations between them, once.
    pub fn validate(&self) -> Result<(), String> {
        let mut errs = Vec::new();
        let mut check = |ok: bool, msg: &str| {
            if !ok {
                errs.push(msg.to_string());
            }
        };
        check(
            self.listen.parse::<std::net::SocketAddr>().is_ok(),
            "listen: expected ADDR:PORT, e.g. 127.0.0.1:7878",
        );
        let ncpu = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        check(
            self.cores.iter().all(|&c| c < ncpu.max(1024)),
            "cores: CPU index out of range",
        );
        let mut sorted = self.cores.clone();
        sorted.sort_unstable();
        sorted.dedup();
        check(sorted.len() == self.cores.len(), "cores: duplicate CPU");
        check(
            self.drain_s.is_finite() && (0.0..=3600.0).contains(&self.drain_s),
            "drain_s: must be within 0..=3600 seconds",
        );
        check(
            self.repository_poll_s.is_finite() && (0.0..=86400.0).contains(&self.repository_poll_s),
            "repository_poll_s: must be within 0..=86400 seconds (0: off)",
        );
        check(
            self.connections_per_shard_max >= 1,
            "connections_per_shard_max: must be >= 1",
        );
        check(
            self.frame_bytes_max >= 1024,
            "frame_bytes_max: must be >= 1024",
        );
        check(
            self.frame_bytes_max <= 1 << 30,
            "frame_bytes_max: must be <= 1 GiB",
        );
        check(
            (1..=1 << 24).contains(&self.feedback_window),
            "feedback_window: must be in 1..=16777216",
        );
        check(
            (1..=1 << 16).contains(&self.selection_domains_max),
            "selection_domains_max: must be in 1..=65536",
        );
        check(
            self.in_flight_per_connection_max >= 1,
            "in_flight_per_connection_max: must be >= 1",
        );
        check(
            self.rows_per_request_max >= 1,
            "rows_per_request_max: must be >= 1",
        );
        check(
            self.ensemble_in_flight_per_shard_max >= 1,
            "ensemble_in_flight_per_shard_max: must be >= 1",
        );
        check(
            self.read_buffer_bytes >= 4096,
            "read_buffer_bytes: must be >= 4096",
        );
        check(
            self.pending_bytes_per_connection_max >= self.frame_bytes_max,
            "pending_bytes_per_connection_max: must be >= frame_bytes_max (a frame-sized answer must fit; the models' largest answers are checked at start)",
        );
        for (v, name) in [
            (self.frame_timeout_ms, "frame_timeout_ms"),
            (self.idle_timeout_ms, "idle_timeout_ms"),
            (self.write_stall_timeout_ms, "write_stall_timeout_ms"),
        ] {
            check(
                (1..=TIMEOUT_MS_MAX).contains(&v),
                &format!("{name}: must be in 1..={TIMEOUT_MS_MAX} (1 ms to 1 day)"),
            );
        }
        check(
            self.io_memory_bytes >= 64 << 10,
            "io_memory_bytes: must be >= 64 KiB",
        );
        check(self.batch.max_batch >= 1, "batch.max_batch: must be >= 1");
        check(
            self.batch.min_batch >= 1 && self.batch.min_batch <= self.batch.max_batch,
            "batch.min_batch: must be >= 1 and <= batch.max_batch",
        );
        check(
            self.batch.queue_rows_max >= self.batch.max_batch,
            "batch.queue_rows_max: must be >= batch.max_batch",
        );
        check(
            self.batch.max_queue_delay_us <= 1_000_000,
            "batch.max_queue_delay_us: must be <= 1 s",
        );
        check(
            self.admin_addr().is_ok(),
            "admin_listen: expected ADDR:PORT, \"\" or \"off\"",
        );
        check(
            (0.0..=1.0).contains(&self.trace_sample_rate),
            "trace_sample_rate: must be within 0..=1",
        );
        check(
            (1..=1 << 22).contains(&self.trace_ring_records),
            "trace_ring_records: must be within 1..=4194304",
        );
        check(
            (1..=64).contains(&self.cache.l1_ways),
            "cache.l1_ways: must be in 1..=64",
        );
        check(
            self.cache.l1_entries >= self.cache.l1_ways,
            "cache.l1_entries: must be >= cache.l1_ways (one whole set)",
        );
        check(
            (1..=1 << 30).contains(&self.coalesce_waiters_max()),
            "cache.coalesce_waiters_max: must be in 1..=1073741824",
        );
        check(
            self.cache.coalesce_waiters_per_key_max <= 1 << 30,
            "cache.coalesce_waiters_per_key_max: must be <= 1073741824",
        );
        check(
            self.deadline_heap_max() >= self.ensemble_in_flight_per_shard_max
                && self.deadline_heap_max() <= 1 << 30,
            "deadline_heap_max: must be >= ensemble_in_flight_per_shard_max (every ensemble request in flight must fit) and <= 1073741824",
        );
        if let Err(e) = self.backend_choice() {
            check(false, &e);
        }
        check(
            (1..=4096).contains(&self.cuda_models_max),
            "cuda_models_max: must be in 1..=4096",
        );
        check(
            self.backend_test_delay_us <= 1_000_000,
            "backend_test_delay_us: must be <= 1000000 (test only; every warm-up batch waits it too)",
        );
        check(
            (1..=1024).contains(&self.cache.value_f32_max),
            "cache.value_f32_max: must be in 1..=1024",
        );
        check(
            self.cache.l2_path.as_os_str().is_empty() || self.cache.l2_bytes >= 1 << 20,
            "cache.l2_bytes: must be >= 1 MiB",
        );
        if let Some(l3) = &self.cache.l3 {
            let scheme = |u: &str| u.starts_with("redis://") || u.starts_with("valkey://");
            if l3.cluster_seeds.is_empty() {
                check(
                    scheme(&l3.url),
                    "cache.l3.url: must be redis://HOST:PORT (or valkey://HOST:PORT)",
                );
            } else {
                check(
                    l3.url.is_empty(),
                    "cache.l3: url and cluster_seeds are exclusive (a standalone server or a cluster)",
                );
                check(
                    l3.cluster_seeds.iter().all(|u| scheme(u)),
                    "cache.l3.cluster_seeds: each must be redis://HOST:PORT (or valkey://HOST:PORT)",
                );
            }
            check(
                (10..=1_000_000).contains(&l3.lookup_budget_us),
                "cache.l3.lookup_budget_us: must be within 10..=1000000",
            );
        }
        check(
            self.cache.coalesce_keys_max >= 1 && self.cache.coalesce_waiters_per_key_max >= 1,
            "cache.coalesce_keys_max and cache.coalesce_waiters_per_key_max: must be >= 1",
        );
        self.validate_learning(&mut check);
        if errs.is_empty() {
            Ok(())
        } else {
            Err(format!("invalid config: {}", errs.join("; ")))
        }
    }
}

#[path = "config_cache.rs"]
mod cache;
pub use cache::{CacheSettings, L3Lookup, L3Settings, TargetCache};

#[path = "config_learning.rs"]
mod learning;
pub use learning::{LearningSettings, ShareSettings};

#[cfg(test)]
#[path = "config_tests.rs"]
mod tests;
