//! Tests of repository loading, continued: every refusal (bad model.toml,
//! bad weights, missing versions, bad ensembles) names the file and field.
//! A child of `load_tests.rs`, whose helpers (`TempRepo`, `base_repo`,
//! `refused`, `write_st`, ...) it uses.

use super::*;

#[test]
fn refuses_bad_model_toml() {
    let cases: &[(&str, &[&str])] = &[
        (
            "\"identity\" }",
            &[
                "layers[1].activation: unknown variant \"relux\"",
                "expected one of",
            ],
        ),
        ("units = 3", &["layers[0].units: must be >= 1"]),
        ("[[[", &["TOML syntax error at line"]),
        ("max_batch = 0", &["batching.max_batch: must be >= 1"]),
        (
            "queue_rows_max = 4",
            &["batching.queue_rows_max: 4 must be >= max_batch (64)"],
        ),
        ("input_width = 4", &["input_width: missing"]),
    ];
    for (i, (what, needles)) in cases.iter().enumerate() {
        let r = base_repo("toml");
        let text = match *what {
            "\"identity\" }" => TINY_TOML.replace("\"identity\" }", "\"relux\" }"),
            "units = 3" => TINY_TOML.replace("units = 3", "units = 0"),
            "[[[" => TINY_TOML.replace("layers = [", "layers = [[["),
            "input_width = 4" => TINY_TOML.replace("input_width = 4", ""),
            other => format!("{TINY_TOML}\n[batching]\n{other}\n"),
        };
        r.write("bad/model.toml", &text);
        write_st(&r, "bad/1/weights.safetensors", tiny_tensors());
        let e = refused(&r, "bad/model.toml", needles);
        assert!(e.contains("bad/model.toml: "), "case {i}: {e}");
    }
}

