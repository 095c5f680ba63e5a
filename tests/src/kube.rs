//! Kubernetes schema validation for tests: `kubernetes-validate`, a PyPI
//! package that ships the API schemas, so it runs offline. `.ci/run`
//! installs it; without it the tests that call it fail.
//!
//! The version is pinned to the oldest Kubernetes Postern supports: native
//! sidecars (`restartPolicy: Always` on an init container) are on by
//! default from 1.29.

use std::path::Path;
use std::process::Command;

/// The Kubernetes version manifests are validated against.
pub const KUBERNETES_VERSION: &str = "1.29.0";

/// Validates `yaml` (named `name` in messages) and fails the test with the
/// validator's report if it does not pass. Strict: unknown fields are
/// errors.
///
/// # Panics
///
/// When it does not validate, or `kubernetes-validate` cannot be run.
pub fn assert_valid(name: &str, yaml: &str) {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir
        .path()
        .join(Path::new(name).file_name().expect("a file name"));
    std::fs::write(&file, yaml).expect("write manifest");
    let output = Command::new("kubernetes-validate")
        .args(["--strict", "--kubernetes-version", KUBERNETES_VERSION])
        .arg(&file)
        .output()
        .expect("kubernetes-validate must be installed (pip install kubernetes-validate; .ci/run does it)");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success() && !report.contains("ERROR"),
        "{name} does not validate against Kubernetes {KUBERNETES_VERSION}:\n{report}"
    );
    let documents = yaml.matches("\n---\n").count() + 1;
    assert_eq!(
        report.matches(" passed for resource ").count(),
        documents,
        "every document of {name} was checked:\n{report}"
    );
}
