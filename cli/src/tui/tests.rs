//! The UI without a terminal: its behaviour on keys and events, and its
//! screens drawn on ratatui's test backend, kept as snapshots (`cargo insta
//! review` updates them after a deliberate change).

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use peerchat_core::identity::PublicKey;
use peerchat_core::protocol::PeerEntry;
use ratatui::backend::TestBackend;
use ratatui::crossterm::event::{Event as TermEvent, KeyCode, KeyEvent, KeyModifiers};
use ratatui::style::Color;
use ratatui::Terminal;

use super::*;

/// Fri 2026-12-04 09:30 UTC.
fn noon() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_796_376_600)
}

fn key(n: u8) -> PublicKey {
    PublicKey::from_slice(&[n; 32]).unwrap()
}

fn entry(name: &str, n: u8) -> PeerEntry {
    PeerEntry {
        name: name.into(),
        addr: format!("127.0.0.1:{}", 40000 + u16::from(n)),
        key: key(n),
        reachable: None,
    }
}

struct Ui {
    app: App,
    now: Instant,
    wall: SystemTime,
}

impl Ui {
    /// alice, registered, with bob, 张伟 and 🦀crab online; bob pinned.
    fn new() -> Ui {
        let pins = HashMap::from([("bob".to_string(), key(2))]);
        let mut app = App::new("alice", key(1), pins, vec!["earlier line".into()]);
        app.use_utc();
        let mut ui = Ui {
            app,
            now: Instant::now(),
            wall: noon(),
        };
        ui.event(Event::Registered {
            name: "alice".into(),
            addr: "127.0.0.1:40001".into(),
            key: key(1),
            peers: vec![entry("bob", 2), entry("张伟", 3), entry("🦀crab", 4)],
        });
        ui
    }

    fn event(&mut self, event: Event) {
        self.app.apply(Update::Event(event), self.now, self.wall);
    }

    fn later(&mut self, secs: u64) {
        self.now += Duration::from_secs(secs);
        self.wall += Duration::from_secs(secs);
    }

    fn message(&mut self, from: &str, text: &str, direct: bool, id: u64) {
        let sent_at = self.wall.duration_since(UNIX_EPOCH).unwrap().as_millis() as u64;
        self.event(Event::Message {
            from: from.into(),
            text: text.into(),
            direct,
            id,
            sent_at: Some(sent_at),
        });
    }

    fn own(&mut self, id: u64, text: &str, to: Option<&str>, targets: &[&str]) {
        let update = Update::Own {
            id,
            text: text.into(),
            to: to.map(Into::into),
            targets: targets.iter().map(|t| t.to_string()).collect(),
        };
        self.app.apply(update, self.now, self.wall);
    }

    fn keys(&mut self, keys: &[KeyEvent]) -> Vec<Effect> {
        let mut effects = Vec::new();
        for key in keys {
            effects.extend(self.app.input(TermEvent::Key(*key), self.wall));
        }
        effects
    }

    fn typed(&mut self, text: &str) -> Vec<Effect> {
        let mut keys: Vec<KeyEvent> = text
            .chars()
            .map(|c| KeyEvent::new(KeyCode::Char(c), KeyModifiers::NONE))
            .collect();
        keys.push(plain(KeyCode::Enter));
        self.keys(&keys)
    }

    fn screen(&mut self, width: u16, height: u16) -> Terminal<TestBackend> {
        let mut terminal = Terminal::new(TestBackend::new(width, height)).unwrap();
        terminal
            .draw(|frame| render::draw(frame, &mut self.app, self.now))
            .unwrap();
        terminal
    }

    fn text(&mut self, width: u16, height: u16) -> String {
        self.screen(width, height).backend().to_string()
    }
}

fn plain(code: KeyCode) -> KeyEvent {
    KeyEvent::new(code, KeyModifiers::NONE)
}

fn ctrl(c: char) -> KeyEvent {
    KeyEvent::new(KeyCode::Char(c), KeyModifiers::CONTROL)
}

fn alt(c: char) -> KeyEvent {
    KeyEvent::new(KeyCode::Char(c), KeyModifiers::ALT)
}

fn sends(effects: &[Effect]) -> Vec<&str> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Send(line) => Some(line.as_str()),
            _ => None,
        })
        .collect()
}

