//! The workspace's `registry` and `peer` binaries, for a test or a bench:
//! they belong to other packages of the workspace, so Cargo does not build
//! them for the root package's targets by itself.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// Path of a workspace binary, built once per test or bench process.
pub fn bin(name: &str) -> PathBuf {
    dir().join(name)
}

/// The directory that holds both binaries, built on first use in the
/// profile this process was built in (release for benches).
pub fn dir() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(build)
}

fn build() -> PathBuf {
    let exe = std::env::current_exe().expect("own executable path");
    // target/<profile>/deps/<test> → target/<profile>
    let profile_dir = exe
        .parent()
        .and_then(|p| p.parent())
        .expect("target dir")
        .to_path_buf();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args([
        "build",
        "--quiet",
        "-p",
        "peerchat-registry",
        "-p",
        "peerchat-peer",
        "--bins",
    ]);
    if profile_dir.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    if let Some(target) = profile_dir.parent() {
        cmd.env("CARGO_TARGET_DIR", target);
    }
    let status = cmd.status().expect("cargo runs");
    assert!(status.success(), "building the binaries failed");
    profile_dir
}
