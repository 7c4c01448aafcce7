//! Loading a model repository folder: `<dir>/<model>/model.toml`,
//! `<dir>/<model>/<version>/weights.safetensors`, `<dir>/ensembles.toml`.
//! The format is documented in docs/MODELS.md.
//!
//! A weights file is read once into a buffer the process owns
//! ([`WeightsBuf`]), never mapped: overwriting or truncating the file in
//! place while the server runs cannot reach a loaded model. FP16 weights are
//! used from that buffer without a copy, each an `F16Storage::Window` into it
//! (the header is parsed by the `safetensors` crate, which validates the
//! offsets). F32 weights are converted once into owned FP16. The model's
//! digest (xxh3-128 of `model.toml` and the weights bytes) is taken from the
//! same bytes the model is built from. Nothing is trusted: every
//! shape, dtype and value is checked, a bad model/version/ensemble is refused
//! with a one-line error naming the file and the field, and the rest load.
//!
//! The loader runs no inference and knows nothing of backends or ensemble
//! policies: an ensemble's `calibration` rows are only parsed as a file
//! name here; the cascade threshold is derived from them by a start-up
//! step of its own, `ensemble::calibrate::calibrate_cascades`.

use super::manifest::{self, ModelManifest};
use super::rollout::{read_rollout, RolloutSpec};
use super::trees::{self, manifest::ModelKind};
pub use super::versions::ScanFilter;
use super::weights::load_weights;
pub use super::weights::{model_digest, ACCEPTED_DTYPES};
use super::{BatchLimits, EnsembleSpec, Model};
use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::sync::Arc;

/// Everything loaded from one repository folder.
#[derive(Debug, Default)]
pub struct Repository {
    /// Model name → loaded versions, ascending by version.
    pub models: BTreeMap<String, Vec<Arc<Model>>>,
    pub ensembles: BTreeMap<String, EnsembleSpec>,
    /// One line per model/version/ensemble that was refused, naming the
    /// file and field (already logged; kept for /v1/models and tests).
    pub errors: Vec<String>,
    /// How many of `errors` refused a model folder or version, and how
    /// many an ensemble (or `ensembles.toml` as a whole).
    pub refused_models: usize,
    pub refused_ensembles: usize,
    /// Things skipped without refusing anything (a folder that is not a
    /// version number); already logged.
    pub warnings: Vec<String>,
    /// Model name → its rollout (`rollout.toml`), the candidate resolved
    /// to a version served beside at least one other.
    pub rollouts: BTreeMap<String, RolloutSpec>,
}

impl Repository {
    /// The requested version, or the latest when `None`.
    pub fn model(&self, name: &str, version: Option<u32>) -> Option<&Arc<Model>> {
        let versions = self.models.get(name)?;
        match version {
            None => versions.last(),
            Some(v) => versions.iter().find(|m| m.version == v),
        }
    }

    fn refuse(&mut self, e: String) {
        eprintln!("beast: refused: {e}");
        self.errors.push(e);
    }

    /// Refuse an ensemble after load (a start-up step found it unusable:
    /// `ensemble::calibrate`): remove it and record `e`, which names the
    /// file and field, as one more refused ensemble.
    pub fn refuse_ensemble(&mut self, name: &str, e: String) {
        self.ensembles.remove(name);
        self.refuse(e);
        self.refused_ensembles += 1;
    }

    fn warn(&mut self, w: String) {
        eprintln!("beast: warning: {w}");
        self.warnings.push(w);
    }
}

/// The name of the weights file inside a version folder.
pub const WEIGHTS_FILE: &str = "weights.safetensors";

/// Load every model and ensemble under `dir`. A bad model, version or
/// ensemble is refused (recorded in `errors`) while the rest load; only an
/// unreadable `dir` is an error.
pub fn load_repository(dir: &Path, defaults: &BatchLimits) -> Result<Repository, String> {
    load_repository_filtered(dir, defaults, &ScanFilter::default())
}