/// A conversation of every kind of line: messages in CJK and emoji, ours
/// with its marks, an action, a mention, a day change, folded joins.
fn busy() -> Ui {
    let mut ui = Ui::new();
    ui.message("bob", "hi all", false, 1);
    ui.own(1, "hello bob, 你好", None, &["bob", "张伟", "🦀crab"]);
    ui.event(Event::Delivered {
        id: 1,
        to: "bob".into(),
    });
    ui.message(
        "张伟",
        "你好世界！这是一条很长的消息，用来测试换行是否正确处理宽字符。",
        false,
        1,
    );
    ui.message("🦀crab", "/me waves 👋🏽 with a family 👨‍👩‍👧", false, 1);
    ui.message("bob", "alice: are you there?", false, 2);
    ui.own(2, "yes", None, &["bob"]);
    ui.event(Event::Delivered {
        id: 2,
        to: "bob".into(),
    });
    ui.later(15 * 3600);
    for (name, n) in [("dave", 5), ("erin", 6), ("frank", 7)] {
        ui.event(Event::Joined {
            name: name.into(),
            addr: "127.0.0.1:1".into(),
            key: key(n),
        });
    }
    ui.event(Event::Left {
        name: "erin".into(),
        reason: "timeout".into(),
    });
    ui.own(3, "good morning", None, &["bob", "dave"]);
    ui.event(Event::Queued {
        id: 3,
        to: "dave".into(),
        reason: "offline".into(),
    });
    ui.message("bob", "a word for you", true, 3);
    ui
}

#[test]
fn the_main_layout_wide() {
    let mut ui = busy();
    insta::assert_snapshot!(ui.text(100, 20));
}

#[test]
fn the_main_layout_narrow_wraps_and_drops_the_list() {
    let mut ui = busy();
    insta::assert_snapshot!(ui.text(40, 16));
}

#[test]
fn a_direct_conversation_and_the_registry_lost() {
    let mut ui = busy();
    ui.keys(&[alt('2')]);
    ui.event(Event::RegistryLost {
        error: "connection refused".into(),
        retry_in_ms: 4000,
    });
    ui.keys(&[KeyEvent::new(KeyCode::Char('d'), KeyModifiers::NONE)]);
    insta::assert_snapshot!(ui.text(80, 10));
}

#[test]
fn the_help_lists_every_command() {
    let mut ui = Ui::new();
    ui.typed("/help");
    let screen = ui.text(120, 32);
    for (command, _) in COMMANDS {
        assert!(
            screen.contains(&format!("{command} ")) || screen.contains(&format!("{command}:")),
            "{command} in\n{screen}"
        );
    }
    ui.typed("/nonsense");
    assert!(ui
        .text(120, 24)
        .contains("unknown command /nonsense; /help lists the commands"));
}

#[test]
fn nothing_from_the_network_reaches_the_terminal_raw() {
    let mut ui = Ui::new();
    ui.message(
        "bob",
        "\x1b]0;owned\x07\x1b[2J\x1b[31mred\u{202E}desrever",
        false,
        1,
    );
    ui.event(Event::Joined {
        name: "ev\x1b[1Ail".into(),
        addr: "1.2.3.4:5".into(),
        key: key(9),
    });
    ui.event(Event::Left {
        name: "bob".into(),
        reason: "\x1b[Hforged".into(),
    });
    let terminal = ui.screen(120, 10);
    for cell in terminal.backend().buffer().content() {
        assert!(
            !cell
                .symbol()
                .chars()
                .any(|c| c.is_control() || ('\u{202A}'..='\u{202E}').contains(&c)),
            "a raw control {:?} reached the screen",
            cell.symbol()
        );
    }
    let text = terminal.backend().to_string();
    assert!(
        text.contains("␛]0;owned␇␛[2J␛[31mred<U+202E>desrever"),
        "{text}"
    );
}

#[test]
fn updates_wait_for_the_store_and_keep_their_order() {
    let mut ui = Ui::new();
    let (now, wall) = (ui.now, ui.wall);
    let message = |id: u64| {
        Update::Event(Event::Message {
            from: "bob".into(),
            text: format!("m{id}"),
            direct: false,
            id,
            sent_at: None,
        })
    };
    ui.app.hold(1, message(1), now, wall);
    ui.app.hold(2, message(2), now, wall);
    assert!(
        !ui.text(60, 8).contains("m1"),
        "shown before it was written"
    );
    ui.app.shown(1, now, wall);
    let screen = ui.text(60, 8);
    assert!(screen.contains("m1") && !screen.contains("m2"), "{screen}");
    ui.app.shown(2, now, wall);
    let screen = ui.text(60, 8);
    assert!(screen.find("m1") < screen.find("m2"), "{screen}");
}

