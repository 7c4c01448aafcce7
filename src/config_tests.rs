//! Tests of `config` (kept apart so the module stays readable).

use super::*;

#[test]
fn default_is_valid() {
    Config::default().validate().unwrap();
}

#[test]
fn relations_are_checked() {
    let mut c = Config::default();
    c.batch.queue_rows_max = 1;
    c.batch.max_batch = 8;
    let e = c.validate().unwrap_err();
    assert!(e.contains("batch.queue_rows_max"), "{e}");
    let c = Config {
        listen: "nonsense".into(),
        ..Config::default()
    };
    assert!(c.validate().unwrap_err().contains("listen"));
    for (admin, ok) in [
        ("off", true),
        ("", true),
        ("127.0.0.1:0", true),
        ("nope", false),
    ] {
        let c = Config {
            admin_listen: admin.into(),
            ..Config::default()
        };
        assert_eq!(c.validate().is_ok(), ok, "{admin}");
    }
    let c = Config {
        trace_sample_rate: 1.5,
        ..Config::default()
    };
    assert!(c.validate().unwrap_err().contains("trace_sample_rate"));
    for (f, i) in [
        ("frame_timeout_ms", 0),
        ("idle_timeout_ms", 1),
        ("write_stall_timeout_ms", 2),
    ] {
        for bad in [0, TIMEOUT_MS_MAX + 1] {
            let mut c = Config::default();
            *[
                &mut c.frame_timeout_ms,
                &mut c.idle_timeout_ms,
                &mut c.write_stall_timeout_ms,
            ][i] = bad;
            assert!(c.validate().unwrap_err().contains(f), "{f} = {bad}");
        }
    }
    let c = Config {
        pending_bytes_per_connection_max: (4 << 20) - 1,
        ..Config::default()
    };
    let e = c.validate().unwrap_err();
    assert!(e.contains("pending_bytes_per_connection_max"), "{e}");
}

#[test]
fn knobs_default_to_the_former_constants_and_are_checked() {
    let c = Config::default();
    assert_eq!(c.cache.l1_ways, 8);
    assert_eq!(c.coalesce_waiters_max(), 4 * c.cache.coalesce_keys_max);
    assert_eq!(
        c.deadline_heap_max(),
        2 * c.ensemble_in_flight_per_shard_max
    );
    assert_eq!(c.backend, default_backend());
    let b = c.backend_choice().unwrap();
    assert_eq!((b.cuda_device, b.cuda_precision), (0, Precision::Split));
    // The derived defaults follow the limit they derive from.
    let c: Config =
        toml::from_str("ensemble_in_flight_per_shard_max = 10\n[cache]\ncoalesce_keys_max = 3")
            .unwrap();
    assert_eq!((c.deadline_heap_max(), c.coalesce_waiters_max()), (20, 12));
    let c: Config = toml::from_str(
        "deadline_heap_max = 50000\nbackend = \"cuda\"\ncuda_device = 2\n\
         cuda_precision = \"half\"\n[cache]\nl1_ways = 4\ncoalesce_waiters_max = 9",
    )
    .unwrap();
    c.validate().unwrap();
    assert_eq!(
        (c.deadline_heap_max(), c.coalesce_waiters_max()),
        (50000, 9)
    );
    assert_eq!(c.cache.l1_ways, 4);
    assert_eq!(
        c.backend_choice().unwrap(),
        BackendChoice {
            kind: BackendKind::Cuda,
            cuda_device: 2,
            cuda_precision: Precision::Half,
            cuda_models_max: 32,
            test_delay_us: 0,
        }
    );
    let bad = |toml: &str, field: &str| {
        let c: Config = toml::from_str(toml).unwrap();
        let e = c.validate().unwrap_err();
        assert!(e.contains(field), "{toml}: {e}");
    };
    bad("[cache]\nl1_ways = 0", "cache.l1_ways");
    bad("backend_test_delay_us = 1000001", "backend_test_delay_us");
    bad("[cache]\nl1_ways = 65", "cache.l1_ways");
    bad("[cache]\nl1_ways = 16\nl1_entries = 8", "cache.l1_entries");
    bad(
        "[cache]\ncoalesce_waiters_max = 0",
        "cache.coalesce_waiters_max",
    );
    bad("deadline_heap_max = 16383", "deadline_heap_max");
    bad("backend = \"gpu\"", "backend");
    bad("cuda_precision = \"fp8\"", "cuda_precision");
    bad("cuda_models_max = 0", "cuda_models_max");
}

