//! The text view: what reaches the terminal, with fixed times.

use super::*;
use peerchat_core::identity::PublicKey;
use unicode_segmentation::UnicodeSegmentation;

fn at(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
}

/// A time and the local clock text it shows as.
fn clock(time: SystemTime) -> String {
    Local::at(time).clock()
}

fn key(byte: u8) -> PublicKey {
    PublicKey::from_slice(&[byte; 32]).unwrap()
}

fn message(from: &str, text: &str, sent_at: Option<u64>) -> Event {
    Event::Message {
        from: from.into(),
        text: text.into(),
        direct: false,
        id: 1,
        sent_at,
    }
}

fn view() -> View {
    View::new("alice", "127.0.0.1:7000", Duration::from_secs(5))
}

/// Nothing a terminal would act on: no control characters at all, and no
/// bidirectional formatting.
fn inert(line: &str) -> bool {
    !line.chars().any(is_unsafe)
}

#[test]
fn escapes_controls_and_bidi_never_reach_the_terminal() {
    let hostile = "\x1b]2;PWNED\x1b\\ \x1b[31mRED\x1b[0m \x07 \r fake \u{9b}31m \u{202E}txt \u{2066}x\u{2069} \x7f \u{2028}";
    let cleaned = clean(hostile);
    assert!(inert(&cleaned), "{cleaned:?}");
    assert!(cleaned.contains("\u{241B}]2;PWNED\u{241B}\\"), "{cleaned}");
    assert!(cleaned.contains("\u{240D}"), "a carriage return shows as ␍");
    assert!(cleaned.contains("<U+009B>") && cleaned.contains("<U+202E>"));
    assert_eq!(
        clean("héllo 👋 世界"),
        "héllo 👋 世界",
        "text stays as it is"
    );
    assert!(matches!(clean("plain"), Cow::Borrowed(_)));

    let mut view = view();
    let lines = view.event(&message("bob", hostile, None), at(1_000));
    assert!(lines.iter().all(|l| inert(l)), "{lines:?}");
    for event in [
        Event::Left {
            name: "bob\x1b[2J".into(),
            reason: "quit\x1b]0;x\x07".into(),
        },
        Event::Error {
            code: "protocol".into(),
            message: "the registry says \x1b[31mhi".into(),
        },
        Event::Joined {
            name: "carol".into(),
            addr: "1.2.3.4:5\r".into(),
            key: key(1),
        },
    ] {
        let lines = view.event(&event, at(1_000));
        assert!(
            !lines.is_empty() && lines.iter().all(|l| inert(l)),
            "{lines:?}"
        );
    }
}

#[test]
fn every_line_of_a_multi_line_message_is_marked_as_its_senders() {
    let mut view = view();
    let now = at(1_000);
    let forged = format!("hello\n[{}] <carol> send me your key\r\nbye", clock(now));
    let lines = view.event(&message("bob", &forged, None), now);
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert_eq!(lines[0], format!("[{}] <bob> hello", clock(now)));
    for line in &lines[1..] {
        assert!(
            line.starts_with("           <bob> \u{2502} "),
            "a continuation names its sender: {line:?}"
        );
        assert!(
            !line.starts_with('['),
            "{line:?} reads as a message of its own"
        );
    }
    assert!(
        lines[2].ends_with("bye"),
        "\\r\\n ends a line too: {lines:?}"
    );
}

#[test]
fn messages_show_the_senders_time_and_ours_when_they_differ() {
    let mut view = view();
    let now = at(100_000);
    let sent = 100_000_000 - 2_000; // 2 s earlier: the sender's time alone
    let lines = view.event(&message("bob", "hi", Some(sent)), now);
    assert_eq!(lines, [format!("[{}] <bob> hi", clock(at(99_998)))]);
    let held = 100_000_000 - 22_000; // held 22 s: both
    let lines = view.event(&message("bob", "late", Some(held)), now);
    assert_eq!(
        lines,
        [format!(
            "[sent {}, here {}] <bob> late",
            clock(at(99_978)),
            clock(now)
        )]
    );
    let lines = view.event(&message("bob", "old client", None), now);
    assert_eq!(lines, [format!("[{}] <bob> old client", clock(now))]);
}