#[test]
fn a_paste_is_taken_line_by_line_and_its_tail_stays_editable() {
    let mut ui = Ui::new();
    ui.keys(&[KeyEvent::new(KeyCode::Char('>'), KeyModifiers::NONE)]);
    let effects = ui.app.input(
        TermEvent::Paste("one\r\n/msg bob two\nthree\nfou".into()),
        ui.wall,
    );
    // The /msg went to bob's conversation: what follows goes there too.
    assert_eq!(
        sends(&effects),
        vec![">one", "/msg bob two", "/msg bob three"]
    );
    assert_eq!(ui.app.editor.text(), "fou");
    assert_eq!(ui.app.convs[ui.app.current].title(), "bob");
    // In bob's conversation, what is typed goes to bob.
    let effects = ui.keys(&[plain(KeyCode::Char('r')), plain(KeyCode::Enter)]);
    assert_eq!(sends(&effects), vec!["/msg bob four"]);
    let effects = ui.typed("/me nods");
    assert_eq!(sends(&effects), vec!["/msg bob /me nods"]);
    let effects = ui.typed("//not a command");
    assert_eq!(sends(&effects), vec!["/msg bob /not a command"]);
    ui.keys(&[alt('1')]);
    assert_eq!(sends(&ui.typed("//slash")), vec!["//slash"]);
    assert!(ui.typed("hi").contains(&Effect::Remember("hi".into())));
}

#[test]
fn ctrl_c_clears_the_line_then_quits() {
    let mut ui = Ui::new();
    ui.keys(&[plain(KeyCode::Char('x'))]);
    assert!(ui.keys(&[ctrl('c')]).is_empty());
    assert_eq!(ui.app.editor.text(), "");
    assert_eq!(ui.keys(&[ctrl('c')]), vec![Effect::Quit]);
    assert_eq!(sends(&ui.typed("/quit")), vec!["/quit"]);
    assert_eq!(ui.keys(&[ctrl('z')]), vec![Effect::Suspend]);
    assert_eq!(ui.keys(&[ctrl('l')]), vec![Effect::Redraw]);
}

#[test]
fn conversations_open_switch_count_unread_and_close() {
    let mut ui = Ui::new();
    ui.message("bob", "psst", true, 1);
    assert_eq!(ui.app.convs.len(), 2);
    assert_eq!(ui.app.convs[1].unread, 1);
    ui.message("张伟", "alice?", true, 1);
    assert!(
        ui.app.convs[2].mentioned && ui.app.bell,
        "a mention rings and marks"
    );
    assert_eq!(
        sends(&ui.app.backlog_wanted()),
        vec!["/history 200", "/history bob 200", "/history 张伟 200"]
    );
    ui.keys(&[ctrl('n'), ctrl('n')]);
    assert_eq!(ui.app.current, 2);
    assert!(!ui.app.convs[2].mentioned && ui.app.convs[2].unread == 0);
    ui.keys(&[ctrl('p')]);
    assert_eq!(ui.app.current, 1);
    ui.typed("/close");
    assert_eq!(ui.app.convs.len(), 2);
    ui.typed("/query carol");
    assert_eq!(ui.app.convs[ui.app.current].title(), "carol");
    assert_eq!(sends(&ui.app.backlog_wanted()), vec!["/history carol 200"]);
    assert_eq!(sends(&ui.typed("/history 5")), vec!["/history carol 5"]);
    ui.keys(&[alt('1')]);
    ui.typed("/close");
    assert_eq!(ui.app.convs.len(), 3, "everyone's stays");
}

