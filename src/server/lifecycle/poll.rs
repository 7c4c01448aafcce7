//! `repository_poll_s`: a thread that fingerprints the repository (the
//! name, size and modification time of every entry down to the weights
//! files, and `ensembles.toml`) and rescans when the fingerprint changes.
//! A refused change is not tried again until the files change again. The
//! first poll always rescans, so a change made while the server was
//! starting is not missed.

use super::{Change, Lifecycle};
use std::fs;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

pub(super) fn spawn(l: &Arc<Lifecycle>) {
    let every = Duration::from_secs_f64(l.cfg.repository_poll_s);
    let l = l.clone();
    let _ = std::thread::Builder::new()
        .name("beast-poll".into())
        .spawn(move || {
            let dir = l.cfg.models_dir.clone();
            // No baseline taken here: the shards serve before this thread
            // runs, so files changed between the start-up load and a
            // fingerprint taken now would never be seen. The first poll
            // rescans once (usually "nothing changed") and sets it.
            let mut last = Vec::new();
            loop {
                let mut slept = Duration::ZERO;
                while slept < every {
                    if l.stopped() {
                        return;
                    }
                    let step = Duration::from_millis(50).min(every - slept);
                    std::thread::sleep(step);
                    slept += step;
                }
                let now = fingerprint(&dir);
                if now != last {
                    last = now;
                    let _ = l.apply(&Change::Rescan, "repository poll");
                }
            }
        });
}

/// (path, length, modified) of every entry three levels down, sorted.
fn fingerprint(dir: &Path) -> Vec<(String, u64, Option<std::time::SystemTime>)> {
    let mut out = Vec::new();
    walk(dir, 3, &mut out);
    out.sort();
    out
}

fn walk(dir: &Path, depth: u32, out: &mut Vec<(String, u64, Option<std::time::SystemTime>)>) {
    let Ok(rd) = fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let Ok(md) = e.metadata() else {
            continue;
        };
        out.push((e.path().display().to_string(), md.len(), md.modified().ok()));
        if md.is_dir() && depth > 1 {
            walk(&e.path(), depth - 1, out);
        }
    }
}