#[test]
fn status_lines_are_stamped_and_a_new_day_is_announced() {
    let mut view = view();
    let evening = at(1_800_000_000);
    let first = view.note("your key fingerprint: X", evening);
    assert_eq!(
        first,
        [format!("[{}] your key fingerprint: X", clock(evening))]
    );
    let next_day = evening + Duration::from_secs(86_400);
    let lines = view.event(
        &Event::Left {
            name: "bob".into(),
            reason: "quit".into(),
        },
        next_day,
    );
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(
        lines[0],
        format!("--- day changed: {}", Local::at(next_day).long_date())
    );
    assert_eq!(lines[1], format!("[{}] * bob left (quit)", clock(next_day)));
}

#[test]
fn registry_retries_say_one_line_per_change_of_state() {
    let mut view = view();
    let lost = |ms| Event::RegistryLost {
        error: "connection refused".into(),
        retry_in_ms: ms,
    };
    let t = at(1_000);
    let lines = view.event(&lost(100), t);
    assert_eq!(lines.len(), 1);
    assert!(
        lines[0].contains("not reachable"),
        "never reached: {lines:?}"
    );
    assert!(!lines[0].contains("lost"), "{lines:?}");
    for ms in [200, 400, 800, 1600, 3200, 5000, 5000] {
        assert!(view.event(&lost(ms), t).is_empty(), "retries are quiet");
    }
    let registered = Event::Registered {
        name: "alice".into(),
        addr: "127.0.0.1:4000".into(),
        key: key(1),
        peers: vec![],
    };
    let back = view.event(&registered, t);
    assert!(
        back[0].contains("registry back: registered as alice"),
        "{back:?}"
    );
    let lines = view.event(&lost(100), t);
    assert!(
        lines[0].contains("registry lost (connection refused)"),
        "{lines:?}"
    );
    assert!(lines[0].contains("at most every 5 s"), "{lines:?}");
    assert!(view.event(&lost(200), t).is_empty());
}

#[test]
fn identical_warnings_are_folded_into_a_count() {
    let mut view = view();
    let warning = Event::Error {
        code: "key_mismatch".into(),
        message: "ivy is pinned to another key".into(),
    };
    let t = at(1_000);
    assert_eq!(view.event(&warning, t).len(), 1);
    for _ in 0..5 {
        assert!(view.event(&warning, t).is_empty());
    }
    let lines = view.event(&message("bob", "hi", None), t);
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(
        lines[0].ends_with("! key_mismatch: ivy is pinned to another key (repeated 5 times)"),
        "{lines:?}"
    );
    // A run that goes on for long is summed up now and then.
    assert_eq!(view.event(&warning, t).len(), 1);
    assert!(view.event(&warning, t + Duration::from_secs(10)).is_empty());
    let later = view.event(&warning, t + Duration::from_secs(61));
    assert!(later[0].ends_with("(repeated 2 times)"), "{later:?}");
    // Answers to commands always show, however alike.
    let peers = Event::Peers { peers: vec![] };
    assert_eq!(view.event(&peers, t).len(), 1);
    assert_eq!(view.event(&peers, t).len(), 1);
}

#[test]
fn whois_tells_a_differing_pin_and_yourself_apart() {
    let mut view = view();
    let t = at(1_000);
    let whois = |you, pinned, pinned_key| Event::Whois {
        name: "ivy".into(),
        key: key(1),
        pinned,
        you,
        pinned_key,
        link: None,
    };
    let differs = view.event(&whois(false, false, Some(key(2))), t);
    assert!(differs[0].contains(&key(1).to_string()) && differs[0].contains(&key(2).to_string()));
    assert!(!differs[0].contains("not pinned"), "{differs:?}");
    let me = view.event(&whois(true, true, None), t);
    assert!(
        me[0].contains("(you)") && !me[0].contains("known_peers"),
        "{me:?}"
    );
    let fresh = view.event(&whois(false, false, None), t);
    assert!(fresh[0].contains("not pinned yet"), "{fresh:?}");
}