#[test]
fn history_from_the_store_goes_before_what_is_shown_without_repeats() {
    let mut ui = Ui::new();
    ui.message("bob", "live", false, 7);
    let stored = |id: u64, text: &str| Entry {
        id,
        from: "bob".into(),
        outgoing: false,
        with: None,
        text: text.into(),
        sent_at: Some(1_796_300_000_000 + id),
        received_at: 1_796_300_000_000 + id,
        targets: Vec::new(),
    };
    ui.event(Event::History {
        with: None,
        messages: vec![stored(6, "old"), stored(7, "live")],
    });
    let screen = ui.text(80, 10);
    assert_eq!(screen.matches("live").count(), 1, "{screen}");
    assert!(screen.find("old") < screen.find("live"), "{screen}");
    assert!(
        screen.contains("Thu 2026-12-03"),
        "stored lines are dated: {screen}"
    );
}

#[test]
fn delivery_marks_follow_the_outcomes_and_info_explains_them() {
    let mut ui = Ui::new();
    ui.own(5, "to both", None, &["bob", "张伟"]);
    assert!(ui.text(80, 6).contains("to both …"));
    ui.event(Event::Delivered {
        id: 5,
        to: "bob".into(),
    });
    assert!(ui.text(80, 6).contains("to both ✓ 1/2"));
    ui.event(Event::Undelivered {
        id: 5,
        to: "张伟".into(),
        reason: "expired".into(),
    });
    assert!(ui.text(80, 6).contains("✗ 1 of 2 failed #5"));
    ui.typed("/info 5");
    let screen = ui.text(100, 8);
    assert!(screen.contains("message 5 to bob: delivered"), "{screen}");
    assert!(
        screen.contains("message 5 to 张伟: not confirmed (expired)"),
        "{screen}"
    );
    ui.own(6, "alone", None, &[]);
    assert!(ui.text(80, 6).contains("alone ✗ nobody online"));
}

#[test]
fn joins_and_leaves_in_a_burst_fold_into_one_line() {
    let mut ui = Ui::new();
    for n in 10..40u8 {
        ui.event(Event::Joined {
            name: format!("p{n}"),
            addr: "127.0.0.1:1".into(),
            key: key(n),
        });
    }
    let lines = &ui.app.convs[0].lines;
    assert_eq!(lines.len(), 1, "one folded line");
    assert!(ui
        .text(120, 5)
        .contains("→ 30 joined: p10, p11, p12, p13, p14, p15, p16, p17, +22 more"));
    ui.later(3);
    ui.event(Event::Left {
        name: "p10".into(),
        reason: "quit".into(),
    });
    assert_eq!(
        ui.app.convs[0].lines.len(),
        2,
        "a later one starts a new line"
    );
}

#[test]
fn tab_completes_names_online_and_up_recalls_the_stored_history() {
    let mut ui = Ui::new();
    ui.keys(&[plain(KeyCode::Char('b')), plain(KeyCode::Tab)]);
    assert_eq!(ui.app.editor.text(), "bob: ");
    ui.keys(&[ctrl('u'), plain(KeyCode::Up)]);
    assert_eq!(ui.app.editor.text(), "earlier line");
}

#[test]
fn a_look_alike_name_never_wears_a_pinned_names_colour() {
    let mut ui = Ui::new();
    // Find a key whose colour, without the rule, would be bob's.
    let bob = render::nick_colour(&ui.app, "bob", Some(key(2)));
    let clash = (10..=255u8)
        .find(|&n| render::nick_colour(&ui.app, "zed", Some(key(n))) == bob)
        .expect("some key shares bob's colour");
    ui.event(Event::Joined {
        name: "b\u{43E}b".into(),
        addr: "127.0.0.1:1".into(),
        key: key(clash),
    });
    // With a Cyrillic о.
    let fake = render::nick_colour(&ui.app, "b\u{43E}b", Some(key(clash)));
    assert_ne!(fake, bob, "it looks like bob");
    assert_ne!(fake, Color::Red);
}

#[test]
fn scrolling_holds_the_view_while_lines_arrive() {
    let mut ui = Ui::new();
    for id in 1..=50 {
        ui.message("bob", &format!("line {id}"), false, id);
    }
    ui.screen(60, 10);
    ui.keys(&[plain(KeyCode::PageUp)]);
    let before = ui.text(60, 10);
    assert!(before.contains("more below: End"), "{before}");
    ui.message("bob", "line 51", false, 51);
    assert_eq!(ui.text(60, 10), before, "the view holds");
    ui.keys(&[plain(KeyCode::End)]);
    assert!(ui.text(60, 10).contains("line 51"));
    ui.keys(&[plain(KeyCode::Home)]);
    assert!(ui.text(60, 10).contains("line 1 "), "Home goes to the top");
}