/// [`load_repository`] less what `filter` leaves out. Folders whose name
/// starts with a dot are never read: a version is written as `.tmp-3` and
/// renamed to `3` once complete (docs/MODELS.md).
pub fn load_repository_filtered(
    dir: &Path,
    defaults: &BatchLimits,
    filter: &ScanFilter,
) -> Result<Repository, String> {
    let mut repo = Repository::default();
    let rd = fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut model_dirs = Vec::new();
    for entry in rd {
        let entry = entry.map_err(|e| format!("{}: {e}", dir.display()))?;
        let path = entry.path();
        // Files at the top level (ensembles.toml, evaluation data) are not models.
        if !path.is_dir() {
            continue;
        }
        match entry.file_name().into_string() {
            Ok(name) if name.starts_with('.') => {}
            Ok(name) => model_dirs.push(name),
            Err(_) => repo.warn(format!(
                "{}: folder name is not UTF-8, ignored",
                path.display()
            )),
        }
    }
    model_dirs.sort();
    for name in model_dirs {
        if !filter.skip.contains(&name) {
            load_model_dir(&mut repo, dir, &name, defaults, filter);
        }
    }
    repo.refused_models = repo.errors.len();
    load_ensembles(&mut repo, dir);
    repo.refused_ensembles = repo.errors.len() - repo.refused_models;
    if repo.models.is_empty() && repo.errors.is_empty() {
        repo.refuse(format!(
            "{}: empty repository (no <model>/model.toml found)",
            dir.display()
        ));
    }
    Ok(repo)
}

/// A model folder's `model.toml`, by kind.
enum Manifest {
    Mlp(ModelManifest),
    Trees(trees::manifest::TreesManifest),
}

fn load_model_dir(
    repo: &mut Repository,
    dir: &Path,
    name: &str,
    defaults: &BatchLimits,
    filter: &ScanFilter,
) {
    let mdir = dir.join(name);
    let toml_path = mdir.join("model.toml");
    let text = match fs::read_to_string(&toml_path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return repo.refuse(format!(
                "{}: missing (every model folder needs one)",
                toml_path.display()
            ));
        }
        Err(e) => return repo.refuse(format!("{}: {e}", toml_path.display())),
    };
    // `kind = "trees"`: a gradient-boosted tree model (model/trees).
    let man = match trees::manifest::declared_kind(&text).and_then(|k| match k {
        ModelKind::Mlp => manifest::parse_model_manifest(&text, defaults).map(Manifest::Mlp),
        ModelKind::Trees => trees::manifest::parse(&text, defaults).map(Manifest::Trees),
    }) {
        Ok(m) => m,
        Err(e) => return repo.refuse(format!("{}: {e}", toml_path.display())),
    };
    let rd = match fs::read_dir(&mdir) {
        Ok(r) => r,
        Err(e) => return repo.refuse(format!("{}: {e}", mdir.display())),
    };
    let mut versions: Vec<u32> = Vec::new();
    for entry in rd.flatten() {
        let path = entry.path();
        if !path.is_dir() {
            continue;
        }
        let fname = entry.file_name();
        let s = fname.to_string_lossy();
        if s.starts_with('.') {
            continue;
        }
        match s.parse::<u32>() {
            // Only canonical spellings: "01" and "1" would otherwise be the same version.
            Ok(v) if v >= 1 && v.to_string() == s => versions.push(v),
            _ => repo.warn(format!(
                "{}: not a version folder (a positive integer), ignored",
                path.display()
            )),
        }
    }
    versions.sort_unstable();
    if versions.is_empty() {
        return repo.refuse(format!(
            "{}: no versions found (expected <model>/<N>/{WEIGHTS_FILE}, N a positive integer)",
            mdir.display()
        ));
    }
    // Tree models have no `versions` key: every version folder is served.
    let policy = match &man {
        Manifest::Mlp(m) => m.versions.clone(),
        Manifest::Trees(_) => super::versions::VersionPolicy::All,
    };
    let (mut chosen, missing) = policy.select(&versions);
    for v in missing {
        repo.refuse(format!(
            "{}: version {v} is pinned by versions in model.toml but {} does not exist",
            toml_path.display(),
            mdir.join(v.to_string()).display()
        ));
    }
    for (n, v) in &filter.add_versions {
        if n == name && versions.contains(v) && !chosen.contains(v) {
            chosen.push(*v);
        }
    }
    chosen.retain(|v| !filter.skip_versions.contains(&(name.to_string(), *v)));
    chosen.sort_unstable();
    let mut loaded = Vec::new();
    for v in chosen {
        let (wpath, model) = match &man {
            Manifest::Mlp(m) => {
                let p = mdir.join(v.to_string()).join(WEIGHTS_FILE);
                let r = load_weights(&p, name, v, m, text.as_bytes());
                (p, r)
            }
            Manifest::Trees(t) => {
                let p = mdir.join(v.to_string()).join(t.format.file_name());
                let r = trees::manifest::load_version(&p, name, v, t, text.as_bytes());
                (p, r)
            }
        };
        match model {
            Ok(m) => loaded.push(Arc::new(m)),
            Err(e) => repo.refuse(format!("{}: {e}", wpath.display())),
        }
    }
    if !loaded.is_empty() {
        match read_rollout(&mdir, &loaded) {
            Ok(None) => {}
            Ok(Some(r)) => {
                repo.rollouts.insert(name.to_string(), r);
            }
            Err(e) => repo.refuse(e),
        }
        repo.models.insert(name.to_string(), loaded);
    }
}

