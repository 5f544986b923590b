//! The Debian package as an operator meets it: built with cargo-deb
//! (`packaging/build-deb.sh`, here from the test build's binaries), its
//! contents listed, and the service unit's command line run as an
//! unprivileged user the way systemd runs it (its state directory, its
//! readiness notification, a clean SIGTERM). As root, the package is also
//! installed, its binaries, manual pages, completions and unit checked,
//! and removed again.
//!
//! Needs cargo-deb (`cargo install cargo-deb`; `.ci/run` installs it).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use peerchat_testkit::client::Client;
use peerchat_testkit::launch::LONG;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// What the package must hold (paths as `dpkg-deb -c` lists them).
const CONTENTS: &[&str] = &[
    "./usr/bin/peerchat",
    "./usr/bin/peerchat-registry",
    "./usr/share/man/man1/peerchat.1.gz",
    "./usr/share/man/man1/peerchat-registry.1.gz",
    "./usr/share/bash-completion/completions/peerchat",
    "./usr/share/bash-completion/completions/peerchat-registry",
    "./usr/share/zsh/vendor-completions/_peerchat",
    "./usr/share/zsh/vendor-completions/_peerchat-registry",
    "./usr/share/fish/vendor_completions.d/peerchat.fish",
    "./usr/share/fish/vendor_completions.d/peerchat-registry.fish",
    "./usr/lib/systemd/system/peerchat-registry.service",
    "./etc/default/peerchat-registry",
    "./usr/share/doc/peerchat/README.md",
    "./usr/share/doc/peerchat/LICENSE-MIT",
    "./usr/share/doc/peerchat/LICENSE-APACHE",
    "./usr/share/doc/peerchat/copyright",
];

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn build_deb() -> PathBuf {
    let found = Command::new("cargo").args(["deb", "--version"]).output();
    assert!(
        found.is_ok_and(|out| out.status.success()),
        "this test needs cargo-deb: cargo install cargo-deb (.ci/run installs it)"
    );
    let out = run(Command::new(Path::new(ROOT).join("packaging/build-deb.sh"))
        .arg("dev")
        .current_dir(ROOT));
    let deb = PathBuf::from(out.lines().last().expect("the .deb's path").trim());
    let deb = if deb.is_absolute() {
        deb
    } else {
        Path::new(ROOT).join(deb)
    };
    assert!(deb.exists(), "{} was not made", deb.display());
    deb
}

/// The unit's `ExecStart=` as systemd would run it: `%S` is the state
/// directories' root, the variables come from the default file.
fn exec_start(unit: &str, state_root: &Path, registry_bin: &Path) -> Vec<String> {
    let line = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("the unit has an ExecStart line");
    let defaults =
        std::fs::read_to_string(Path::new(ROOT).join("packaging/peerchat-registry.default"))
            .unwrap();
    assert!(
        defaults.contains("PEERCHAT_REGISTRY_LISTEN=")
            && defaults.contains("PEERCHAT_REGISTRY_OPTS="),
        "the default file sets what ExecStart uses"
    );
    let line = line
        .replace("%S", &state_root.display().to_string())
        .replace("${PEERCHAT_REGISTRY_LISTEN}", "127.0.0.1:0")
        .replace("$PEERCHAT_REGISTRY_OPTS", "");
    let mut words: Vec<String> = line.split_whitespace().map(String::from).collect();
    assert_eq!(words[0], "/usr/bin/peerchat-registry");
    words[0] = registry_bin.display().to_string();
    words
}

