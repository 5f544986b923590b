//! The full-screen UI in a real terminal: tmux runs `peer` as a person
//! would, the test types, pastes, switches conversations, resizes,
//! suspends and resumes it, and reads the screen with `capture-pane`. A
//! `--json` peer watches what actually goes out.
//!
//! Needs tmux (`.ci/run` installs it when missing).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use peerchat_testkit::bins::bin;
use peerchat_testkit::launch::{PeerProc, Registry};
use peerchat_testkit::process::DataDir;

const LONG: Duration = Duration::from_secs(20);

/// A tmux server of the test's own (its own socket), killed at the end.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn new(label: &str) -> Tmux {
        let found = Command::new("tmux").arg("-V").output();
        assert!(
            found.is_ok_and(|out| out.status.success()),
            "this test needs tmux (apt-get install tmux; .ci/run installs it)"
        );
        Tmux {
            socket: format!("peerchat-{label}-{}", std::process::id()),
        }
    }

    fn run(&self, args: &[&str]) -> String {
        let out = Command::new("tmux")
            .args(["-L", &self.socket])
            .args(args)
            .output()
            .expect("tmux runs");
        assert!(
            out.status.success(),
            "tmux {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A window of `width` x `height` running `command`, kept open after
    /// it exits (to read what it left).
    fn session(&self, name: &str, width: u16, height: u16, command: &[&str]) {
        let (w, h) = (width.to_string(), height.to_string());
        let mut args = vec!["new-session", "-d", "-s", name, "-x", &w, "-y", &h];
        args.extend(command);
        self.run(&args);
        self.run(&["set-option", "-t", name, "remain-on-exit", "on"]);
    }

    fn screen(&self, target: &str) -> String {
        self.run(&["capture-pane", "-p", "-t", target])
    }

    /// Waits until the screen shows what `ok` wants; fails with the screen.
    fn wait(&self, target: &str, what: &str, ok: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + LONG;
        loop {
            let screen = self.screen(target);
            if ok(&screen) {
                return screen;
            }
            assert!(
                Instant::now() < deadline,
                "{target}: waited {LONG:?} for {what}; the screen:\n{screen}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn wait_for(&self, target: &str, needle: &str) -> String {
        self.wait(target, needle, |screen| screen.contains(needle))
    }

    fn keys(&self, target: &str, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", target];
        args.extend(keys);
        self.run(&args);
    }

    /// Types `text` literally, then Enter.
    fn line(&self, target: &str, text: &str) {
        self.run(&["send-keys", "-t", target, "-l", text]);
        self.keys(target, &["Enter"]);
    }

    /// Pastes `text` as a terminal does: in bracketed-paste markers when the
    /// program asked for them (`paste-buffer -p`).
    fn paste(&self, target: &str, text: &str, dir: &Path) {
        let file = dir.join("paste.txt");
        std::fs::write(&file, text).expect("the paste file");
        self.run(&["load-buffer", "-b", "paste", file.to_str().unwrap()]);
        self.run(&["paste-buffer", "-p", "-d", "-b", "paste", "-t", target]);
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["-L", &self.socket, "kill-server"])
            .output();
    }
}

/// The command that runs a UI peer named `name` with its own data.
fn peer_command(data: &DataDir, name: &str, registry: &str) -> Vec<String> {
    vec![
        "env".into(),
        format!("XDG_DATA_HOME={}", data.path().display()),
        "TERM=tmux-256color".into(),
        bin("peer").display().to_string(),
        "--name".into(),
        name.into(),
        "--registry".into(),
        registry.into(),
        "--listen".into(),
        "127.0.0.1:0".into(),
    ]
}

#[test]
fn two_ui_peers_chat_paste_switch_resize_suspend_and_quit() {
    let registry = Registry::start(&[]);
    let addr = registry.addr.to_string();
    let mut obs = PeerProc::start("obs", registry.addr);
    obs.registered();
    let tmux = Tmux::new("ui");
    let (alice_data, bob_data) = (DataDir::fresh(), DataDir::fresh());

    // alice in a shell, for job control (Ctrl-Z, fg); bob on his own.
    tmux.session(
        "alice",
        100,
        30,
        &["env", "PS1=shell$ ", "bash", "--norc", "--noprofile", "-i"],
    );
    tmux.wait_for("alice", "shell$");
    let alice_cmd = peer_command(&alice_data, "alice", &addr);
    let quoted: Vec<String> = alice_cmd.iter().map(|a| format!("'{a}'")).collect();
    tmux.line("alice", &quoted.join(" "));
    let bob_cmd = peer_command(&bob_data, "bob", &addr);
    let bob_args: Vec<&str> = bob_cmd.iter().map(String::as_str).collect();
    tmux.session("bob", 100, 30, &bob_args);

    for (me, other) in [("alice", "bob"), ("bob", "alice")] {
        tmux.wait(me, "registered, with the other listed", |s| {
            s.contains("registry: connected") && s.contains(other) && s.contains("2 online")
        });
    }
    obs.expect("bob joined", LONG, |v| {
        v["event"] == "joined" && v["name"] == "bob"
    });

    // Typed.
    tmux.line("alice", "hello from alice, 你好 👋");
    tmux.wait_for("bob", "<alice> hello from alice, 你好 👋");
    tmux.wait_for("alice", "hello from alice, 你好 👋 ✓");
    obs.expect("the typed line", LONG, |v| {
        v["event"] == "message" && v["text"] == "hello from alice, 你好 👋"
    });

    // 100 lines pasted at once: each sent, in order, once.
    let pasted: Vec<String> = (1..=100).map(|n| format!("paste line {n:03}")).collect();
    tmux.paste("alice", &(pasted.join("\n") + "\n"), alice_data.path());
    for text in &pasted {
        let got = obs.expect(&format!("{text:?} from alice"), LONG, |v| {
            v["event"] == "message" && v["from"] == "alice"
        });
        assert_eq!(got["text"], text.as_str(), "pasted lines out of order");
    }
    tmux.wait_for("bob", "<alice> paste line 100");
    tmux.wait_for("alice", "paste line 100 ✓");

    // A direct message opens conversations on both sides.
    tmux.line("alice", "/msg bob just for you");
    tmux.wait("alice", "alice in bob's conversation", |s| {
        s.contains("[bob]") && s.contains("just for you ✓")
    });
    let screen = tmux.wait_for("bob", "2:alice(1)");
    assert!(
        !screen.contains("just for you"),
        "not in everyone's:\n{screen}"
    );
    tmux.keys("bob", &["M-2"]);
    tmux.wait("bob", "bob in alice's conversation", |s| {
        s.contains("[alice]") && s.contains("<alice> just for you")
    });
    // Typed there, it goes to alice alone.
    tmux.line("bob", "back at you");
    tmux.wait_for("alice", "<bob> back at you");
    let direct = obs.try_expect(Duration::from_millis(300), |v| {
        v["event"] == "message" && v["text"] == "back at you"
    });
    assert!(direct.is_err(), "a direct message reached a third peer");

    // Narrow: the list of people goes, the messages stay.
    tmux.run(&["resize-window", "-t", "bob", "-x", "45", "-y", "15"]);
    tmux.wait("bob", "the narrow layout", |s| {
        !s.contains("online") && s.contains("back at you") && s.contains("reg ok")
    });
    tmux.run(&["resize-window", "-t", "bob", "-x", "100", "-y", "30"]);
    tmux.wait_for("bob", "2 online");

    // Ctrl-Z gives the shell back; what comes meanwhile shows after fg.
    tmux.keys("alice", &["C-z"]);
    tmux.wait("alice", "the shell after Ctrl-Z", |s| {
        s.contains("Stopped") && s.trim_end().ends_with("shell$")
    });
    obs.say("while you were away");
    tmux.line("alice", "fg");
    tmux.wait(
        "alice",
        "the UI back after fg, the message counted unread",
        |s| s.contains("registry: connected") && s.contains("1:everyone(1)"),
    );
    tmux.keys("alice", &["M-1"]);
    tmux.wait_for("alice", "<obs> while you were away");

    // Ctrl-C on an empty line quits, and the terminal works as before.
    tmux.keys("alice", &["C-c"]);
    tmux.wait("alice", "the shell after quitting", |s| {
        s.trim_end().ends_with("shell$") && !s.contains("registry: connected")
    });
    tmux.line(
        "alice",
        "stty -a | tr ' ' '\\n' | grep -x -e icanon -e echo | tr '\\n' ,",
    );
    tmux.wait_for("alice", "icanon,echo,");
    obs.expect("alice left", LONG, |v| {
        v["event"] == "left" && v["name"] == "alice"
    });
}

#[test]
fn the_input_history_survives_a_restart() {
    let registry = Registry::start(&[]);
    let addr = registry.addr.to_string();
    let mut obs = PeerProc::start("obs", registry.addr);
    obs.registered();
    let tmux = Tmux::new("history");
    let data = DataDir::fresh();
    let cmd = peer_command(&data, "dora", &addr);
    let args: Vec<&str> = cmd.iter().map(String::as_str).collect();
    tmux.session("one", 80, 20, &args);
    tmux.wait_for("one", "registry: connected");
    tmux.line("one", "a line worth recalling");
    tmux.wait_for("one", "a line worth recalling ✓");
    tmux.line("one", "/quit");
    tmux.wait("one", "the peer exited", |s| !s.contains("registry:"));

    tmux.session("two", 80, 20, &args);
    // Its last screenful of history is back too.
    tmux.wait_for("two", "<dora> a line worth recalling");
    tmux.keys("two", &["Up", "Up"]);
    tmux.wait_for("two", "[everyone] a line worth recalling");
}