#[test]
fn tiny_terminals_draw_without_a_panic() {
    let mut ui = busy();
    ui.keys(&[plain(KeyCode::PageUp)]);
    for (w, h) in [(1, 1), (2, 2), (10, 3), (15, 4), (0, 0)] {
        ui.screen(w, h);
    }
}

#[test]
fn without_a_store_no_history_is_asked_for() {
    let mut ui = Ui::new();
    ui.app.without_store();
    ui.message("bob", "psst", true, 1);
    assert!(ui.app.backlog_wanted().is_empty());
}

#[test]
fn answers_and_errors_show_in_the_conversation_shown() {
    let mut ui = Ui::new();
    // A name nobody knows: the peer's error, no conversation for it.
    assert_eq!(sends(&ui.typed("/msg nobody hi")), vec!["/msg nobody hi"]);
    assert_eq!(ui.app.convs.len(), 1);
    ui.event(Event::Error {
        code: "unknown_peer".into(),
        message: "no peer named \"nobody\" is online or was met before (see /peers)".into(),
    });
    ui.event(Event::Whois {
        name: "bob".into(),
        key: key(2),
        pinned: true,
        you: false,
        pinned_key: None,
        link: None,
    });
    let screen = ui.text(120, 6);
    assert!(
        screen.contains("-!- unknown_peer: no peer named \"nobody\""),
        "{screen}"
    );
    assert!(
        screen.contains(&format!("-!- bob: key {} (pinned in known_peers)", key(2))),
        "{screen}"
    );
}

#[test]
fn file_commands_go_to_the_peer_and_progress_shows_in_the_status_bar() {
    let mut ui = Ui::new();
    let effects = ui.typed("/send bob ~/a file.txt");
    assert_eq!(sends(&effects), vec!["/send bob ~/a file.txt"]);
    for line in ["/accept 2 /tmp", "/reject 3", "/cancel 4"] {
        assert_eq!(sends(&ui.typed(line)), vec![line]);
    }
    ui.event(Event::FileOffer {
        transfer: 5,
        direction: Direction::In,
        peer: "bob".into(),
        name: "photo.jpg".into(),
        size: 2 << 20,
        sha256: "ab".repeat(32),
    });
    ui.event(Event::FileProgress {
        transfer: 5,
        direction: Direction::In,
        peer: "bob".into(),
        name: "photo.jpg".into(),
        bytes: 1 << 20,
        size: 2 << 20,
        rate: 3 << 20,
        eta_ms: Some(333),
    });
    let screen = ui.text(100, 8);
    assert!(
        screen.contains("bob offers photo.jpg (2.00 MiB): /accept 5"),
        "{screen}"
    );
    assert!(screen.contains("#5↓50% 3.00 MiB/s"), "{screen}");
    ui.event(Event::FileDone {
        transfer: 5,
        direction: Direction::In,
        peer: "bob".into(),
        name: "photo.jpg".into(),
        size: 2 << 20,
        path: "/home/me/Downloads/peerchat/photo.jpg".into(),
    });
    let screen = ui.text(100, 8);
    assert!(!screen.contains("#5↓"), "{screen}");
    assert!(
        screen.contains("saved /home/me/Downloads/peerchat/photo.jpg from bob"),
        "{screen}"
    );
}

#[test]
fn people_nobody_can_dial_are_marked_in_the_list_and_our_own_probe_is_said() {
    let mut ui = Ui::new();
    assert!(!ui.text(100, 8).contains("~nat"));
    ui.event(Event::Reachable {
        name: "bob".into(),
        reachable: false,
        you: false,
    });
    let screen = ui.text(100, 8);
    assert!(screen.contains("bob ~nat"), "{screen}");
    assert!(!screen.contains("cannot dial you"), "{screen}");
    ui.event(Event::Reachable {
        name: "alice".into(),
        reachable: false,
        you: true,
    });
    assert!(ui.text(100, 8).contains("others cannot dial you"));
    ui.event(Event::Reachable {
        name: "bob".into(),
        reachable: true,
        you: false,
    });
    assert!(!ui.text(100, 8).contains("bob ~nat"));
}
