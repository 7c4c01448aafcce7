//! Start-up step: calibrate the cascades of a loaded repository.
//!
//! Owns: turning `cascade_target_agreement` + `calibration` (an ensemble's
//! CSV of feature rows) into its `cascade_threshold`. Every member runs
//! over the rows on the CPU backend, then [`cascade::calibrate`] picks the
//! smallest threshold that agrees with `all` often enough. It runs after
//! the model loader ([`crate::model::load`], which never runs inference)
//! and before the shards start; `beast serve` shows it on `/readyz` as
//! `starting: calibrating cascades`.

use super::cascade;
use crate::backend::Backend;
use crate::model::load::Repository;
use crate::model::{Combiner, EnsembleSpec, Model};
use std::fs;
use std::path::Path;
use std::sync::Arc;

/// Calibrate every ensemble of `repo` (loaded from `dir`) that asks for it.
/// One whose calibration file is missing or malformed, or whose rows do
/// not fit its members, is refused like a bad ensemble at load: removed,
/// and a line naming `ensembles.toml`, the field and the file is recorded
/// in `repo.errors` (and counted in `refused_ensembles`).
pub fn calibrate_cascades(repo: &mut Repository, dir: &Path) {
    let names: Vec<String> = repo
        .ensembles
        .iter()
        .filter(|(_, s)| s.selection.cascade_target_agreement.is_some())
        .map(|(n, _)| n.clone())
        .collect();
    let toml = dir.join("ensembles.toml");
    for name in names {
        match calibrate_one(repo, dir, &repo.ensembles[&name]) {
            Ok(None) => {}
            Ok(Some(t)) => {
                if let Some(s) = repo.ensembles.get_mut(&name) {
                    s.selection.cascade_threshold = t;
                }
            }
            Err(e) => repo.refuse_ensemble(&name, format!("{}: {e}", toml.display())),
        }
    }
}

/// `cascade_target_agreement`: run every member over the calibration rows
/// and return the smallest threshold whose cascade agrees with `all` on at
/// least that fraction of them (`None` when the ensemble does not ask).
fn calibrate_one(
    repo: &Repository,
    dir: &Path,
    spec: &EnsembleSpec,
) -> Result<Option<f32>, String> {
    let sel = &spec.selection;
    let (Some(target), Some(file)) = (sel.cascade_target_agreement, sel.calibration.as_ref())
    else {
        return Ok(None);
    };
    let path = format!("ensembles.{}.calibration", spec.name);
    let file = dir.join(file);
    let text = fs::read_to_string(&file).map_err(|e| format!("{path}: {}: {e}", file.display()))?;
    let (x, width) = cascade::read_calibration_csv(&text)
        .map_err(|e| format!("{path}: {}: {e}", file.display()))?;
    let models: Vec<&Arc<Model>> = spec
        .members
        .iter()
        .filter_map(|m| repo.model(m, None))
        .collect();
    // The loader refuses an ensemble with an unknown member, so this only
    // guards a repository built by hand.
    let Some(&first) = models
        .first()
        .filter(|_| models.len() == spec.members.len())
    else {
        return Err(format!("{path}: a member is not loaded"));
    };
    if width != first.input_width {
        return Err(format!(
            "{path}: {} has {width} feature columns, the members take {}",
            file.display(),
            first.input_width
        ));
    }
    let rows = x.len() / width;
    let cols = first.output_width;
    let mut backend = crate::backend::cpu::CpuBackend::new();
    let mut outputs = Vec::new();
    for m in &models {
        let mut out = vec![0.0; rows * cols];
        // As the batcher does: the member's own input transform first.
        let mut xm = x.clone();
        if let Some(pre) = &m.io.preprocess {
            pre.apply(&mut xm, width);
        }
        backend
            .run(m, &xm, rows, &mut out)
            .map_err(|e| format!("{path}: running {}: {e}", m.name))?;
        outputs.push(out);
    }
    let flops: Vec<u64> = models.iter().map(|m| m.flops_per_row()).collect();
    let mut by_cost: Vec<u8> = (0..models.len() as u8).collect();
    by_cost.sort_by_key(|&i| flops[i as usize]);
    let weights = match spec.combiner {
        Combiner::WeightedMean => spec.weights.clone(),
        _ => vec![1.0; models.len()],
    };
    let (t, agreement, ran) = cascade::calibrate(
        &outputs,
        &by_cost,
        spec.combiner,
        &weights,
        cols,
        sel.cascade_metric,
        target,
    );
    eprintln!(
        "beast: ensembles.{}: cascade threshold {t:.3} from {rows} calibration rows: agreement with all {:.2}% (target {:.2}%), {ran:.2} members per row",
        spec.name,
        agreement * 100.0,
        target * 100.0
    );
    Ok(Some(t))
}

#[cfg(test)]
#[path = "calibrate_tests.rs"]
mod tests;