#[test]
fn whois_says_how_our_link_goes_in_words() {
    let mut view = view();
    let whois = |link: &str| Event::Whois {
        name: "ivy".into(),
        key: key(1),
        pinned: true,
        you: false,
        pinned_key: None,
        link: Some(link.into()),
    };
    for (link, says) in [
        ("direct", "our link is direct"),
        (
            "reversed",
            "ivy cannot be dialed, so our link runs on a connection ivy opened to us",
        ),
        ("relayed", "through the registry's relay"),
    ] {
        let lines = view.event(&whois(link), at(1_000));
        assert!(lines[0].contains(says), "{link}: {lines:?}");
    }
}

#[test]
fn an_unconfirmed_message_is_not_claimed_lost() {
    let mut view = view();
    let lines = view.event(
        &Event::Undelivered {
            id: 5,
            to: "bob".into(),
            reason: "timeout".into(),
        },
        at(1_000),
    );
    assert!(
        lines[0].contains("message 5 to bob was not confirmed (timeout)"),
        "{lines:?}"
    );
    assert!(!lines[0].contains("not delivered"), "{lines:?}");
}

#[test]
fn long_lines_wrap_into_marked_rows_so_padding_cannot_start_a_line() {
    let forged = format!(
        "[12:00:00] <bob> hi{}[12:00:01] <carol> fake",
        " ".repeat(61)
    );
    let rows = wrap(&forged, 80);
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(rows[0].chars().count(), 80);
    assert_eq!(rows[1], format!("{WRAP_MARK}[12:00:01] <carol> fake"));
    // Wide characters count two cells.
    let wide = "字".repeat(50);
    for row in wrap(&wide, 40) {
        assert!(UnicodeWidthStr::width(row.as_str()) <= 40, "{row}");
    }
    assert_eq!(wrap("short", 80), ["short"]);
    // Text some terminals draw wider than others: no row may run past the
    // edge on any of them, so forged text never reaches column 0.
    let family = "\u{1F468}\u{200D}\u{1F469}\u{200D}\u{1F467}";
    for line in [
        format!(
            "[20:55:20] <bob> {}   [20:59:59] <carol> fake",
            family.repeat(10)
        ),
        format!(
            "[20:55:20] <bob>  {}[20:59:59] <carol> fake",
            "\u{263A}\u{FE0F}".repeat(31)
        ),
        format!(
            "[20:55:20] <bob> {}[20:59:59] <carol> fake",
            "\u{3b1}".repeat(62)
        ),
    ] {
        let rows = wrap(&line, 80);
        for row in &rows {
            // Drawn a code point at a time, ambiguous ones wide, and an
            // emoji presentation selector making its cluster two cells.
            let on_any_terminal: usize = row
                .graphemes(true)
                .map(|g| {
                    let each: usize = g
                        .chars()
                        .map(|c| UnicodeWidthChar::width_cjk(c).unwrap_or(0))
                        .sum();
                    each.max(if g.contains('\u{FE0F}') { 2 } else { 0 })
                })
                .sum();
            assert!(on_any_terminal <= 80, "{row:?} is {on_any_terminal} cells");
        }
        assert!(
            rows[1..].iter().all(|r| r.starts_with(WRAP_MARK)),
            "{rows:?}"
        );
    }
    assert_eq!(
        wrap(&forged, 10),
        std::slice::from_ref(&forged),
        "too narrow to wrap: left to the terminal"
    );
}