#[test]
fn backend_environment_overrides_the_file() {
    let env = |pairs: &'static [(&'static str, &'static str)]| {
        move |name: &str| {
            pairs
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.to_string())
        }
    };
    let mut c: Config = toml::from_str("backend = \"cuda\"\ncuda_device = 1").unwrap();
    let lines = c.apply_backend_env(env(&[])).unwrap();
    assert!(lines.is_empty());
    assert_eq!((c.backend.as_str(), c.cuda_device), ("cuda", 1));
    let lines = c
        .apply_backend_env(env(&[
            ("BEAST_BACKEND", "cpu"),
            ("BEAST_CUDA_DEVICE", "3"),
            ("BEAST_CUDA_PRECISION", "half"),
        ]))
        .unwrap();
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert!(lines[0].contains("BEAST_BACKEND=cpu"), "{lines:?}");
    assert_eq!(
        (c.backend.as_str(), c.cuda_device, c.cuda_precision.as_str()),
        ("cpu", 3, "half")
    );
    for (pairs, name) in [
        (&[("BEAST_BACKEND", "gpu")][..], "BEAST_BACKEND"),
        (&[("BEAST_CUDA_DEVICE", "x")][..], "BEAST_CUDA_DEVICE"),
        (
            &[("BEAST_CUDA_PRECISION", "fp8")][..],
            "BEAST_CUDA_PRECISION",
        ),
    ] {
        let pairs: &'static [(&str, &str)] = pairs;
        let e = Config::default().apply_backend_env(env(pairs)).unwrap_err();
        assert!(e.starts_with(name), "{e}");
    }
}

#[test]
fn unknown_keys_are_refused() {
    let e = toml::from_str::<Config>("listn = \"x\"").unwrap_err();
    assert!(e.to_string().contains("listn"), "{e}");
    let c: Config = toml::from_str("listen = \"0.0.0.0:9000\"\n[batch]\nmax_batch = 8").unwrap();
    assert_eq!(c.batch.max_batch, 8);
    assert!(!c.ready_with_refused);
    let c: Config = toml::from_str("ready_with_refused = true").unwrap();
    assert!(c.ready_with_refused);
    assert_eq!(
        c.batch.queue_rows_max,
        BatchLimits::default().queue_rows_max
    );
    // The bound's former name still reads.
    let c: Config = toml::from_str("write_buffer_bytes_max = 12345678").unwrap();
    assert_eq!(c.pending_bytes_per_connection_max, 12345678);
}

#[test]
fn learning_share_is_checked_naming_the_field() {
    let parse = |t: &str| toml::from_str::<Config>(t).unwrap();
    // Off unless the section is there.
    assert!(parse("").share_url().is_none());
    // The URL defaults to cache.l3's; the interval to 1 s; the node id to host:port.
    let c = parse("[cache.l3]\nurl = \"redis://10.0.0.1:6379\"\n[learning.share]\n");
    c.validate().unwrap();
    assert_eq!(c.share_url().as_deref(), Some("redis://10.0.0.1:6379"));
    assert_eq!(c.learning.share.as_ref().unwrap().interval_ms, 1000);
    let id = c.share_node_id(7878);
    assert!(id.ends_with(":7878") && id.len() > 5, "{id}");
    assert_eq!(id, c.share_node_id(7878), "stable");
    let c = parse("[learning.share]\nurl = \"redis://h:1\"\nnode_id = \"a-1\"\ninterval_ms = 200");
    c.validate().unwrap();
    assert_eq!(c.share_node_id(7878), "a-1");
    for (t, field) in [
        ("[learning.share]\n", "learning.share.url: required"),
        (
            "[learning.share]\nurl = \"http://x\"",
            "learning.share.url: must be",
        ),
        (
            "[learning.share]\nurl = \"redis://h:1\"\nnode_id = \"a b\"",
            "learning.share.node_id",
        ),
        (
            "[learning.share]\nurl = \"redis://h:1\"\ninterval_ms = 10",
            "learning.share.interval_ms",
        ),
    ] {
        let e = parse(t).validate().unwrap_err();
        assert!(e.contains(field), "{t}: {e}");
    }
    let e = toml::from_str::<Config>("[learning.share]\nintervall_ms = 5").unwrap_err();
    assert!(e.to_string().contains("intervall_ms"), "{e}");
}

#[test]
fn l3_takes_a_url_or_cluster_seeds_not_both() {
    let parse = |t: &str| toml::from_str::<Config>(t).unwrap().validate();
    parse("[cache.l3]\nurl = \"redis://127.0.0.1:6379\"").unwrap();
    let c: Config = toml::from_str(
        "[cache.l3]\ncluster_seeds = [\"redis://10.0.0.1:7000\", \"redis://10.0.0.2:7000\"]",
    )
    .unwrap();
    c.validate().unwrap();
    assert_eq!(c.cache.l3.unwrap().cluster_seeds.len(), 2);
    let both = "[cache.l3]\nurl = \"redis://a:1\"\ncluster_seeds = [\"redis://b:2\"]";
    assert!(parse(both).unwrap_err().contains("exclusive"));
    let bad = "[cache.l3]\ncluster_seeds = [\"redis://b:2\", \"b:3\"]";
    assert!(parse(bad).unwrap_err().contains("cache.l3.cluster_seeds"));
    // Learned state needs a standalone Redis: a cluster L3 is no default for it.
    let e = parse("[cache.l3]\ncluster_seeds = [\"redis://b:2\"]\n[learning.share]\n").unwrap_err();
    assert!(e.contains("learning.share.url: required"), "{e}");
    assert!(parse("[cache.l3]\nttl_s = 5")
        .unwrap_err()
        .contains("cache.l3.url"));
}
