//! Tests of `manifest` (kept apart so the module stays readable).

use super::*;

const GOOD: &str = r#"
input_width = 64
output = "softmax"
layers = [
  { units = 32, activation = "relu" },
  { units = 10, activation = "identity", layer_norm = false },
]
[batching]
max_batch = 32
"#;

#[test]
fn good_manifest_and_defaults() {
    let d = BatchLimits::default();
    let m = parse_model_manifest(GOOD, &d).unwrap();
    assert_eq!(m.input_width, 64);
    assert_eq!(m.layer_dims(), vec![(64, 32), (32, 10)]);
    assert_eq!(m.batch.max_batch, 32);
    assert_eq!(m.batch.queue_rows_max, d.queue_rows_max);
    // the canonical text parses back to the same manifest
    assert_eq!(parse_model_manifest(&m.to_toml(), &d).unwrap(), m);
}

fn err(text: &str) -> String {
    parse_model_manifest(text, &BatchLimits::default()).unwrap_err()
}

#[test]
fn manifest_errors_name_the_field() {
    let e = err(&GOOD.replace("\"identity\", layer", "\"relux\", layer"));
    assert!(
        e.starts_with("layers[1].activation: unknown variant \"relux\", expected one of"),
        "{e}"
    );
    assert!(
        err(&GOOD.replace("units = 32", "units = 0")).starts_with("layers[0].units: must be >= 1")
    );
    assert!(err(&GOOD.replace("max_batch = 32", "max_batch = 0")).starts_with("batching.max_batch"));
    let e = err(&GOOD.replace("max_batch = 32", "max_batch = 64\nqueue_rows_max = 8"));
    assert!(
        e.starts_with("batching.queue_rows_max: 8 must be >= max_batch (64)"),
        "{e}"
    );
    let e = err(&GOOD.replace("max_batch = 32", "max_batch = 32\nmin_batch = 33"));
    assert!(
        e.starts_with("batching.min_batch: 33 must be >= 1 and <= max_batch (32)"),
        "{e}"
    );
    let b = parse_model_manifest(
        &GOOD.replace("max_batch = 32", "max_batch = 32\nmin_batch = 8"),
        &BatchLimits::default(),
    )
    .unwrap()
    .batch;
    assert_eq!((b.max_batch, b.min_batch), (32, 8));
    assert!(
        err(&GOOD.replace("max_batch", "max_bach")).starts_with("batching.max_bach: unknown field")
    );
    assert!(
        err(&GOOD.replace("output = \"softmax\"", "output = \"argmax\""))
            .starts_with("output: unknown variant")
    );
    assert!(err(&GOOD.replace("input_width = 64", "")).starts_with("input_width: missing"));
    assert!(
        err(&GOOD.replace("input_width = 64", "input_width = \"64\""))
            .starts_with("input_width: expected an integer")
    );
    let e = err(&GOOD.replace("layers = [", "layers = [[[["));
    assert!(e.starts_with("TOML syntax error at line"), "{e}");
    assert!(err("input_width = 3\noutput = \"identity\"\nlayers = []").starts_with("layers: empty"));
}

#[test]
fn ensembles_parse_and_errors() {
    let ok = r#"
[ensembles.a]
members = ["x", "y"]
[ensembles.b]
members = ["x", "y"]
combiner = "weighted_mean"
weights = [1.0, 2]
[ensembles.c]
members = ["x", "y"]
combiner = "weighted_mean"
weights = [1.0]
"#;
    let e = parse_ensembles(ok).unwrap();
    assert_eq!(e.len(), 3);
    let a = e[0].1.as_ref().unwrap();
    assert_eq!(
        (a.combiner, a.weights.clone()),
        (Combiner::Mean, vec![1.0, 1.0])
    );
    assert_eq!(e[1].1.as_ref().unwrap().weights, vec![1.0, 2.0]);
    let c = e[2].1.as_ref().unwrap_err();
    assert!(
        c.starts_with("ensembles.c.weights: 1 weights for 2 members"),
        "{c}"
    );
    let bad = parse_ensembles("[ensembles.z]\nmembers = [\"x\"]\ncombiner = \"mode\"").unwrap();
    let z = bad[0].1.as_ref().unwrap_err();
    assert!(
        z.starts_with("ensembles.z.combiner: unknown variant \"mode\""),
        "{z}"
    );
}

#[test]
fn ensemble_selection_fields() {
    let one = |body: &str| {
        let text = format!("[ensembles.e]\nmembers = [\"a\", \"b\"]\n{body}");
        parse_ensembles(&text).unwrap().remove(0).1
    };
    let d = one("").unwrap();
    assert_eq!(d.selection, SelectionSpec::default());
    assert_eq!(d.selection.policy, Policy::All);
    let c = one("policy = \"cascade\"\ncascade_threshold = 0.8\ncascade_metric = \"margin\"\ncombiner = \"vote\"").unwrap();
    assert_eq!(
        (
            c.selection.policy,
            c.selection.cascade_threshold,
            c.selection.cascade_metric,
            c.combiner
        ),
        (Policy::Cascade, 0.8, CascadeMetric::Margin, Combiner::Vote)
    );
    let t = one("policy = \"cascade\"\ncascade_target_agreement = 0.99\ncalibration = \"x.csv\"")
        .unwrap();
    assert_eq!(t.selection.cascade_target_agreement, Some(0.99));
    for (body, err) in [
        ("policy = \"greedy\"", "ensembles.e.policy: unknown variant"),
        (
            "cascade_threshold = 1.5",
            "ensembles.e.cascade_threshold: 1.5 must be in",
        ),
        (
            "cascade_target_agreement = 0.9",
            "ensembles.e.cascade_target_agreement: needs a calibration",
        ),
        (
            "calibration = \"x.csv\"",
            "ensembles.e.calibration: given without",
        ),
        (
            "calibration = 3",
            "ensembles.e.calibration: expected a non-empty file name",
        ),
        (
            "cascade_threshold = 0.5\ncascade_target_agreement = 0.9\ncalibration = \"x\"",
            "ensembles.e.cascade_threshold: give either",
        ),
        (
            "combiner = \"stacked\"\nweights = [1, 2]",
            "ensembles.e.weights: given but",
        ),
        (
            "bandit_cost_weight = -1",
            "ensembles.e.bandit_cost_weight: -1 must be in",
        ),
    ] {
        let e = one(body).unwrap_err();
        assert!(e.starts_with(err), "{body}: {e}");
    }
}

#[test]
fn task_classes_and_preprocess_round_trip_through_the_canonical_text() {
    let d = BatchLimits::default();
    let text = "input_width = 2\noutput = \"sigmoid\"\nclasses = [\"no\", \"yes\"]\n\
                layers = [{ units = 1, activation = \"identity\" }]\n\
                [preprocess]\nstandardize = { mean = [1.5, -2], scale = [0.25, 3] }\n\
                clip = { min = -4, max = [4, 5] }\n";
    let m = parse_model_manifest(text, &d).unwrap();
    assert!(m.io.binary);
    assert_eq!((m.output_width(), m.served_width()), (1, 2));
    assert_eq!(parse_model_manifest(&m.to_toml(), &d).unwrap(), m);
    let r = parse_model_manifest(
        "input_width = 3\noutput = \"identity\"\ntask = \"regression\"\nlayers = [{ units = 2, activation = \"identity\" }]\n",
        &d,
    )
    .unwrap();
    assert_eq!(r.task, Task::Regression);
    assert_eq!(r.served_width(), 2);
    assert_eq!(parse_model_manifest(&r.to_toml(), &d).unwrap(), r);
}
