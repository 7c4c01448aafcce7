//! beast-eval against a real server on the shipped digits ensemble: the
//! tool runs (so it does not rot) and the acceptance figures of
//! docs/SELECTION.md hold.

mod common;

use beast::ensemble::calibrate::calibrate_cascades;
use beast::model::load::load_repository;
use beast::model::BatchLimits;
use std::path::Path;
use std::process::Command;

/// (accuracy %, compute saved %) of the table row whose name starts with `name`.
fn row(table: &str, name: &str) -> (f64, f64) {
    let line = table
        .lines()
        .find(|l| l.starts_with(&format!("| {name}")))
        .unwrap_or_else(|| panic!("no row {name} in\n{table}"));
    let cells: Vec<&str> = line.split('|').map(str::trim).collect();
    let pct = |s: &str| s.trim_end_matches('%').parse::<f64>().unwrap();
    (pct(cells[2]), pct(cells[5]))
}

#[test]
fn beast_eval_on_digits_meets_the_acceptance_figures() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = root.join("models");
    let mut repo = load_repository(&dir, &BatchLimits::default()).unwrap();
    // As `beast serve` does: the digits cascade gets its calibrated threshold.
    calibrate_cascades(&mut repo, &dir);
    let h = common::start_with(common::test_config(), repo);
    let out = Command::new(env!("CARGO_BIN_EXE_beast-eval"))
        .args(["--server", &h.addr.to_string(), "--target", "digits"])
        .args(["--bandit-passes", "2", "--deadline-us", "20000"])
        .arg("--data")
        .arg(root.join("models/digits_holdout.csv"))
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{table}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (all, _) = row(&table, "all");
    let best_member = ["digits_small", "digits_medium", "digits_large"]
        .iter()
        .map(|m| row(&table, &format!("{m} alone")).0)
        .fold(0.0, f64::max);
    assert!(
        all > best_member,
        "all {all}% vs best member {best_member}%"
    );
    let (cascade, saved) = row(&table, "cascade");
    assert!(
        saved >= 50.0 && cascade >= all - 0.5,
        "cascade {cascade}%, saved {saved}%"
    );
    // After one pass of feedback (540 messages), within a point of the best fixed choice.
    let (bandit, _) = row(&table, "bandit");
    assert!(bandit >= all.max(best_member) - 1.0, "bandit {bandit}%");
    let (deadline, _) = row(&table, "deadline");
    assert!(deadline >= all - 1.0, "deadline {deadline}%");
    h.shutdown();
}
