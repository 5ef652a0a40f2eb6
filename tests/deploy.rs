//! What ships beside the binary stays true to it: config/dockerflow-sidecar.toml
//! holds exactly the built-in defaults, the configuration reference in
//! docs/operations.md has exactly its keys, the Kubernetes ConfigMap's TOML
//! passes `check-config`, and the Dockerfile and manifests agree on ports
//! and paths.

mod common;

use std::collections::BTreeSet;

fn read(path: &str) -> String {
    std::fs::read_to_string(format!("{}/{path}", env!("CARGO_MANIFEST_DIR")))
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Every dotted key of a TOML table; arrays (of tables too) are one key.
fn keys(prefix: &str, value: &toml::Value, out: &mut BTreeSet<String>) {
    if let toml::Value::Table(table) = value {
        for (k, v) in table {
            let key = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            if v.is_table() {
                keys(&key, v, out);
            } else {
                out.insert(key);
            }
        }
    }
}

/// The reference table's rows: key → default column.
fn documented() -> Vec<(String, String)> {
    let ops = read("docs/operations.md");
    let section = ops
        .split("## Configuration reference")
        .nth(1)
        .and_then(|s| s.split("\n## ").next())
        .expect("a Configuration reference section");
    section
        .lines()
        .filter(|l| l.starts_with("| `"))
        .map(|l| {
            let cells: Vec<&str> = l.split(" | ").collect();
            (
                cells[0]
                    .trim_start_matches("| ")
                    .trim_matches('`')
                    .to_owned(),
                cells.get(2).copied().unwrap_or("").to_owned(),
            )
        })
        .collect()
}

#[test]
fn the_example_file_holds_the_defaults_and_every_key() {
    use dockerflow_sidecar::config::Config;
    use figment::providers::Format;
    let example = read("config/dockerflow-sidecar.toml");
    let parsed: Config = figment::Figment::from(figment::providers::Toml::string(&example))
        .extract()
        .unwrap();
    assert_eq!(parsed, Config::default());
    let mut documented = BTreeSet::new();
    keys("", &toml::from_str(&example).unwrap(), &mut documented);
    let mut defaults = BTreeSet::new();
    keys(
        "",
        &toml::Value::try_from(Config::default()).unwrap(),
        &mut defaults,
    );
    assert_eq!(documented, defaults);
}

#[test]
fn the_reference_documents_every_key_and_only_those() {
    let example = read("config/dockerflow-sidecar.toml");
    let mut in_file = BTreeSet::new();
    keys("", &toml::from_str(&example).unwrap(), &mut in_file);
    let rows = documented();
    let in_docs: BTreeSet<String> = rows.iter().map(|(k, _)| k.clone()).collect();
    assert_eq!(rows.len(), in_docs.len(), "a key is documented twice");

    let undocumented: Vec<&String> = in_file.difference(&in_docs).collect();
    assert!(
        undocumented.is_empty(),
        "not in docs/operations.md: {undocumented:?}"
    );
    // Keys without a default (unset) are commented out in the example file,
    // in their own table.
    for key in in_docs.difference(&in_file) {
        let default = &rows.iter().find(|(k, _)| k == key).unwrap().1;
        assert_eq!(
            default, "unset",
            "`{key}` is documented but not in the example file"
        );
        let (table, leaf) = key.rsplit_once('.').unwrap();
        let section = example
            .split(&format!("\n[{table}]\n"))
            .nth(1)
            .unwrap_or_else(|| panic!("no [{table}] in the example file"))
            .split("\n[")
            .next()
            .unwrap()
            .to_lowercase();
        assert!(
            section.contains(&format!("# {leaf} = ")) || section.contains(&format!("or {leaf} = ")),
            "`{key}` (unset by default) is not shown, commented, in [{table}]"
        );
    }
    // And every environment variable is the key's.
    let ops = read("docs/operations.md");
    for (key, _) in &rows {
        let var = format!("DOCKERFLOW_{}", key.to_uppercase().replace('.', "__"));
        assert!(
            ops.contains(&format!("`{var}`")),
            "{key}: {var} not documented"
        );
    }
}

#[test]
fn the_configmap_passes_check_config() {
    let manifest = read("deploy/kubernetes/base/configmap.yaml");
    let block = manifest
        .split("dockerflow-sidecar.toml: |\n")
        .nth(1)
        .expect("the TOML block");
    let toml: String = block
        .lines()
        .map(|l| l.strip_prefix("    ").unwrap_or(l))
        .map(|l| format!("{l}\n"))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dockerflow-sidecar.toml");
    std::fs::write(&file, &toml).unwrap();
    let out = std::process::Command::new(common::binary())
        .args(["check-config", "--config", file.to_str().unwrap()])
        .env_remove("DOCKERFLOW_CONFIG")
        .env_remove("PORT")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed: toml::Value = toml::from_str(&String::from_utf8_lossy(&out.stdout)).unwrap();
    assert_eq!(printed["listen"].as_str(), Some("0.0.0.0:8000"));
    assert_eq!(printed["admin"]["listen"].as_str(), Some("0.0.0.0:9102"));
    assert_eq!(
        printed["state"]["path"].as_str(),
        Some("/var/lib/dockerflow-sidecar/state.db")
    );
}

#[test]
fn the_image_and_the_manifests_agree() {
    let dockerfile = read("Dockerfile");
    assert!(dockerfile.contains("\nEXPOSE 8000 9102\n"));
    assert!(dockerfile.contains("ENTRYPOINT [\"/usr/local/bin/dockerflow-sidecar\"]"));
    assert!(dockerfile.contains("cargo build --release --locked"));
    assert!(dockerfile.contains("USER 65532:65532"));
    for variant in ["native", "classic"] {
        let deployment = read(&format!("deploy/kubernetes/{variant}/deployment.yaml"));
        for expected in [
            "containerPort: 8000",
            "containerPort: 9102",
            "command: [\"/usr/local/bin/dockerflow-sidecar\", \"drain\"]",
            "mountPath: /var/lib/dockerflow-sidecar",
            "value: /etc/dockerflow-sidecar/dockerflow-sidecar.toml",
            "mountPath: /etc/dockerflow-sidecar",
            "readOnlyRootFilesystem: true",
            "path: /ready",
            "path: /__lbheartbeat__",
            "prometheus.io/port: \"9102\"",
        ] {
            assert!(deployment.contains(expected), "{variant}: {expected}");
        }
    }
    let native = read("deploy/kubernetes/native/deployment.yaml");
    assert!(native.contains("initContainers:") && native.contains("restartPolicy: Always"));
    let classic = read("deploy/kubernetes/classic/deployment.yaml");
    assert!(!classic.contains("initContainers:"));
}
