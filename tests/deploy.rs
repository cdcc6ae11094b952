//! The Kubernetes manifests (deploy/kubernetes): rendered with `kubectl kustomize` and checked
//! against the Kubernetes API's schemas by `kubernetes-validate` (strict: unknown fields are
//! errors), since no cluster runs here; and the engine's command line is one `serve` accepts.

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn render() -> String {
    let output = Command::new("kubectl")
        .arg("kustomize")
        .arg(repo("deploy/kubernetes"))
        .output()
        .expect("kubectl runs (scripts/setup.sh installs it)");
    assert!(
        output.status.success(),
        "kubectl kustomize: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("UTF-8 manifests")
}

/// Runs kubernetes-validate (strict) on `manifests`; its output and whether it passed.
fn validate(manifests: &str) -> (bool, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("rendered.yaml");
    std::fs::write(&file, manifests).expect("write manifests");
    let output = Command::new(repo(".local/venv/bin/kubernetes-validate"))
        .args(["--strict", "--kubernetes-version", "1.30.0"])
        .arg(&file)
        .output()
        .expect("kubernetes-validate runs (scripts/setup.sh installs it)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

#[test]
fn the_kubernetes_manifests_render_and_validate_and_start_engines_in_fleet_mode() {
    let manifests = render();
    let (passed, report) = validate(&manifests);
    assert!(passed, "{report}");
    for kind in [
        "statefulset/inspectflow",
        "statefulset/nats",
        "service/nats",
        "poddisruptionbudget/inspectflow",
    ] {
        assert!(
            report.contains(&format!("{kind} against")),
            "{kind}: {report}"
        );
    }
    // One engine per node, scraped by Prometheus, on a persistent volume, in fleet mode.
    for expected in [
        "topologyKey: kubernetes.io/hostname",
        "prometheus.io/scrape: \"true\"",
        "volumeClaimTemplates:",
        "INSPECTFLOW_FLEET_NATS",
        "INSPECTFLOW_ENGINE_ID",
        "store_dir: /data/jetstream",
    ] {
        assert!(manifests.contains(expected), "{expected} in the manifests");
    }

    // Every flag the engine is started with is one of `serve`'s.
    let help = Command::new(env!("CARGO_BIN_EXE_inspectflow"))
        .args(["serve", "--help"])
        .output()
        .expect("inspectflow runs");
    let help = String::from_utf8_lossy(&help.stdout);
    let flags: Vec<&str> = manifests
        .lines()
        .skip_while(|line| line.trim() != "- serve")
        .skip(1)
        .map_while(|line| line.trim().strip_prefix("- --"))
        .map(|flag| flag.split('=').next().unwrap_or(flag))
        .collect();
    assert!(flags.len() >= 4, "{flags:?}");
    for flag in flags {
        assert!(help.contains(&format!("--{flag}")), "serve has no --{flag}");
    }
    for variable in ["INSPECTFLOW_FLEET_NATS", "INSPECTFLOW_ENGINE_ID"] {
        assert!(help.contains(variable), "serve reads {variable}");
    }

    // The check is real: a misspelt field fails it.
    let broken = manifests.replacen("containerPort: 8000", "containerPortt: 8000", 1);
    let (passed, report) = validate(&broken);
    assert!(!passed, "a misspelt field is refused: {report}");
}