/// Runs the unit's command line as `nobody` (as root) or as ourselves, with
/// a notification socket as systemd gives one, and checks readiness, that
/// it serves, and a clean SIGTERM.
fn run_like_systemd(unit: &str, registry_bin: &Path) {
    let dir = std::env::temp_dir().join(format!("peerchat-unit-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    // StateDirectory=peerchat-registry, StateDirectoryMode=0700.
    let state = dir.join("peerchat-registry");
    std::fs::create_dir(&state).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).unwrap();
    let socket_path = dir.join("notify");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    std::fs::set_permissions(&socket_path, std::fs::Permissions::from_mode(0o777)).unwrap();
    socket.set_read_timeout(Some(LONG)).unwrap();

    let words = exec_start(unit, &dir, registry_bin);
    let mut cmd = if is_root() {
        const NOBODY: u32 = 65534;
        std::os::unix::fs::chown(&state, Some(NOBODY), Some(NOBODY)).unwrap();
        let mut cmd = Command::new("setpriv");
        cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"]);
        cmd.args(&words);
        cmd
    } else {
        let mut cmd = Command::new(&words[0]);
        cmd.args(&words[1..]);
        cmd
    };
    let mut child = cmd
        .env_clear()
        .env("NOTIFY_SOCKET", &socket_path)
        .env("PATH", "/usr/bin:/bin")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the unit's command starts");
    let (tx, rx) = mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });

    let mut buf = [0u8; 256];
    let n = socket
        .recv(&mut buf)
        .expect("READY=1 on the notification socket");
    assert_eq!(&buf[..n], b"READY=1\n");
    let addr: SocketAddr = loop {
        let line = rx.recv_timeout(LONG).expect("it says where it listens");
        if let Some((_, addr)) = line.split_once(" INFO listening on ") {
            break addr.trim().parse().unwrap();
        }
    };
    let (_client, welcome) = Client::register(addr, "operator", 9);
    assert!(format!("{welcome:?}").contains("Welcome"), "{welcome:?}");

    // SAFETY: signalling the child we started.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let n = socket.recv(&mut buf).expect("STOPPING=1");
    assert_eq!(&buf[..n], b"STOPPING=1\n");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "no exit 10 s after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "SIGTERM ends it cleanly: {status}");
    let key =
        std::fs::metadata(state.join("registry.key")).expect("its key in the state directory");
    assert_eq!(key.mode() & 0o077, 0, "the key is private");
    assert!(
        state.join("names").exists(),
        "its names file in the state directory"
    );
    if is_root() {
        assert_eq!(key.uid(), 65534, "made by the unprivileged user");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_debian_package_builds_installs_runs_its_unit_and_removes() {
    let deb = build_deb();
    let listing = run(Command::new("dpkg-deb").arg("-c").arg(&deb));
    for path in CONTENTS {
        assert!(
            listing.lines().any(|l| l.ends_with(path)),
            "{path} is not in the package:\n{listing}"
        );
    }
    let info = run(Command::new("dpkg-deb").arg("-I").arg(&deb));
    assert!(info.contains("Package: peerchat"), "{info}");
    let unit = std::fs::read_to_string(Path::new(ROOT).join("packaging/peerchat-registry.service"))
        .unwrap();
    for hardening in [
        "Type=notify",
        "DynamicUser=yes",
        "StateDirectory=peerchat-registry",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "SystemCallFilter=@system-service",
        "CapabilityBoundingSet=\n",
        "Restart=on-failure",
        "LimitNOFILE=",
        "EnvironmentFile=-/etc/default/peerchat-registry",
    ] {
        assert!(unit.contains(hardening), "the unit lacks {hardening:?}");
    }

    if !is_root() {
        eprintln!("not root: the package is built and listed, not installed; the unit's command runs from the build");
        let bin = peerchat_testkit::bins::bin("registry");
        run_like_systemd(&unit, &bin);
        return;
    }
    run(Command::new("dpkg").arg("-i").arg(&deb));
    let version = run(Command::new("/usr/bin/peerchat-registry").arg("--version"));
    assert!(version.contains(env!("CARGO_PKG_VERSION")), "{version}");
    run(Command::new("/usr/bin/peerchat").arg("--version"));
    if have("man") {
        for page in ["peerchat", "peerchat-registry"] {
            let path = run(Command::new("man").args(["-w", page]));
            assert!(path.contains(&format!("{page}.1")), "{path}");
        }
    }
    for name in ["peerchat", "peerchat-registry"] {
        let script =
            format!("source /usr/share/bash-completion/completions/{name} && complete -p {name}");
        let loaded = run(Command::new("bash").args(["-c", &script]));
        assert!(loaded.contains(name), "{loaded}");
    }
    if have("systemd-analyze") {
        run(Command::new("systemd-analyze").args([
            "verify",
            "/usr/lib/systemd/system/peerchat-registry.service",
        ]));
    }
    run_like_systemd(&unit, Path::new("/usr/bin/peerchat-registry"));
    run(Command::new("dpkg").args(["-r", "peerchat"]));
    for gone in ["/usr/bin/peerchat", "/usr/bin/peerchat-registry"] {
        assert!(!Path::new(gone).exists(), "{gone} is left after removal");
    }
    assert!(
        !Path::new("/usr/lib/systemd/system/peerchat-registry.service").exists(),
        "the unit is left after removal"
    );
}