fn load_ensembles(repo: &mut Repository, dir: &Path) {
    let path = dir.join("ensembles.toml");
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
        Err(e) => return repo.refuse(format!("{}: {e}", path.display())),
    };
    let entries = match manifest::parse_ensembles(&text) {
        Ok(e) => e,
        Err(e) => return repo.refuse(format!("{}: {e}", path.display())),
    };
    for (name, spec) in entries {
        match spec.and_then(|s| check_ensemble(repo, s)) {
            Ok(s) => {
                repo.ensembles.insert(name, s);
            }
            Err(e) => repo.refuse(format!("{}: {e}", path.display())),
        }
    }
}

/// Checks that need the loaded models: members exist, widths agree, no name clash.
fn check_ensemble(repo: &Repository, spec: EnsembleSpec) -> Result<EnsembleSpec, String> {
    let path = format!("ensembles.{}", spec.name);
    if repo.models.contains_key(&spec.name) {
        return Err(format!(
            "{path}: name collides with a model of the same name (the ensemble is refused)"
        ));
    }
    let mut first: Option<&Arc<Model>> = None;
    for (i, m) in spec.members.iter().enumerate() {
        if spec.members[..i].contains(m) {
            return Err(format!(
                "{path}.members[{i}]: \"{m}\" is listed more than once (use weights to weigh it more)"
            ));
        }
        let Some(model) = repo.model(m, None) else {
            return Err(format!(
                "{path}.members[{i}]: unknown model \"{m}\" (not in the repository, or refused)"
            ));
        };
        if let Some(f) = first {
            if model.input_width != f.input_width || model.output_width != f.output_width {
                return Err(format!(
                    "{path}.members[{i}]: \"{m}\" is {}→{} but \"{}\" is {}→{} (members must agree on input and output widths)",
                    model.input_width, model.output_width, f.name, f.input_width, f.output_width
                ));
            }
            if model.task != f.task {
                return Err(format!(
                    "{path}.members[{i}]: \"{m}\" is a {} model but \"{}\" is a {} model (members must agree on the task)",
                    task_name(model.task), f.name, task_name(f.task)
                ));
            }
            if !model.io.classes.is_empty()
                && !f.io.classes.is_empty()
                && model.io.classes != f.io.classes
            {
                return Err(format!(
                    "{path}.members[{i}]: \"{m}\" names its classes {:?} but \"{}\" {:?} (members must agree on class names)",
                    model.io.classes, f.name, f.io.classes
                ));
            }
        } else {
            first = Some(model);
        }
    }
    if let Some(f) = first {
        check_task_fit(&spec, f.task).map_err(|e| format!("{path}.{e}"))?;
    }
    Ok(spec)
}

fn task_name(t: super::Task) -> &'static str {
    match t {
        super::Task::Classification => "classification",
        super::Task::Regression => "regression",
    }
}

/// A regression ensemble combines values: mean, weighted mean or median;
/// policies that need class probabilities (cascade's confidence, the
/// bandit's right/wrong feedback) are refused, and so is a calibration.
/// Errors start with the field name.
pub fn check_task_fit(spec: &EnsembleSpec, task: super::Task) -> Result<(), String> {
    use super::Policy;
    let what = task_name(task);
    if !spec.combiner.fits(task) {
        let name = serde_json::to_value(spec.combiner).unwrap_or_default();
        return Err(format!(
            "combiner: {name} does not fit a {what} ensemble (its members are {what} models; {})",
            if task == super::Task::Regression {
                "use mean, weighted_mean or median"
            } else {
                "median is for regression"
            }
        ));
    }
    if !spec.selection.policy.fits(task) {
        let name = match spec.selection.policy {
            Policy::Cascade => "cascade",
            _ => "bandit",
        };
        return Err(format!(
            "policy: \"{name}\" needs class probabilities (a confidence, or feedback with a class label); a regression ensemble takes all or deadline"
        ));
    }
    if task == super::Task::Regression && spec.selection.cascade_target_agreement.is_some() {
        return Err(
            "cascade_target_agreement: a regression ensemble has no cascade to calibrate".into(),
        );
    }
    Ok(())
}

#[cfg(test)]
#[path = "load_tests.rs"]
mod tests;
