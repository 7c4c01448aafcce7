//! The Python client package (tools/python, `pip install ./tools/python`)
//! against a real server: tools/python/tests/check_client.py checks ids from
//! 1, pipelining, typed errors, versions, FP16 input, feedback and timeouts;
//! its values are compared here with the model computed directly. Needs
//! python3 with the `flatbuffers` package (.ci/run installs it); prints
//! `SKIP: ...` without them.

mod common;

use common::*;
use std::path::Path;
use std::process::Command;

fn python_ready() -> Result<(), String> {
    match Command::new("python3")
        .args(["-c", "import flatbuffers"])
        .output()
    {
        Err(e) => Err(format!("python3 not runnable: {e}")),
        Ok(o) if !o.status.success() => Err(format!(
            "python3 has no flatbuffers package ({})",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Ok(_) => Ok(()),
    }
}

#[test]
fn python_client_against_a_real_server() {
    if let Err(why) = python_ready() {
        println!("SKIP: python client test: {why}");
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    // `slow` holds a request for 2 s: the script's 50 ms timeout fires first.
    let server = start_with(test_config(), test_repository(2_000_000));
    let out = Command::new("python3")
        .arg(root.join("tools/python/tests/check_client.py"))
        .arg(server.addr.to_string())
        .env("PYTHONPATH", root.join("tools/python"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("python client: ok"),
        "check_client.py failed:\n{stdout}\n{stderr}"
    );
    let values: serde_json::Value = serde_json::from_str(
        stdout
            .lines()
            .find_map(|l| l.strip_prefix("VALUES "))
            .expect("a VALUES line"),
    )
    .unwrap();
    let f = |v: &serde_json::Value| -> Vec<f32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect()
    };
    let (row, got) = (f(&values["row"]), f(&values["a"]));
    let want = direct(&model("a"), &row, 1);
    assert_close(&got, &want, 1e-6);
    server.shutdown();
}
