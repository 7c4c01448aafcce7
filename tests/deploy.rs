//! deploy/: the container config parses and validates as a beast config;
//! the ConfigMap carries the same text; the Kubernetes manifests are YAML
//! with the probes, drain and annotations the docs promise (parsed with
//! python3's yaml when it is there, else `SKIP:`).

use std::path::Path;
use std::process::Command;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn the_container_config_is_valid_and_the_configmap_carries_it() {
    let toml = root().join("deploy/beast.toml");
    let cfg = beast::config::Config::from_file(&toml).expect("deploy/beast.toml is a valid config");
    assert_eq!(cfg.admin_listen, "0.0.0.0:9464");
    assert!(cfg.drain_s > 0.0, "SIGTERM drains in a container");
    let text = std::fs::read_to_string(&toml).unwrap();
    let cm = std::fs::read_to_string(root().join("deploy/k8s/configmap.yaml")).unwrap();
    let indented: String = text
        .lines()
        .map(|l| {
            if l.is_empty() {
                "\n".to_string()
            } else {
                format!("    {l}\n")
            }
        })
        .collect();
    assert!(
        cm.contains(&indented),
        "configmap.yaml holds deploy/beast.toml verbatim"
    );
}

#[test]
fn the_kubernetes_manifests_are_yaml_with_probes_drain_and_scrape_annotations() {
    let script = r#"
import sys, yaml
docs = {}
for f in sys.argv[1:]:
    for d in yaml.safe_load_all(open(f)):
        docs[d["kind"]] = d
dep = docs["Deployment"]["spec"]["template"]
c = dep["spec"]["containers"][0]
assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
assert "/v1/drain" in " ".join(c["lifecycle"]["preStop"]["exec"]["command"])
assert dep["metadata"]["annotations"]["prometheus.io/port"] == "9464"
assert any(m["mountPath"] == "/var/lib/beast" for m in c["volumeMounts"])
assert "beast.toml" in docs["ConfigMap"]["data"]
print("ok")
"#;
    let dir = root().join("deploy/k8s");
    let files = ["configmap.yaml", "deployment.yaml", "service.yaml"].map(|f| dir.join(f));
    let out = Command::new("python3").args(["-c", "import yaml"]).output();
    if !out.is_ok_and(|o| o.status.success()) {
        println!("SKIP: python3 with PyYAML not found");
        return;
    }
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .args(&files)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
