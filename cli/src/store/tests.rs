//! The store on disk and on its thread, against files made for each test.

use std::os::unix::fs::PermissionsExt;
use std::sync::{mpsc, Arc, Mutex};

use super::*;
use crate::journal::{Incoming, Transfer};

/// A directory of this test's own, empty.
fn fresh_dir(label: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("peerchat-store-{label}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    dir
}

fn key(n: u8) -> PublicKey {
    PublicKey::from_slice(&[n; 32]).unwrap()
}

fn party(n: u8, name: &str) -> Party {
    Party {
        key: key(n),
        name: name.into(),
    }
}

fn options(dir: &Path, history: bool) -> Options {
    Options {
        path: dir.join("sub/store.db"),
        owner: key(0),
        name: "me".into(),
        history,
    }
}

fn open(options: &Options) -> (Store, Saved) {
    Store::open(options.clone()).unwrap()
}

fn refusal(options: &Options) -> StoreError {
    match Store::open(options.clone()) {
        Ok(_) => panic!("{} was opened", options.path.display()),
        Err(e) => e,
    }
}

fn acked(target: &Party, through: u64) -> Record {
    Record::Acked {
        target: target.key,
        through,
    }
}

fn failed(id: u64, target: &Party, reason: &str, at: u64) -> Record {
    Record::Failed {
        id,
        target: target.key,
        reason: reason.into(),
        at,
    }
}

fn sent(id: u64, text: &str, direct: bool, targets: &[&Party]) -> Record {
    Record::Sent(Outgoing {
        id,
        text: text.into(),
        direct,
        sent_at: 1000 + id,
        targets: targets.iter().map(|&p| p.clone()).collect(),
    })
}

fn received(from: &Party, instance: u64, id: u64, text: &str, direct: bool) -> Record {
    Record::Received(Incoming {
        from: from.clone(),
        instance,
        id,
        text: text.into(),
        direct,
        sent_at: Some(500 + id),
        received_at: 2000 + id,
    })
}

fn outbox_of(options: &Options) -> Vec<(u64, Vec<String>)> {
    open(options)
        .1
        .outbox
        .into_iter()
        .map(|o| (o.id, o.targets.into_iter().map(|t| t.name).collect()))
        .collect()
}

fn history(store: &mut Store, with: Option<Party>, limit: usize) -> Vec<Entry> {
    store.query(&Query::History { with, limit }).unwrap()
}

fn search(store: &mut Store, text: &str, limit: usize) -> Vec<u64> {
    store
        .query(&Query::Search {
            text: text.into(),
            limit,
        })
        .unwrap()
        .into_iter()
        .map(|e| e.id)
        .collect()
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn a_new_store_is_private_and_keeps_its_instance_and_next_id() {
    let dir = fresh_dir("new");
    let options = options(&dir, true);
    let (mut store, saved) = open(&options);
    assert_ne!(saved.instance, 0);
    assert_eq!(saved.next_id, 1);
    assert!(saved.outbox.is_empty() && saved.seen.is_empty());
    assert_eq!(mode(&options.path), 0o600);
    assert_eq!(mode(&dir.join("sub")), 0o700);
    store
        .write(&[sent(7, "seven", false, &[&party(1, "a")])])
        .unwrap();
    let mut wal = options.path.clone().into_os_string();
    wal.push("-wal");
    assert_eq!(mode(Path::new(&wal)), 0o600);
    drop(store);

    let (mut store, again) = open(&options);
    assert_eq!(again.instance, saved.instance);
    assert_eq!(again.next_id, 8);
    // A lower id never lowers it.
    store
        .write(&[sent(3, "three", false, &[&party(1, "a")])])
        .unwrap();
    drop(store);
    assert_eq!(open(&options).1.next_id, 8);
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_outbox_keeps_what_still_waits_on_someone() {
    let dir = fresh_dir("outbox");
    let options = options(&dir, true);
    let (a, b, c) = (party(1, "alice"), party(2, "bob"), party(3, "carol"));
    let (mut store, _) = open(&options);
    store
        .write(&[
            sent(1, "to all", false, &[&a, &b, &c]),
            sent(2, "to bob", true, &[&b]),
        ])
        .unwrap();
    drop(store);
    let (mut store, saved) = open(&options);
    assert_eq!(
        saved.outbox,
        [
            Outgoing {
                id: 1,
                text: "to all".into(),
                direct: false,
                sent_at: 1001,
                targets: vec![a.clone(), b.clone(), c.clone()],
            },
            Outgoing {
                id: 2,
                text: "to bob".into(),
                direct: true,
                sent_at: 1002,
                targets: vec![b.clone()],
            },
        ]
    );

    store
        .write(&[
            acked(&a, 1),
            failed(1, &b, "expired", 5),
            // Again: no harm.
            failed(1, &b, "expired", 6),
            // Nobody we know: ignored.
            Record::Acked {
                target: key(9),
                through: 5,
            },
            received(&party(3, "carol2"), 1, 1, "renamed", false),
        ])
        .unwrap();
    drop(store);
    assert_eq!(
        outbox_of(&options),
        [(1, vec!["carol2".into()]), (2, vec!["bob".into()])]
    );

    let (mut store, _) = open(&options);
    // Bob's acknowledgement delivers message 2; message 1 failed him already.
    store.write(&[acked(&b, 2)]).unwrap();
    drop(store);
    assert_eq!(outbox_of(&options), [(1, vec!["carol2".into()])]);

    let (mut store, _) = open(&options);
    store.write(&[Record::Settled { id: 1 }]).unwrap();
    drop(store);
    assert_eq!(outbox_of(&options), []);
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn without_history_settled_messages_and_received_text_are_not_kept() {
    let dir = fresh_dir("nohistory");
    let options = options(&dir, false);
    let a = party(1, "alice");
    let (mut store, _) = open(&options);
    store
        .write(&[
            sent(1, "mine", false, &[&a]),
            received(&a, 40, 8, "secret", false),
            failed(1, &a, "expired", 5),
        ])
        .unwrap();
    // The outbox keeps its text until it settles.
    let everyone = history(&mut store, None, 10);
    assert_eq!(everyone.iter().map(|e| e.id).collect::<Vec<_>>(), [1]);
    assert_eq!(search(&mut store, "mine", 10), [1]);
    assert_eq!(search(&mut store, "secret", 10), Vec::<u64>::new());
    store.write(&[Record::Settled { id: 1 }]).unwrap();
    assert_eq!(history(&mut store, None, 10), []);
    assert_eq!(search(&mut store, "mine", 10), Vec::<u64>::new());
    let rows: i64 = store
        .conn
        .query_row(
            "SELECT (SELECT count(*) FROM messages) + (SELECT count(*) FROM failures)",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(rows, 0);
    drop(store);
    let saved = open(&options).1;
    assert_eq!(saved.seen, HashMap::from([(a.key, (40, 8))]));
    assert_eq!(saved.next_id, 2);
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn seen_counts_within_the_sender_s_instance() {
    let dir = fresh_dir("seen");
    let options = options(&dir, true);
    let (a, b) = (party(1, "alice"), party(2, "bob"));
    let high = (1 << 63) + 5;
    let (mut store, _) = open(&options);
    store
        .write(&[
            received(&a, 10, 5, "five", false),
            received(&a, 10, 3, "three", false),
            received(&b, u64::MAX, 2, "two", false),
        ])
        .unwrap();
    store
        .write(&[
            received(&b, u64::MAX, high, "high", false),
            // Above 2^63 is still above.
            received(&b, u64::MAX, 4, "four", false),
        ])
        .unwrap();
    drop(store);
    let (mut store, saved) = open(&options);
    assert_eq!(
        saved.seen,
        HashMap::from([(a.key, (10, 5)), (b.key, (u64::MAX, high))])
    );
    // A new instance starts over, even lower.
    store.write(&[received(&a, 11, 2, "again", false)]).unwrap();
    drop(store);
    assert_eq!(open(&options).1.seen[&a.key], (11, 2));
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn transfers_are_kept_until_they_end() {
    let dir = fresh_dir("transfers");
    let options = options(&dir, false);
    let (a, b) = (party(1, "alice"), party(2, "bob"));
    let ours = Transfer {
        id: u64::MAX - 1,
        outgoing: true,
        peer: b.clone(),
        path: "/home/me/a b.iso".into(),
        name: "a b.iso".into(),
        size: 1 << 40,
        sha256: [9; 32],
    };
    // The same id both ways is two transfers.
    let theirs = Transfer {
        outgoing: false,
        peer: a.clone(),
        path: "/home/me/Downloads".into(),
        ..ours.clone()
    };
    let (mut store, _) = open(&options);
    store
        .write(&[
            Record::Transfer(ours.clone()),
            Record::Transfer(theirs.clone()),
        ])
        .unwrap();
    drop(store);
    let (mut store, saved) = open(&options);
    assert_eq!(saved.transfers, vec![ours.clone(), theirs.clone()]);
    store
        .write(&[Record::TransferEnded {
            peer: b.key,
            id: ours.id,
            outgoing: true,
        }])
        .unwrap();
    drop(store);
    assert_eq!(open(&options).1.transfers, vec![theirs]);
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn history_and_search_answer_with_each_target_s_outcome() {
    let dir = fresh_dir("history");
    let options = options(&dir, true);
    let (a, b) = (party(1, "alice"), party(2, "bob"));
    let (mut store, _) = open(&options);
    store
        .write(&[
            sent(1, "hello everyone", false, &[&a, &b]),
            received(&a, 1, 9, "hi me, privately", true),
            sent(2, "reply to alice", true, &[&a]),
            received(&b, 1, 4, r#"bob says "quoted" AND NEAR(x) col:umn*"#, false),
            acked(&a, 1),
            failed(1, &b, "expired", 5),
        ])
        .unwrap();

    let everyone = history(&mut store, None, 10);
    assert_eq!(
        everyone,
        [
            Entry {
                id: 1,
                from: "me".into(),
                outgoing: true,
                with: None,
                text: "hello everyone".into(),
                sent_at: Some(1001),
                received_at: 1001,
                targets: vec![
                    TargetState {
                        to: "alice".into(),
                        state: "delivered",
                        reason: None
                    },
                    TargetState {
                        to: "bob".into(),
                        state: "undelivered",
                        reason: Some("expired".into())
                    },
                ],
            },
            Entry {
                id: 4,
                from: "bob".into(),
                outgoing: false,
                with: None,
                text: r#"bob says "quoted" AND NEAR(x) col:umn*"#.into(),
                sent_at: Some(504),
                received_at: 2004,
                targets: vec![],
            },
        ]
    );
    assert_eq!(history(&mut store, None, 1), everyone[1..]);
    assert_eq!(history(&mut store, None, 0), []);

    let with_alice = history(&mut store, Some(a.clone()), 10);
    assert_eq!(
        with_alice
            .iter()
            .map(|e| (e.id, e.from.as_str(), e.with.as_deref()))
            .collect::<Vec<_>>(),
        [(9, "alice", Some("alice")), (2, "me", Some("alice"))]
    );
    assert_eq!(with_alice[0].sent_at, Some(509));
    assert_eq!(
        with_alice[1].targets,
        [TargetState {
            to: "alice".into(),
            state: "queued",
            reason: None
        }]
    );
    assert_eq!(history(&mut store, Some(b.clone()), 10), []);
    assert_eq!(history(&mut store, Some(party(7, "nobody")), 10), []);

    let none = Vec::<u64>::new();
    assert_eq!(search(&mut store, "hello", 10), [1]);
    assert_eq!(search(&mut store, "HELLO  Everyone ", 10), [1]);
    assert_eq!(search(&mut store, "hello bob", 10), none);
    assert_eq!(search(&mut store, "alice", 10), [2]);
    assert_eq!(search(&mut store, r#""quoted""#, 10), [4]);
    assert_eq!(search(&mut store, "AND", 10), [4]);
    assert_eq!(search(&mut store, "NEAR(x)", 10), [4]);
    assert_eq!(search(&mut store, "col:umn*", 10), [4]);
    assert_eq!(search(&mut store, "OR", 10), none);
    assert_eq!(search(&mut store, r#"" ( ) * - ^ :"#, 10), none);
    assert_eq!(search(&mut store, "", 10), none);
    assert_eq!(search(&mut store, "  ", 10), none);
    // The last matches, oldest first.
    assert_eq!(search(&mut store, "e", 10), none);
    store
        .write(&[
            received(&b, 1, 5, "again and again", false),
            received(&b, 1, 6, "again", false),
        ])
        .unwrap();
    assert_eq!(search(&mut store, "again", 10), [5, 6]);
    assert_eq!(search(&mut store, "again", 1), [6]);
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn garbage_is_not_a_store_and_is_left_alone() {
    let dir = fresh_dir("garbage");
    let options = options(&dir, true);
    fs::create_dir_all(options.path.parent().unwrap()).unwrap();
    let garbage: Vec<u8> = (0..8192u32).map(|i| (i * 7 + 3) as u8).collect();
    fs::write(&options.path, &garbage).unwrap();
    fs::set_permissions(&options.path, fs::Permissions::from_mode(0o600)).unwrap();
    let e = refusal(&options);
    assert!(matches!(e, StoreError::NotAStore { .. }), "{e:?}");
    assert!(e.to_string().contains("move it away"), "{e}");
    assert_eq!(fs::read(&options.path).unwrap(), garbage);
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_store_others_may_write_is_refused() {
    let dir = fresh_dir("modes");
    let options = options(&dir, true);
    drop(open(&options));
    fs::set_permissions(&options.path, fs::Permissions::from_mode(0o666)).unwrap();
    let e = refusal(&options);
    assert!(
        matches!(e, StoreError::NotPrivate { mode: 0o666, .. }),
        "{e:?}"
    );
    assert!(e.to_string().contains("writable by nobody else"), "{e}");
    fs::set_permissions(&options.path, fs::Permissions::from_mode(0o644)).unwrap();
    drop(open(&options));
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_store_in_use_is_refused() {
    let dir = fresh_dir("inuse");
    let options = options(&dir, true);
    let first = open(&options);
    let e = refusal(&options);
    assert!(matches!(e, StoreError::InUse { .. }), "{e:?}");
    assert!(e.to_string().contains("is me already running?"), "{e}");
    drop(first);
    drop(open(&options));
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn another_identity_s_store_is_refused() {
    let dir = fresh_dir("owner");
    let options = options(&dir, true);
    drop(open(&options));
    let other = Options {
        owner: key(42),
        ..options.clone()
    };
    let e = refusal(&other);
    assert!(matches!(e, StoreError::OtherOwner { .. }), "{e:?}");
    let message = e.to_string();
    assert!(
        message.contains(&format!("belongs to key {}", key(0))),
        "{message}"
    );
    assert!(message.contains(&key(42).to_string()), "{message}");
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_newer_schema_is_refused() {
    let dir = fresh_dir("newer");
    let options = options(&dir, true);
    drop(open(&options));
    let conn = Connection::open(&options.path).unwrap();
    conn.pragma_update(None, "user_version", 99).unwrap();
    drop(conn);
    let e = refusal(&options);
    assert!(
        matches!(
            e,
            StoreError::Newer {
                found: 99,
                known,
                ..
            } if known == MIGRATIONS.len()
        ),
        "{e:?}"
    );
    assert!(
        e.to_string().contains(&format!(
            "schema v99, this build knows up to v{}",
            MIGRATIONS.len()
        )),
        "{e}"
    );
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn another_application_s_database_is_refused() {
    let dir = fresh_dir("appid");
    let options = options(&dir, true);
    fs::create_dir_all(options.path.parent().unwrap()).unwrap();
    let conn = Connection::open(&options.path).unwrap();
    conn.execute_batch("CREATE TABLE t (x); PRAGMA application_id = 42;")
        .unwrap();
    drop(conn);
    let e = refusal(&options);
    assert!(matches!(e, StoreError::NotAStore { .. }), "{e:?}");
    assert!(e.to_string().contains("0x2a"), "{e}");
    // Nor is a database with tables but no application id.
    Connection::open(&options.path)
        .unwrap()
        .pragma_update(None, "application_id", 0)
        .unwrap();
    assert!(matches!(refusal(&options), StoreError::NotAStore { .. }));
    fs::remove_dir_all(&dir).unwrap();
}

/// What the thread showed, piece by piece.
type Shown = Arc<Mutex<Vec<String>>>;

struct Recorder(Shown);

impl Screen for Recorder {
    fn room(&mut self) -> usize {
        PIECE
    }

    fn show(&mut self, text: &str) {
        self.0.lock().unwrap().push(text.to_string());
    }
}

fn line(text: &str) -> Item {
    Item::Line(text.into())
}

fn record(record: Record) -> Item {
    Item::Record(record)
}

#[test]
fn the_thread_shows_lines_after_their_records_and_confirms_a_turn_after_both() {
    let dir = fresh_dir("thread");
    let options = options(&dir, true);
    let a = party(1, "alice");
    let (store, _) = open(&options);
    let shown = Shown::default();
    let (notify, notified) = mpsc::channel();
    let thread = store
        .spawn(Recorder(shown.clone()), move || {
            let _ = notify.send(());
        })
        .unwrap();
    let first = vec![
        record(sent(1, "one", false, &[&a])),
        line("sent 1"),
        record(sent(2, "two", false, &[&a])),
        line("sent 2"),
    ];
    thread.turn(first, Some(1)).unwrap();
    let history = Query::History {
        with: None,
        limit: 10,
    };
    thread.query(7, history).unwrap();
    for _ in 0..2 {
        notified.recv().unwrap();
    }
    let replies: Vec<Reply> = std::iter::from_fn(|| thread.try_reply()).collect();
    let [Reply::Committed(1), Reply::Answer {
        tag: 7,
        result: Ok(answer),
    }] = &replies[..]
    else {
        panic!("{replies:?}")
    };
    assert_eq!(answer.iter().map(|e| e.id).collect::<Vec<_>>(), [1, 2]);
    assert_eq!(*shown.lock().unwrap(), ["sent 1\nsent 2\n"]);

    let second = vec![record(sent(3, "three", false, &[&a])), line("sent 3")];
    thread.turn(second, Some(2)).unwrap();
    notified.recv().unwrap();
    assert!(matches!(thread.try_reply(), Some(Reply::Committed(2))));
    assert_eq!(shown.lock().unwrap()[1..], ["sent 3\n"]);

    let last = vec![record(sent(4, "four", false, &[&a])), line("sent 4")];
    thread.turn(last, Some(3)).unwrap();
    thread.close().unwrap();
    assert_eq!(shown.lock().unwrap()[2..], ["sent 4\n"], "close finishes");
    let saved = open(&options).1;
    assert_eq!(
        saved.outbox.iter().map(|o| o.id).collect::<Vec<_>>(),
        [1, 2, 3, 4]
    );
    assert_eq!(saved.next_id, 5);
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn output_is_shown_in_pieces_that_fit_the_room() {
    let dir = fresh_dir("pieces");
    let options = options(&dir, true);
    let a = party(1, "alice");
    let (store, _) = open(&options);
    let shown = Shown::default();
    let thread = store.spawn(Recorder(shown.clone()), || {}).unwrap();
    let lines: Vec<String> = (0..100).map(|i| format!("{i:0>99}")).collect();
    let mut items = Vec::new();
    for (i, text) in lines.iter().enumerate() {
        let id = i as u64 + 1;
        items.push(record(sent(id, text, false, &[&a])));
        items.push(line(text));
    }
    thread.turn(items, Some(1)).unwrap();
    thread.close().unwrap();
    let shown = shown.lock().unwrap();
    assert!(shown.len() > 1, "10 KB of lines in one piece");
    assert!(shown.iter().all(|piece| piece.len() <= PIECE), "{shown:?}");
    assert_eq!(shown.concat(), lines.join("\n") + "\n");
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_failed_write_stops_the_thread_and_close_says_why() {
    let dir = fresh_dir("failed");
    let options = options(&dir, true);
    let a = party(1, "alice");
    let (store, _) = open(&options);
    store.conn.execute_batch("DROP TABLE failures").unwrap();
    let (notify, notified) = mpsc::channel();
    let shown = Shown::default();
    let thread = store
        .spawn(Recorder(shown.clone()), move || {
            let _ = notify.send(());
        })
        .unwrap();
    let turn = vec![
        record(sent(1, "lost", false, &[&a])),
        record(failed(1, &a, "expired", 5)),
        line("undelivered"),
    ];
    thread.turn(turn, Some(1)).unwrap();
    notified.recv().unwrap();
    let reply = thread.try_reply();
    assert!(
        matches!(&reply, Some(Reply::Failed(why)) if why.contains("no such table")),
        "{reply:?}"
    );
    assert!(
        shown.lock().unwrap().is_empty(),
        "nothing unrecorded is shown"
    );
    let later = vec![record(sent(2, "dropped", false, &[&a])), line("never")];
    thread.turn(later, Some(2)).unwrap();
    let why = thread.close().unwrap_err();
    assert!(why.contains("no such table"), "{why}");
    assert!(shown.lock().unwrap().is_empty(), "nor anything after it");
    let saved = open(&options).1;
    assert_eq!(saved.outbox, []);
    assert_eq!(saved.next_id, 1);
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn typed_lines_are_kept_across_runs_up_to_a_limit_and_only_with_history() {
    let dir = fresh_dir("typed");
    let options = options(&dir, true);
    let (mut store, _) = open(&options);
    store
        .remember(&["first".into(), "/msg bob hi".into()])
        .unwrap();
    drop(store);
    let (mut store, _) = open(&options);
    assert_eq!(store.typed().unwrap(), vec!["first", "/msg bob hi"]);
    let many: Vec<String> = (0..TYPED_KEPT + 10).map(|n| format!("line {n}")).collect();
    store.remember(&many).unwrap();
    let typed = store.typed().unwrap();
    assert_eq!(typed.len(), TYPED_KEPT, "only the last ones stay");
    assert_eq!(
        typed.last().map(String::as_str),
        Some(many.last().unwrap().as_str())
    );
    drop(store);

    let quiet = super::Options {
        history: false,
        ..options.clone()
    };
    let (mut store, _) = open(&quiet);
    store.remember(&["secret".into()]).unwrap();
    assert!(!store.typed().unwrap().contains(&"secret".to_string()));
    fs::remove_dir_all(&dir).unwrap();
}
