//! Store files the peer must refuse, and leave as they were.

use super::*;

/// A registry address nobody listens on: the store is opened before the
/// registry is dialed, so none is needed to be refused.
fn dead_registry() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    drop(listener);
    addr.to_string()
}

/// Runs a peer that must refuse its store at `path`: status 2, promptly,
/// saying why on stderr and naming the file, and leaving it as it was.
/// Returns what it said.
fn refuses(data: &DataDir, name: &str, extra: &[&str], path: &Path) -> String {
    let before = std::fs::read(path).unwrap();
    let mode = std::fs::metadata(path).unwrap().permissions().mode();
    let started = Instant::now();
    let mut p = PeerProc::start_again(data, name, &dead_registry(), extra);
    let status = p.proc.wait_exit(Duration::from_secs(5));
    let took = started.elapsed();
    let shown = path.display().to_string();
    assert!(
        p.proc.stderr.wait_for(&shown, LONG),
        "stderr does not name {shown}: {:?}",
        p.proc.stderr.snapshot()
    );
    let stderr = p.proc.stderr.snapshot().join("\n");
    assert_eq!(
        status.map(|s| s.code()),
        Some(Some(2)),
        "exit status after {took:?}; stderr {stderr}"
    );
    p.drain_until_exit(LONG);
    let error = p.seen.iter().find(|v| v["event"] == "error");
    assert_eq!(
        error.map(|e| &e["code"]),
        Some(&Value::from("store")),
        "{:?}",
        p.seen
    );
    assert!(
        std::fs::read(path).unwrap() == before,
        "{shown} was changed"
    );
    assert_eq!(
        std::fs::metadata(path).unwrap().permissions().mode(),
        mode,
        "{shown}: its mode was changed"
    );
    stderr
}

/// A store as a peer leaves it: started once (no registry needed), then
/// quit.
fn made_store(name: &str) -> (DataDir, PathBuf) {
    let data = DataDir::fresh();
    let mut p = PeerProc::start_again(&data, name, &dead_registry(), &[]);
    p.key();
    p.close_input();
    let status = p.proc.wait_exit(LONG);
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{:?}", p.seen);
    let path = store_path(&data, name);
    assert!(path.is_file(), "no store at {}", path.display());
    (data, path)
}

#[test]
fn a_store_that_is_not_ours_is_refused_and_left_alone() {
    // Garbage bytes where the store should be.
    let data = DataDir::fresh();
    let path = store_path(&data, "alice");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::set_permissions(
        path.parent().unwrap(),
        std::fs::Permissions::from_mode(0o700),
    )
    .unwrap();
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let garbage: Vec<u8> = (0..8192)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(&path, &garbage).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let said = refuses(&data, "alice", &[], &path);
    assert!(said.contains("not a peerchat store"), "{said}");

    // A store others may write.
    let (data, path) = made_store("alice");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
    let said = refuses(&data, "alice", &[], &path);
    assert!(said.contains("writable by nobody else"), "{said}");

    // Another identity's store, named with --store.
    // Bound: its directory goes when it is dropped.
    let (_theirs, path) = made_store("alice");
    let other = DataDir::fresh();
    let store = path.to_str().unwrap();
    let said = refuses(&other, "alice", &["--store", store], &path);
    assert!(said.contains("belongs to key"), "{said}");

    // Another user's store: only root can make one.
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        let (data, path) = made_store("alice");
        std::os::unix::fs::chown(&path, Some(65534), Some(65534)).unwrap();
        let said = refuses(&data, "alice", &[], &path);
        assert!(said.contains("owner 65534"), "{said}");
    } else {
        eprintln!("not root: the store of another user is not tried");
    }
}

#[test]
fn a_store_in_use_by_a_running_peer_is_refused_and_left_alone() {
    let registry = dead_registry();
    let mut first = PeerProc::start_with("alice", &registry, &[]);
    first.key(); // Said once the store is open.
    let path = store_path(&first.data, "alice");
    let store = path.to_str().unwrap();
    // The same key, as a second copy of the same user would have it.
    let said = refuses(&first.data, "alice", &["--store", store], &path);
    assert!(said.contains("in use"), "{said}");

    // The first one never noticed.
    assert!(
        first.proc.child.try_wait().unwrap().is_none(),
        "the first peer exited"
    );
    first.say("/history");
    let history = first.expect_event("history", LONG);
    assert_eq!(history["messages"], serde_json::json!([]), "{history}");
    first.close_input();
    assert_eq!(first.proc.wait_exit(LONG).and_then(|s| s.code()), Some(0));
}

// ---------------------------------------------------------------------------
// History
// ---------------------------------------------------------------------------
