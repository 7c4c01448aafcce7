//! What an operator does to files under `models/` while a server runs and
//! across restarts (docs/MODELS.md, "Changing files under models/"),
//! against a real server on a real socket.

mod common;

use beast::client::Client;
use beast::model::demo::write_model;
use beast::model::load::{load_repository, Repository};
use beast::model::{Activation, BatchLimits, Model, OutputTransform};
use beast::server::admin::get;
use beast::wire::CacheControl;
use common::*;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

fn small(name: &str, hidden: usize, seed: u64) -> Model {
    let mut m = Model::random(
        name,
        &[WIDTH, hidden, CLASSES],
        Activation::Relu,
        OutputTransform::Softmax,
        seed,
    );
    m.batch = BatchLimits {
        max_batch: 16,
        min_batch: 1,
        max_queue_delay_us: 50,
        queue_rows_max: 4096,
    };
    m
}

fn load(dir: &Path) -> Repository {
    let repo = load_repository(dir, &BatchLimits::default()).unwrap();
    assert!(repo.errors.is_empty(), "{:?}", repo.errors);
    repo
}

fn predict(client: &Client, target: &str, x: &[f32], cache: CacheControl) -> (Vec<f32>, bool) {
    let mut s = spec(target, 1, WIDTH, x);
    s.cache = cache;
    let p = client
        .predict(&s)
        .unwrap_or_else(|e| panic!("{target}: {e:?}"));
    (p.outputs, p.cached)
}

/// The short digest /v1/models shows for `name`.
fn listed_digest(admin: std::net::SocketAddr, name: &str) -> String {
    let (code, body) = get(&admin.to_string(), "/v1/models", Duration::from_secs(10)).unwrap();
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let m = v["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == name)
        .unwrap_or_else(|| panic!("{name} not in {body}"));
    m["digest"]
        .as_str()
        .unwrap_or_else(|| panic!("{body}"))
        .to_string()
}

/// Weights are read once into memory the process owns: truncating and
/// overwriting the file in place (same inode) while the server runs changes
/// nothing it answers, and does not kill it (with weights read from a
/// shared map, the truncation was a SIGBUS and the garbage was served).
#[test]
fn weights_overwritten_in_place_while_serving_change_nothing() {
    let dir = temp_dir("inplace");
    let m = small("a", 16, 1);
    write_model(&dir, &m).unwrap();
    let server = start_with(test_config(), load(&dir));
    let client = Client::connect(server.addr).unwrap();
    let inputs: Vec<Vec<f32>> = (0..20).map(|i| rows(900 + i, 1, WIDTH)).collect();
    let answers = |client: &Client| -> Vec<Vec<f32>> {
        inputs
            .iter()
            .map(|x| predict(client, "a", x, CacheControl::Bypass).0)
            .collect()
    };
    let before = answers(&client);
    for (x, y) in inputs.iter().zip(&before) {
        assert_close(y, &direct(&m, x, 1), 1e-3);
    }

    let wpath = dir.join("a/1/weights.safetensors");
    let meta = std::fs::metadata(&wpath).unwrap();
    let (ino, len) = (meta.ino(), meta.len() as usize);
    // Truncated in place: same inode, now empty.
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&wpath)
        .unwrap();
    assert_eq!(std::fs::metadata(&wpath).unwrap().len(), 0);
    assert_eq!(answers(&client), before, "after truncation to 0 bytes");
    // Garbage of the old length, then zeros: still the same inode.
    f.write_all(&vec![0xA5; len]).unwrap();
    f.sync_all().unwrap();
    assert_eq!(answers(&client), before, "after garbage over the weights");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&wpath)
        .unwrap();
    f.write_all(&vec![0; len / 2]).unwrap();
    f.sync_all().unwrap();
    assert_eq!(std::fs::metadata(&wpath).unwrap().ino(), ino, "same file");
    assert_eq!(answers(&client), before, "after zeros over half the length");
    drop(client);
    server.shutdown();
}

/// A same-version rewrite of `weights.safetensors` is a different model:
/// after a restart on the same L2 file, neither the model nor an ensemble
/// of it answers from entries computed with the old bytes, while an
/// unchanged model (and a restart with nothing changed) still does.
#[test]
fn same_version_new_weights_never_get_old_cached_answers() {
    let dir = temp_dir("rewrite");
    let models = dir.join("models");
    std::fs::create_dir_all(&models).unwrap();
    let a_old = small("a", 16, 1);
    let a_new = small("a", 16, 99);
    let b = small("b", 8, 2);
    write_model(&models, &a_old).unwrap();
    write_model(&models, &b).unwrap();
    std::fs::write(
        models.join("ensembles.toml"),
        "[ensembles.ens]\nmembers = [\"a\", \"b\"]\ncombiner = \"mean\"\n",
    )
    .unwrap();
    let mut cfg = test_config();
    cfg.cache.l2_path = dir.join("l2.cache");
    cfg.cache.l2_bytes = 1 << 20;
    let inputs: Vec<Vec<f32>> = (0..50).map(|i| rows(700 + i, 1, WIDTH)).collect();
    let targets = ["a", "b", "ens"];

    // Fill the L2 file with the old model's answers.
    let server = start_with(cfg.clone(), load(&models));
    let old_digest = listed_digest(server.admin_addr.unwrap(), "a");
    let client = Client::connect(server.addr).unwrap();
    for t in targets {
        for x in &inputs {
            predict(&client, t, x, CacheControl::Use);
        }
    }
    drop(client);
    server.shutdown();

    // Restarted with nothing changed: every answer comes from the L2 file
    // (so the check below is one that a persisted entry could fail).
    let server = start_with(cfg.clone(), load(&models));
    let client = Client::connect(server.addr).unwrap();
    for t in targets {
        for x in &inputs {
            assert!(predict(&client, t, x, CacheControl::Use).1, "{t}: a hit");
        }
    }
    drop(client);
    server.shutdown();

    // New weights in the same version folder, same model.toml.
    write_model(&models, &a_new).unwrap();
    let server = start_with(cfg, load(&models));
    let new_digest = listed_digest(server.admin_addr.unwrap(), "a");
    assert_ne!(old_digest, new_digest, "the digest follows the bytes");
    let client = Client::connect(server.addr).unwrap();
    for t in targets {
        let (mut wrong, mut hits) = (0, 0);
        for x in &inputs {
            let (fresh, _) = predict(&client, t, x, CacheControl::Bypass);
            let (got, cached) = predict(&client, t, x, CacheControl::Use);
            wrong += usize::from(got != fresh);
            hits += usize::from(cached);
            if t == "a" {
                assert_close(&fresh, &direct(&a_new, x, 1), 1e-3);
            }
        }
        let n = inputs.len();
        assert_eq!(wrong, 0, "{t}: {wrong} of {n} answers were stale");
        // Only the untouched model keeps its entries.
        let want = if t == "b" { n } else { 0 };
        assert_eq!(hits, want, "{t}: {hits} of {n} answers from the cache");
    }
    drop(client);
    server.shutdown();
}
