//! `[learning]`: sharing learned selection state between nodes
//! (docs/SELECTION.md, "Learned state shared between nodes").

use super::Config;
use serde::Deserialize;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LearningSettings {
    /// Publish what this node learned from feedback and merge every
    /// node's, through Redis. Absent: each node learns alone.
    pub share: Option<ShareSettings>,
}

/// `[learning.share]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShareSettings {
    /// `redis://HOST:PORT`; "" = `cache.l3.url`.
    pub url: String,
    /// This node's name in Redis; "" = `<hostname>:<listen port>`. Must be
    /// stable across restarts (a restarted node reads its own counters
    /// back under it) and unique among nodes.
    pub node_id: String,
    /// How often the node publishes its counters and merges everyone's.
    pub interval_ms: u64,
}

impl Default for ShareSettings {
    fn default() -> Self {
        ShareSettings {
            url: String::new(),
            node_id: String::new(),
            interval_ms: 1000,
        }
    }
}

/// Longest node id.
pub const NODE_ID_MAX: usize = 128;

impl Config {
    /// The Redis URL learned state is shared through, when sharing is on.
    pub fn share_url(&self) -> Option<String> {
        let s = self.learning.share.as_ref()?;
        if !s.url.is_empty() {
            return Some(s.url.clone());
        }
        // A Redis Cluster L3 (`cluster_seeds`) is not a default: the node
        // keys are read with one MGET, which a cluster refuses across slots.
        self.cache
            .l3
            .as_ref()
            .filter(|l3| l3.cluster_seeds.is_empty())
            .map(|l3| l3.url.clone())
    }

    /// This node's id: `learning.share.node_id`, or `<hostname>:<port>`
    /// of the address the shards listen on.
    pub fn share_node_id(&self, port: u16) -> String {
        match self.learning.share.as_ref() {
            Some(s) if !s.node_id.is_empty() => s.node_id.clone(),
            _ => format!("{}:{port}", hostname()),
        }
    }

    pub(super) fn validate_learning(&self, check: &mut impl FnMut(bool, &str)) {
        let Some(s) = &self.learning.share else {
            return;
        };
        match self.share_url() {
            None => check(
                false,
                "learning.share.url: required when cache.l3 is not configured or is a Redis Cluster \
                 (a standalone redis://HOST:PORT)",
            ),
            Some(u) => check(
                u.starts_with("redis://") || u.starts_with("valkey://"),
                "learning.share.url: must be redis://HOST:PORT (or valkey://HOST:PORT)",
            ),
        }
        check(
            s.node_id.len() <= NODE_ID_MAX
                && s.node_id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._:-".contains(c)),
            "learning.share.node_id: at most 128 characters of A-Z a-z 0-9 . _ : -",
        );
        check(
            (50..=3_600_000).contains(&s.interval_ms),
            "learning.share.interval_ms: must be within 50..=3600000",
        );
    }
}

/// This machine's host name (`gethostname`), "localhost" if unknown.
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is ours and its length is passed.
    let r = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let n = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let h: String = String::from_utf8_lossy(&buf[..n])
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || "._-".contains(*c))
        .collect();
    if r != 0 || h.is_empty() {
        "localhost".into()
    } else {
        h
    }
}