#[test]
fn refuses_bad_weights() {
    type Mutate = fn(&mut Vec<(&'static str, Raw)>);
    let cases: &[(Mutate, &[&str])] = &[
        (
            |t| t[0].1 = f16_raw(&[4, 5], (0..20).map(|_| 0.0)),
            &["tensor layers.0.weight: shape [4, 5] but model.toml says [4, 3]"],
        ),
        (|t| drop(t.remove(3)), &["tensor layers.1.bias: missing"]),
        (
            |t| {
                t[2].1 = Raw {
                    dtype: Dtype::I32,
                    shape: vec![3, 2],
                    bytes: vec![0; 24],
                }
            },
            &["tensor layers.1.weight: dtype I32 not accepted (accepted: F16, F32)"],
        ),
        (
            |t| {
                t[1].1 = Raw {
                    dtype: Dtype::BF16,
                    shape: vec![3],
                    bytes: vec![0; 6],
                }
            },
            &["tensor layers.0.bias: dtype BF16 not accepted"],
        ),
        (
            |t| t.push(("layers.0.ln_gamma", f16_raw(&[3], [1.0; 3].into_iter()))),
            &["tensor layers.0.ln_gamma: not expected by model.toml"],
        ),
        (
            |t| {
                t[0].1 = f16_raw(
                    &[4, 3],
                    (0..12).map(|i| if i == 5 { f32::NAN } else { 0.0 }),
                )
            },
            &["tensor layers.0.weight: element 5 is NaN", "finite"],
        ),
        (
            |t| {
                t[2].1 = f32_raw(
                    &[3, 2],
                    (0..6).map(|i| if i == 1 { f32::INFINITY } else { 0.0 }),
                )
            },
            &["tensor layers.1.weight: element 1 is inf"],
        ),
        (
            |t| t[2].1 = f32_raw(&[3, 2], (0..6).map(|i| if i == 1 { 1e6 } else { 0.0 })),
            &["tensor layers.1.weight: element 1 = 1000000 overflows FP16"],
        ),
    ];
    for (mutate, needles) in cases {
        let r = base_repo("weights");
        r.write("bad/model.toml", TINY_TOML);
        let mut t = tiny_tensors();
        mutate(&mut t);
        write_st(&r, "bad/1/weights.safetensors", t);
        refused(&r, "bad/1/weights.safetensors", needles);
    }
    // not a safetensors file at all
    let r = base_repo("garbage");
    r.write("bad/model.toml", TINY_TOML);
    r.write("bad/1/weights.safetensors", "{\"hello\": 1}");
    refused(
        &r,
        "bad/1/weights.safetensors",
        &["not a valid safetensors file"],
    );
    // a bad version is refused while a good version of the same model loads
    let r = base_repo("badversion");
    r.write("ok/2/weights.safetensors", "short");
    let e = refused(&r, "ok/2/weights.safetensors", &["too short"]);
    assert!(!e.is_empty());
    assert_eq!(r.load().model("ok", None).unwrap().version, 1);
}

#[test]
fn refuses_models_without_versions_and_empty_repos() {
    let r = base_repo("noversion");
    r.write("nov/model.toml", TINY_TOML);
    fs::create_dir_all(r.path().join("nov/v1")).unwrap();
    refused(&r, "nov", &["no versions found"]);
    assert_eq!(r.load().warnings.len(), 1);

    let r = base_repo("notoml");
    fs::create_dir_all(r.path().join("stray/1")).unwrap();
    refused(&r, "stray/model.toml", &["missing"]);

    let r = TempRepo::new("empty");
    let repo = r.load();
    assert_eq!(repo.errors.len(), 1);
    assert!(
        repo.errors[0].contains("empty repository"),
        "{:?}",
        repo.errors
    );

    assert!(load_repository(&r.path().join("missing"), &BatchLimits::default()).is_err());
}

#[test]
fn refuses_bad_ensembles() {
    let wide = TINY_TOML.replace("units = 2", "units = 5");
    let cases: &[(&str, &[&str])] = &[
        (
            "[ensembles.e]\nmembers = [\"ok\", \"nope\"]\n",
            &["ensembles.e.members[1]: unknown model \"nope\""],
        ),
        (
            "[ensembles.e]\nmembers = [\"ok\", \"wide\"]\n",
            &["ensembles.e.members[1]: \"wide\" is 4→5 but \"ok\" is 4→2"],
        ),
        (
            "[ensembles.e]\nmembers = [\"ok\", \"ok2\"]\ncombiner = \"weighted_mean\"\nweights = [1.0, 2.0, 3.0]\n",
            &["ensembles.e.weights: 3 weights for 2 members"],
        ),
        (
            "[ensembles.e]\nmembers = [\"ok\", \"ok2\"]\ncombiner = \"majority\"\n",
            &["ensembles.e.combiner: unknown variant \"majority\""],
        ),
        (
            "[ensembles.ok2]\nmembers = [\"ok\"]\n",
            &["ensembles.ok2: name collides with a model"],
        ),
    ];
    for (text, needles) in cases {
        let r = base_repo("ens");
        r.write("ok2/model.toml", TINY_TOML);
        write_st(&r, "ok2/1/weights.safetensors", tiny_tensors());
        r.write("wide/model.toml", &wide);
        let mut t = tiny_tensors();
        t[2].1 = f16_raw(&[3, 5], (0..15).map(|_| 0.5));
        t[3].1 = f16_raw(&[5], (0..5).map(|_| 0.5));
        write_st(&r, "wide/1/weights.safetensors", t);
        // a good ensemble beside the bad one still loads
        r.write(
            "ensembles.toml",
            &format!("[ensembles.good]\nmembers = [\"ok\", \"ok2\"]\n\n{text}"),
        );
        refused(&r, "ensembles.toml", needles);
        let repo = r.load();
        assert!(repo.ensembles.contains_key("good"));
        assert_eq!(repo.models.len(), 3);
    }
    // an ensemble over a refused model is refused too
    let r = base_repo("ensrefused");
    r.write("bad/model.toml", "input_width = 4\n");
    r.write(
        "ensembles.toml",
        "[ensembles.e]\nmembers = [\"ok\", \"bad\"]\n",
    );
    let repo = r.load();
    assert_eq!(repo.errors.len(), 2, "{:?}", repo.errors);
    assert!(repo.errors[1].contains("ensembles.e.members[1]: unknown model \"bad\""));
    assert!(repo.ensembles.is_empty() && repo.model("ok", None).is_some());

    let r = base_repo("enssyntax");
    r.write("ensembles.toml", "[ensembles.e\n");
    refused(&r, "ensembles.toml", &["TOML syntax error at line 1"]);
}