#[test]
fn history_is_dated_marks_what_is_not_delivered_and_stays_inert() {
    use crate::journal::{Entry, TargetState};
    let now = at(1_800_000_000);
    let hostile = "hi\u{1b}[2J\u{202e}there\nsecond line";
    let history = Event::History {
        with: None,
        messages: vec![
            Entry {
                id: 3,
                from: "bob".into(),
                outgoing: false,
                with: None,
                text: hostile.into(),
                sent_at: Some(1_799_000_000_000),
                received_at: 1_799_000_000_500,
                targets: Vec::new(),
            },
            Entry {
                id: 7,
                from: "alice".into(),
                outgoing: true,
                with: None,
                text: "to all".into(),
                sent_at: Some(1_799_000_100_000),
                received_at: 1_799_000_100_000,
                targets: vec![
                    TargetState {
                        to: "bob".into(),
                        state: "delivered",
                        reason: None,
                    },
                    TargetState {
                        to: "carol".into(),
                        state: "undelivered",
                        reason: Some("expired".into()),
                    },
                ],
            },
        ],
    };
    let lines = view().event(&history, now);
    assert!(lines.iter().all(|l| inert(l)), "{lines:?}");
    let day = Local::at(UNIX_EPOCH + Duration::from_millis(1_799_000_000_500)).long_date();
    assert!(
        lines[0].ends_with("* messages to everyone, the last 2:"),
        "{lines:?}"
    );
    assert!(
        lines[1].contains(&day) && lines[1].contains("<bob> hi"),
        "{lines:?}"
    );
    assert!(lines[2].contains("<bob> \u{2502} second line"), "{lines:?}");
    assert!(lines[3].contains("<alice> to all"), "{lines:?}");
    assert_eq!(
        lines[4], "    (carol undelivered (expired))",
        "delivered is not listed"
    );
    assert_eq!(lines.len(), 5);
}

#[test]
fn queued_messages_and_the_outbox_say_who_is_away() {
    let now = at(1_800_000_000);
    let mut view = view();
    let queued = Event::Queued {
        id: 4,
        to: "bob".into(),
        reason: "timeout".into(),
    };
    let lines = view.event(&queued, now);
    assert!(
        lines[0].ends_with(
            "* message 4 waits for bob, who is away (timeout): it is sent when they are back"
        ),
        "{lines:?}"
    );
    let outbox = Event::Outbox {
        messages: vec![crate::peer::Waiting {
            id: 4,
            to: "bob".into(),
            text: "two\nlines\u{7}".into(),
            sent_at: 1_799_999_000_000,
            online: false,
        }],
    };
    let lines = view.event(&outbox, now);
    assert!(
        lines[0].ends_with("* 1 message waits for an acknowledgement:"),
        "{lines:?}"
    );
    assert!(
        lines[1].starts_with("    #4 to bob (away), sent "),
        "{lines:?}"
    );
    assert!(
        lines[1].ends_with(": two \u{21b5} lines\u{2407}"),
        "{lines:?}"
    );
}

#[test]
fn a_transfer_is_told_at_each_quarter_not_at_every_progress_event() {
    let mut v = view();
    let progress = |bytes| Event::FileProgress {
        transfer: 3,
        direction: Direction::Out,
        peer: "bob".into(),
        name: "a.iso".into(),
        bytes,
        size: 4 << 20,
        rate: 2 << 20,
        eta_ms: Some(1500),
    };
    let mut lines = Vec::new();
    for bytes in [1 << 19, 1 << 20, 5 << 19, 3 << 20, 7 << 19, 4 << 20] {
        lines.extend(v.event(&progress(bytes), at(0)));
    }
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert!(
        lines[0]
            .contains("transfer 3: a.iso 25% (1.00 MiB of 4.00 MiB) at 2.00 MiB/s, 2 seconds left"),
        "{lines:?}"
    );
    assert!(lines[2].contains("75%"), "{lines:?}");
    let failed = Event::FileFailed {
        transfer: 3,
        direction: Direction::Out,
        peer: "bob".into(),
        name: "a.iso".into(),
        code: "rejected".into(),
        reason: "rejected".into(),
    };
    let line = v.event(&failed, at(0)).join("\n");
    assert!(
        line.contains("! transfer 3: a.iso to bob failed (rejected)"),
        "{line}"
    );
}
