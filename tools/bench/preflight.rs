//! One request per target before the run, so that a target the server does
//! not serve (the default `bench_ens` against the shipped models) or a wrong
//! input width is named, with how to fix it, before thousands of requests
//! fail with only `not_found N`.

use beast::client::{Client, ClientError};
use beast::wire::{CacheControl, Input, PolicyOverride, RequestSpec};
use std::net::SocketAddr;
use std::time::Duration;

/// The benchmark models `beast demo-models` writes.
const DEMO_TARGETS: [&str; 4] = ["bench_ens", "bench_a", "bench_b", "bench_c"];

/// One line per target that cannot be served as asked (empty when all
/// answer, or when the server cannot be reached: the run reports that).
pub fn check(addr: SocketAddr, targets: &[(String, usize)], server: &str) -> Vec<String> {
    let Ok(client) = Client::connect(addr) else {
        return Vec::new();
    };
    let mut problems = Vec::new();
    for (name, width) in targets {
        let zeros = vec![0f32; *width];
        let spec = RequestSpec {
            target: name,
            version: None,
            rows: 1,
            cols: *width as u32,
            input: Input::F32(&zeros),
            deadline_us: None,
            domain: None,
            cache: CacheControl::Bypass,
            policy: PolicyOverride::Default,
        };
        let Ok(mut pending) = client.send(&spec) else {
            return problems;
        };
        match pending.wait_timeout(Duration::from_secs(5)) {
            Some(Err(ClientError::NotFound(why))) => problems.push(not_found(name, server, &why)),
            Some(Err(ClientError::BadRequest(why))) => problems.push(format!(
                "target '{name}' refuses the requests as sent ({why}): give its input width with \
                 --width N or --target {name}:1:N"
            )),
            Some(Err(ClientError::Closed(_))) | None => return problems,
            _ => {}
        }
    }
    problems
}

fn not_found(name: &str, server: &str, why: &str) -> String {
    let how = if DEMO_TARGETS.contains(&name) {
        format!(
            "{name} is one of the benchmark models: write them with `beast demo-models --out bench-models` \
             and serve them with `beast serve --models bench-models`; or bench a model the server has, \
             e.g. the shipped `--target digits --width 64`"
        )
    } else {
        "check the name: the admin port's /v1/models lists what the server serves".to_string()
    };
    format!(
        "target '{name}' is not served at {server} ({why}): every request to it will fail. {how}"
    )
}
