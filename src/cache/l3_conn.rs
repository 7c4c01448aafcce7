//! The L3 thread's connection to Redis (`crate::cache::l3`): one
//! standalone server or a Redis Cluster, behind the same three calls
//! (connect, look up many keys, write many values), all synchronous: only
//! the `beast-l3` thread calls them.
//!
//! Standalone: one `MGET` per batch of lookups, one pipeline of `SET … EX`
//! per batch of fills. Cluster (`cache.l3.cluster_seeds`, the `redis`
//! crate's `cluster` feature): keys are spread over the 16384 hash slots
//! (no hash tags: an answer's key is its own slot), so one `MGET` cannot
//! carry them; a batch is one cluster pipeline of `GET`s (or `SET`s),
//! which the crate groups per master, writes to every master, then reads
//! back — one round trip to each master holding a key of the batch, in
//! parallel. A `MOVED`/`ASK` reply (resharding, failover) makes the crate
//! refresh its slot map and retry that key; a master that does not answer
//! is an error, and the breaker opens as for a standalone server.

use super::CacheKey;
use redis::cluster::{cluster_pipe, ClusterClient, ClusterConnection};
use redis::RedisResult;
use std::time::Duration;

/// What the I/O thread needs from the config.
#[derive(Clone, Debug)]
pub struct L3Config {
    /// The standalone server's URL; for a cluster, its seeds joined with
    /// `,` (the name in logs and /readyz).
    pub url: String,
    /// Seeds of a Redis Cluster (empty: `url` is one standalone server).
    pub cluster_seeds: Vec<String>,
    /// Expiry of entries written (0 = none; a target's own `ttl_s` wins).
    pub ttl_s: u64,
    pub lookup_budget: Duration,
    pub shards: usize,
    /// Look up every request, not only those whose compute is predicted to
    /// take longer than an L3 round trip.
    pub always: bool,
}

/// How to reach the L3 tier.
pub(super) enum Client {
    Single(redis::Client),
    Cluster(ClusterClient),
}

/// An open connection (with its read and write timeouts set).
pub(super) enum Con {
    Single(redis::Connection),
    Cluster(Box<ClusterConnection>),
}

/// The Redis key of a cache key: a prefix and the 16 key bytes.
pub(super) fn redis_key(key: CacheKey) -> [u8; 20] {
    let mut k = [0u8; 20];
    k[..4].copy_from_slice(b"bl3:");
    k[4..].copy_from_slice(&key.0.to_le_bytes());
    k
}

impl Client {
    /// Parse the URL or seeds (no connection yet).
    pub fn open(cfg: &L3Config, io_timeout: Duration) -> Result<Client, String> {
        if cfg.cluster_seeds.is_empty() {
            return redis::Client::open(cfg.url.as_str())
                .map(Client::Single)
                .map_err(|e| format!("cache.l3.url '{}': {e}", cfg.url));
        }
        ClusterClient::builder(cfg.cluster_seeds.iter().map(String::as_str))
            .connection_timeout(io_timeout)
            .response_timeout(io_timeout)
            // A key whose slot moved is retried once after the slot map is
            // refreshed; a master that is down is the breaker's business,
            // not a reason to sleep and retry on the L3 thread.
            .retries(1)
            .build()
            .map(Client::Cluster)
            .map_err(|e| {
                format!(
                    "cache.l3.cluster_seeds '{}': {e}",
                    cfg.cluster_seeds.join(",")
                )
            })
    }

    /// Connect (to a cluster: to a seed, then read its slot map), set the
    /// timeouts and `PING`.
    pub fn connect(&self, t: Duration) -> RedisResult<Con> {
        match self {
            Client::Single(client) => {
                let mut c = client.get_connection_with_timeout(t)?;
                c.set_read_timeout(Some(t))?;
                c.set_write_timeout(Some(t))?;
                redis::cmd("PING").query::<String>(&mut c)?;
                Ok(Con::Single(c))
            }
            Client::Cluster(client) => {
                let mut c = client.get_connection()?;
                c.set_read_timeout(Some(t))?;
                c.set_write_timeout(Some(t))?;
                // Every master answers: a cluster with a master down is
                // not used (its keys would fail every batch).
                if !c.check_connection() {
                    return Err(redis::RedisError::from((
                        redis::ErrorKind::Io,
                        "a cluster master does not answer PING",
                    )));
                }
                Ok(Con::Cluster(Box::new(c)))
            }
        }
    }
}

impl Con {
    /// The values under `keys`, in order (`None`: absent).
    pub fn get_many(
        &mut self,
        keys: impl Iterator<Item = CacheKey>,
    ) -> RedisResult<Vec<Option<Vec<u8>>>> {
        match self {
            Con::Single(c) => {
                let mut cmd = redis::cmd("MGET");
                for k in keys {
                    cmd.arg(&redis_key(k)[..]);
                }
                cmd.query(c)
            }
            Con::Cluster(c) => {
                let mut p = cluster_pipe();
                for k in keys {
                    p.cmd("GET").arg(&redis_key(k)[..]);
                }
                p.query(c)
            }
        }
    }

    /// Write `(key, value, ttl_s)` for each entry (ttl 0: no expiry).
    pub fn put_many(&mut self, puts: &[(CacheKey, Vec<u8>, u64)]) -> RedisResult<()> {
        match self {
            Con::Single(c) => {
                let mut p = redis::pipe();
                for put in puts {
                    p.add_command(set_cmd(put)).ignore();
                }
                p.query::<()>(c)
            }
            Con::Cluster(c) => {
                let mut p = cluster_pipe();
                for put in puts {
                    p.add_command(set_cmd(put)).ignore();
                }
                p.query::<()>(c)
            }
        }
    }
}

/// `SET key value [EX ttl]` (ttl 0: no expiry).
fn set_cmd((k, v, ttl): &(CacheKey, Vec<u8>, u64)) -> redis::Cmd {
    let mut cmd = redis::cmd("SET");
    cmd.arg(&redis_key(*k)[..]).arg(&v[..]);
    if *ttl > 0 {
        cmd.arg("EX").arg(*ttl);
    }
    cmd
}
