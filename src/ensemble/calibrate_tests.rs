//! Tests of the cascade calibration step on the committed `models/` folder
//! and on bad calibration data.

use super::*;
use crate::model::load::{load_repository, WEIGHTS_FILE};
use crate::model::BatchLimits;

/// The repository as `beast serve` has it once start-up is past the
/// calibration step.
fn load_and_calibrate(dir: &Path) -> Repository {
    let mut repo = load_repository(dir, &BatchLimits::default()).unwrap();
    calibrate_cascades(&mut repo, dir);
    repo
}

#[test]
fn the_model_loader_leaves_the_threshold_to_calibration() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("models");
    let repo = load_repository(&dir, &BatchLimits::default()).unwrap();
    let c = &repo.ensembles["digits_cascade"].selection;
    assert_eq!(c.cascade_target_agreement, Some(0.995));
    assert_eq!(c.cascade_threshold, 0.9, "the default until calibrated");
}

#[test]
fn committed_digits_cascade_is_calibrated_at_start_up() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("models");
    let repo = load_and_calibrate(&dir);
    assert!(repo.errors.is_empty(), "{:?}", repo.errors);
    let all = &repo.ensembles["digits"].selection;
    assert_eq!(all.policy, crate::model::Policy::All);
    let c = &repo.ensembles["digits_cascade"].selection;
    assert_eq!(c.policy, crate::model::Policy::Cascade);
    assert_eq!(c.cascade_target_agreement, Some(0.995));
    // Derived from the calibration rows, not the 0.9 default.
    assert!(
        c.cascade_threshold > 0.3 && c.cascade_threshold < 0.9,
        "{}",
        c.cascade_threshold
    );
}

#[test]
fn cascade_calibration_errors_refuse_the_ensemble() {
    let dir = std::env::temp_dir().join(format!("beast-calib-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("models");
    for m in ["digits_small", "digits_medium"] {
        let d = dir.join(m).join("1");
        fs::create_dir_all(&d).unwrap();
        fs::copy(
            src.join(m).join("model.toml"),
            dir.join(m).join("model.toml"),
        )
        .unwrap();
        fs::copy(
            src.join(m).join("1").join(WEIGHTS_FILE),
            d.join(WEIGHTS_FILE),
        )
        .unwrap();
    }
    fs::write(dir.join("narrow.csv"), "a,b,label\n1,2,0\n").unwrap();
    fs::write(
        dir.join("ensembles.toml"),
        "[ensembles.missing]\nmembers = [\"digits_small\", \"digits_medium\"]\npolicy = \"cascade\"\ncascade_target_agreement = 0.99\ncalibration = \"nope.csv\"\n\
         [ensembles.narrow]\nmembers = [\"digits_small\", \"digits_medium\"]\ncascade_target_agreement = 0.99\ncalibration = \"narrow.csv\"\n",
    )
    .unwrap();
    let repo = load_and_calibrate(&dir);
    assert!(repo.ensembles.is_empty());
    assert_eq!(repo.errors.len(), 2, "{:?}", repo.errors);
    assert_eq!((repo.refused_models, repo.refused_ensembles), (0, 2));
    assert!(repo.errors.iter().all(|e| e.contains("ensembles.toml")));
    assert!(repo
        .errors
        .iter()
        .any(|e| e.contains("ensembles.missing.calibration") && e.contains("nope.csv")));
    assert!(repo
        .errors
        .iter()
        .any(|e| e.contains("ensembles.narrow.calibration") && e.contains("2 feature columns")));
    let _ = fs::remove_dir_all(&dir);
}
