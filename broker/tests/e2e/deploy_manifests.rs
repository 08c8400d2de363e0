//! The Kubernetes manifests in deploy/kubernetes: every resource passes
//! `kubernetes-validate --strict` (installed by deploy/install-deps.sh), and
//! the DaemonSet keeps its hardening: a read-only root file system, a
//! non-root user, and credentials mounted from a Secret volume, never
//! passed in environment variables. The relay configuration the ConfigMap
//! carries passes `holdfastd check-config` with the Secret's files in place.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The repository's root directory.
fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Every Kubernetes resource file: the *.yaml files except
/// kustomization.yaml, which is kustomize's, not a resource.
fn manifests() -> Vec<PathBuf> {
    let dir = repo_root().join("deploy/kubernetes");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|error| panic!("{}: {error}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "yaml"))
        .filter(|path| {
            path.file_name()
                .is_some_and(|name| name != "kustomization.yaml")
        })
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no manifests in {}", dir.display());
    files
}

#[test]
fn deploy_manifests_validate_and_keep_the_daemonset_hardened() {
    let validator = repo_root().join(".deps/bin/kubernetes-validate");
    assert!(
        validator.exists(),
        "{} missing: run deploy/install-deps.sh",
        validator.display()
    );
    let files = manifests();
    let output = Command::new(&validator)
        .args(["--strict", "--quiet"])
        .args(&files)
        .output()
        .unwrap_or_else(|error| panic!("{}: {error}", validator.display()));
    assert!(
        output.status.success(),
        "kubernetes-validate --strict failed ({}):\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );

    // No YAML parser here: check the DaemonSet's text, comments left out.
    let daemonsets: Vec<(PathBuf, String)> = files
        .iter()
        .map(|path| {
            let text = std::fs::read_to_string(path).unwrap();
            let code: Vec<&str> = text
                .lines()
                .filter(|line| !line.trim_start().starts_with('#'))
                .collect();
            (path.clone(), code.join("\n"))
        })
        .filter(|(_, code)| code.lines().any(|line| line == "kind: DaemonSet"))
        .collect();
    assert_eq!(
        daemonsets.len(),
        1,
        "expected one DaemonSet manifest, found {daemonsets:?}"
    );
    let (path, daemonset) = &daemonsets[0];
    let path = path.display();
    assert!(
        daemonset.contains("readOnlyRootFilesystem: true")
            && !daemonset.contains("readOnlyRootFilesystem: false"),
        "{path}: every container needs readOnlyRootFilesystem: true"
    );
    assert!(
        daemonset.contains("runAsNonRoot: true"),
        "{path}: the relay must run as non-root"
    );
    assert!(
        daemonset.lines().any(|line| line.trim() == "secret:"),
        "{path}: credentials must come from a secret volume"
    );
    for reference in ["secretKeyRef", "secretRef"] {
        assert!(
            !daemonset.contains(reference),
            "{path}: {reference} puts a secret into the environment; mount it as a file"
        );
    }
}

/// The `holdfast.toml` embedded in the ConfigMap, as holdfastd reads it.
fn configmap_relay_config() -> String {
    let path = repo_root().join("deploy/kubernetes/configmap.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let mut lines = text
        .lines()
        .skip_while(|line| line.trim() != "holdfast.toml: |");
    assert!(
        lines.next().is_some(),
        "{}: no holdfast.toml",
        path.display()
    );
    let block: Vec<&str> = lines
        .take_while(|line| line.is_empty() || line.starts_with("    "))
        .collect();
    block
        .iter()
        .map(|line| line.strip_prefix("    ").unwrap_or(line))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn the_configmaps_relay_config_is_accepted_with_its_secret_files_in_place() {
    // The Secret's files, where the DaemonSet mounts them: here, in a temp
    // dir standing in for /etc/holdfast/secrets, with real credentials.
    let secrets = tempfile::tempdir().unwrap();
    let certificates = crate::clusters::Certificates::generate("relay");
    let fixture = crate::nats_jwt::NatsAuthFixture::generate("relay", None);
    let dir = secrets.path();
    crate::clusters::secret_file(dir, "nats.creds", &fixture.user_creds);
    for (name, from) in [
        ("nats-ca.pem", certificates.ca()),
        ("etcd-ca.pem", certificates.ca()),
        ("etcd-client.pem", certificates.client_cert()),
        ("etcd-client.key", certificates.client_key()),
    ] {
        std::fs::copy(from, dir.join(name)).unwrap();
    }
    let config =
        configmap_relay_config().replace("/etc/holdfast/secrets", &dir.display().to_string());
    let config_path = dir.join("holdfast.toml");
    std::fs::write(&config_path, config).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_holdfastd"))
        .arg("--config")
        .arg(&config_path)
        .arg("check-config")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "holdfastd check-config refused the ConfigMap's config:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        "configuration OK"
    );
    // And a missing Secret file is caught before a rollout.
    std::fs::remove_file(dir.join("nats.creds")).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_holdfastd"))
        .arg("--config")
        .arg(&config_path)
        .arg("check-config")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("nats.creds_file"));
}
