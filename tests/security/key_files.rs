//! Key files: those others may read, or that are not keys, are refused;
//! new ones are made private.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use peerchat_core::identity::Identity;
use peerchat_testkit::bins::bin;
use peerchat_testkit::launch::{PeerProc, Registry, LONG};
use peerchat_testkit::process::{DataDir, Proc};

fn mode(path: &std::path::Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// Runs the registry with `args` (and a fresh data directory) and returns
/// its exit status and stderr; it must exit within `LONG`.
pub fn registry_exit(args: &[&str]) -> (Option<i32>, String) {
    let data = DataDir::fresh();
    let mut child = Command::new(bin("registry"))
        .args(args)
        .env("XDG_DATA_HOME", data.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let mut proc = Proc {
        child,
        stderr: Default::default(),
    };
    let status = proc.wait_exit(LONG).expect("the registry exits");
    let mut text = String::new();
    stderr.read_to_string(&mut text).unwrap();
    (status.code(), text)
}

#[test]
fn key_files_that_others_may_read_or_that_are_not_keys_are_refused() {
    let reg = Registry::start(&[]);
    let dir = DataDir::fresh();
    let open = dir.path().join("open.key");
    Identity::load_or_create(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o644)).unwrap();
    let garbage = dir.path().join("garbage.key");
    std::fs::write(&garbage, "hello\n").unwrap();
    std::fs::set_permissions(&garbage, std::fs::Permissions::from_mode(0o600)).unwrap();

    for (path, what, says) in [
        (&open, "a key others may read", "0644"),
        (&garbage, "a file that is not a key", "not a peerchat key"),
    ] {
        let path = path.to_str().unwrap();
        let mut peer = PeerProc::start_with("x", &reg.addr.to_string(), &["--identity", path]);
        let err = peer.expect_event("error", LONG);
        let message = err["message"].as_str().unwrap();
        assert!(message.contains(says), "peer, {what}: {err}");
        assert_eq!(
            peer.proc.wait_exit(LONG).unwrap().code(),
            Some(2),
            "peer, {what}"
        );
        assert!(
            peer.proc.stderr.wait_for(says, Duration::from_secs(2)),
            "peer, {what}: stderr says why: {:?}",
            peer.proc.stderr.snapshot()
        );

        let (code, stderr) = registry_exit(&["--listen", "127.0.0.1:0", "--key", path]);
        assert!(
            matches!(code, Some(c) if c != 0),
            "registry, {what}: exits with {code:?}"
        );
        assert!(
            stderr.contains(says) && stderr.contains(path),
            "registry, {what}: {stderr}"
        );
        assert!(
            !stderr.contains("listening on"),
            "registry, {what}: {stderr}"
        );
    }
    assert_eq!(mode(&open), 0o644, "a refused key file is left as it was");
    assert_eq!(std::fs::read_to_string(&garbage).unwrap(), "hello\n");

    // A missing --identity is made, private, and is the key the peer uses.
    let fresh = dir.path().join("new/dir/mine.key");
    let fresh_text = fresh.to_str().unwrap().to_string();
    let mut peer = PeerProc::start_with("y", &reg.addr.to_string(), &["--identity", &fresh_text]);
    let registered = peer.registered();
    assert_eq!(mode(&fresh), 0o600);
    assert_eq!(mode(fresh.parent().unwrap()), 0o700);
    let key = Identity::load(&fresh).unwrap().public();
    assert_eq!(registered["key"], key.to_string().as_str());
    assert_eq!(peer.key(), key);
    // And the default one, in the data directory, is private too.
    let mut z = PeerProc::start("z", reg.addr);
    z.registered();
    let default = z.data.peer_key_file("z");
    assert_eq!(mode(&default), 0o600, "{}", default.display());
    assert_eq!(Identity::load(&default).unwrap().public(), z.key());
}
