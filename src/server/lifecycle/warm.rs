//! Warm-up of a new generation's new models, on a backend of the loader's
//! own (never a shard's): a batch at each batch size up to the model's
//! largest (powers of two beyond 64), every output finite, and the
//! latency profile (best of three at the profile's batch sizes) that the
//! shards' deadline policy and admission start from.

use crate::backend;
use crate::config::Config;
use crate::ensemble::feedback::Window;
use crate::ensemble::profile::LatencyProfile;
use crate::model::load::Repository;
use crate::model::Model;
use crate::server::registry::{Prebuilt, ProfileSeeds, Registry};
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Instant;

/// Warm up every model of `repo` that `old` does not hold (same `Arc`);
/// the profiles of the others are carried over.
pub(super) fn warm_up(
    cfg: &Config,
    repo: &Repository,
    old: &Registry,
) -> Result<ProfileSeeds, String> {
    let mut seeds = ProfileSeeds::new();
    let mut backend = None;
    for versions in repo.models.values() {
        for m in versions {
            let key = (m.name.clone(), m.version, m.digest);
            let kept = old
                .repo
                .models
                .get(&m.name)
                .is_some_and(|v| v.iter().any(|o| Arc::ptr_eq(o, m)));
            if kept {
                if let Some(p) = old.profiles.get(&key) {
                    seeds.insert(key, *p);
                }
                continue;
            }
            if backend.is_none() {
                backend = Some(backend::select(&cfg.backend_choice()?));
            }
            let b = backend.as_mut().expect("set above");
            let us = warm_one(b.as_mut(), m, &cfg.models_dir)?;
            seeds.insert(key, us);
        }
    }
    Ok(seeds)
}

fn warm_one(
    b: &mut dyn backend::Backend,
    m: &Model,
    dir: &std::path::Path,
) -> Result<[f32; 3], String> {
    let file = dir
        .join(&m.name)
        .join(m.version.to_string())
        .join(crate::model::load::WEIGHTS_FILE);
    let max = m.batch.max_batch.max(1);
    let input = vec![0.0f32; max * m.input_width];
    let mut output = vec![0.0f32; max * m.output_width];
    let mut run = |n: usize, output: &mut [f32]| -> Result<f32, String> {
        let t = Instant::now();
        b.run(
            m,
            &input[..n * m.input_width],
            n,
            &mut output[..n * m.output_width],
        )
        .map_err(|e| format!("{}: warm-up at batch {n} failed: {e}", file.display()))?;
        let us = t.elapsed().as_secs_f32() * 1e6;
        if let Some(j) = output[..n * m.output_width]
            .iter()
            .position(|x| !x.is_finite())
        {
            return Err(format!(
                "{}: warm-up at batch {n}: output {j} is {} (a zero input must give finite outputs)",
                file.display(),
                output[j]
            ));
        }
        Ok(us)
    };
    let mut sizes: Vec<usize> = (1..=max.min(64)).collect();
    let mut n = 128;
    while n < max {
        sizes.push(n);
        n *= 2;
    }
    if max > 64 {
        sizes.push(max);
    }
    for n in sizes {
        run(n, &mut output)?;
    }
    let mut profile = LatencyProfile::new(max);
    for i in 0..3 {
        let size = profile.sizes[i] as usize;
        let best = (0..3)
            .map(|_| run(size, &mut output))
            .collect::<Result<Vec<f32>, String>>()?
            .into_iter()
            .fold(f32::INFINITY, f32::min);
        profile.set(i, best);
    }
    Ok(profile.us)
}

/// The large buffers each shard's next version needs (queue rings, the
/// feedback window), allocated and touched here so that the shards only
/// move them in (docs/MODELS.md "Lifecycle").
pub(super) fn prebuild(cfg: &Config, repo: &Repository) -> Vec<Mutex<Option<Prebuilt>>> {
    let stride = repo
        .ensembles
        .values()
        .filter_map(|e| {
            let w = repo.model(e.members.first()?, None)?.output_width;
            Some(e.members.len() * w)
        })
        .max()
        .unwrap_or(0);
    let window_cap = if repo.ensembles.is_empty() {
        1
    } else {
        cfg.feedback_window
    };
    (0..cfg.shard_cpus().len())
        .map(|shard| {
            let rings = repo
                .models
                .values()
                .flatten()
                .map(|m| touched(m.batch.queue_rows_max * m.input_width))
                .collect();
            let window = Window::new(shard, window_cap, stride);
            Mutex::new(Some(Prebuilt {
                rings,
                window: Some(window),
            }))
        })
        .collect()
}

/// `n` zeros, every page written once (faulted in here, not on a shard).
fn touched(n: usize) -> Vec<f32> {
    let mut v = vec![0.0f32; n];
    for i in (0..n).step_by(1024) {
        // SAFETY: i < n = v.len().
        unsafe { std::ptr::write_volatile(v.as_mut_ptr().add(i), 0.0) };
    }
    v
}
