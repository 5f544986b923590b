//! Files between peers: offers, the flow window, resuming over a new
//! link, and what a receiver refuses.

use std::path::PathBuf;

use super::*;
use crate::disk::{DiskOp, DiskReply, FileCode};
use crate::journal;
use crate::peer::transfers::{CHUNK, WINDOW};

const SHA: [u8; 32] = [0x5a; 32];

impl Sim {
    fn take_disk(&mut self) -> Vec<DiskOp> {
        std::mem::take(&mut self.disk)
    }

    fn disk_says(&mut self, reply: DiskReply) {
        self.peer.disk(reply, self.now);
        self.apply();
    }

    /// Answers every read asked so far with bytes of its offset.
    fn answer_reads(&mut self) -> usize {
        let mut answered = 0;
        for op in self.take_disk() {
            if let DiskOp::Read {
                transfer,
                epoch,
                offset,
                len,
            } = op
            {
                answered += 1;
                self.disk_says(DiskReply::Read {
                    transfer,
                    epoch,
                    offset,
                    data: vec![offset as u8; len],
                });
            }
        }
        answered
    }

    /// Alice offers `size` bytes to bob, hashed; returns our file link to
    /// bob, where hello and the offer went.
    fn offer_to_bob(&mut self, size: u64) -> (Conn, u64) {
        self.command(Command::SendFile {
            to: "bob".into(),
            path: "/data/report.pdf".into(),
        });
        assert_eq!(
            self.take_disk(),
            vec![DiskOp::Prepare {
                transfer: 1,
                path: PathBuf::from("/data/report.pdf")
            }]
        );
        self.disk_says(DiskReply::Prepared {
            transfer: 1,
            name: "report.pdf".into(),
            size,
            sha256: SHA,
        });
        let c = self.link_conn("bob");
        let msgs = self.take_link(c);
        assert_eq!(msgs.len(), 2, "{msgs:?}");
        assert_eq!(msgs[0], self.my_hello());
        let LinkMsg::FileOffer {
            id,
            ref name,
            size: offered,
            sha256,
        } = msgs[1]
        else {
            panic!("{msgs:?}");
        };
        assert_eq!((name.as_str(), offered, sha256), ("report.pdf", size, SHA));
        (c, id)
    }
}

fn offer_event(direction: Direction, peer: &str, name: &str, size: u64) -> Event {
    Event::FileOffer {
        transfer: 1,
        direction,
        peer: peer.into(),
        name: name.into(),
        size,
        sha256: "5a".repeat(32),
    }
}

fn file_body(msg: &LinkMsg) -> Vec<u8> {
    codec::encode(msg).unwrap()
}

#[test]
fn a_file_goes_in_chunks_within_the_window_and_ends_when_the_receiver_has_it() {
    let mut sim = Sim::online(&["bob"]);
    let size = 3 * WINDOW / 2;
    let (c, id) = sim.offer_to_bob(size);
    assert_eq!(
        sim.take_events(),
        vec![offer_event(Direction::Out, "bob", "report.pdf", size)]
    );
    assert!(sim.take_disk().is_empty(), "nothing is read before accept");

    sim.link_out_answer(c, &LinkMsg::FileAccept { id, offset: 0 });
    let window_reads = (WINDOW / CHUNK as u64) as usize;
    assert_eq!(sim.answer_reads(), window_reads, "one window's reads");
    let chunks = sim.take_link(c);
    assert_eq!(chunks.len(), window_reads);
    assert!(matches!(
        chunks[1],
        LinkMsg::FileChunk { offset, ref data, .. } if offset == CHUNK as u64 && data.len() == CHUNK
    ));
    assert_eq!(sim.answer_reads(), 0, "the window is full");

    // Half a window written: half a window more goes.
    sim.link_out_answer(
        c,
        &LinkMsg::FileAck {
            id,
            offset: WINDOW / 2,
        },
    );
    assert_eq!(sim.answer_reads(), window_reads / 2);
    assert!(matches!(
        sim.take_events()[..],
        [Event::FileProgress { bytes, .. }] if bytes == WINDOW / 2
    ));
    sim.link_out_answer(c, &LinkMsg::FileAck { id, offset: size });
    sim.link_out_answer(c, &LinkMsg::FileDone { id });
    let events = sim.take_events();
    assert!(
        matches!(&events[..], [.., Event::FileDone { transfer: 1, direction: Direction::Out, path, .. }] if path == "/data/report.pdf"),
        "{events:?}"
    );
    assert!(
        sim.closes.contains_key(&c),
        "the file link closes once done"
    );
    assert!(sim.take_disk().contains(&DiskOp::Close {
        transfer: 1,
        discard: false
    }));
}

#[test]
fn chat_to_the_same_peer_never_queues_behind_file_data() {
    let mut sim = Sim::online(&["bob"]);
    let (files, id) = sim.offer_to_bob(10 * WINDOW);
    sim.link_out_answer(files, &LinkMsg::FileAccept { id, offset: 0 });
    sim.answer_reads();
    sim.msg("bob", "still there?");
    let chat_link = sim.link_conn("bob");
    assert_ne!(chat_link, files, "chat has its own link");
    let msgs = sim.take_link(chat_link);
    assert_eq!(msgs[1], chat(1, "still there?", true));
}

#[test]
fn a_broken_link_resumes_from_what_the_receiver_holds() {
    let mut sim = Sim::online(&["bob"]);
    let (c, id) = sim.offer_to_bob(4 * WINDOW);
    sim.link_out_answer(c, &LinkMsg::FileAccept { id, offset: 0 });
    // Reads asked before the break come back after it: dropped.
    let stale = sim.take_disk();
    sim.remote_close(c, "connection reset");
    for op in stale {
        if let DiskOp::Read {
            transfer,
            epoch,
            offset,
            len,
        } = op
        {
            sim.disk_says(DiskReply::Read {
                transfer,
                epoch,
                offset,
                data: vec![0; len],
            });
        }
    }
    let retry = sim
        .armed(|t| matches!(t, Timer::FileRetry(f) if f == "bob"))
        .expect("a redial is armed");
    sim.advance_to(retry);
    let again = sim.link_conn("bob");
    assert_ne!(again, c);
    let msgs = sim.take_link(again);
    assert!(
        matches!(&msgs[..], [LinkMsg::Hello { .. }, LinkMsg::FileOffer { id: i, .. }] if *i == id),
        "{msgs:?}"
    );
    sim.link_out_answer(
        again,
        &LinkMsg::FileAccept {
            id,
            offset: 3 * CHUNK as u64,
        },
    );
    sim.answer_reads();
    let msgs = sim.take_link(again);
    assert!(
        matches!(msgs.first(), Some(LinkMsg::FileChunk { offset, .. }) if *offset == 3 * CHUNK as u64),
        "{msgs:?}"
    );
}

#[test]
fn an_offer_not_accepted_in_time_expires() {
    let mut sim = Sim::online(&["bob"]);
    let (c, id) = sim.offer_to_bob(10);
    sim.take_events();
    sim.advance(Duration::from_secs(601));
    let msgs = sim.take_link(c);
    assert!(
        matches!(&msgs[..], [LinkMsg::FileCancel { id: i, code, .. }] if *i == id && code == "expired"),
        "{msgs:?}"
    );
    assert!(matches!(
        &sim.take_events()[..],
        [Event::FileFailed { code, .. }] if code == "expired"
    ));
}

#[test]
fn a_file_offered_to_us_is_saved_once_accepted_and_acknowledged_as_written() {
    let mut sim = Sim::online(&["bob"]);
    let c = sim.inbound("bob", 9);
    sim.take_all();
    let offer = LinkMsg::FileOffer {
        id: 77,
        name: "../../.ssh/authorized_keys".into(),
        size: 10,
        sha256: SHA,
    };
    sim.link_in(c, &offer);
    assert_eq!(
        sim.take_events(),
        vec![offer_event(
            Direction::In,
            "bob",
            "_.._.ssh_authorized_keys",
            10
        )]
    );
    assert!(sim.take_link(c).is_empty(), "it waits for the user");
    // Data before the offer is accepted breaks the rules.
    sim.command(Command::Accept {
        transfer: 1,
        dir: Some("/tmp/in".into()),
    });
    assert_eq!(
        sim.take_disk(),
        vec![DiskOp::Receive {
            transfer: 1,
            dir: PathBuf::from("/tmp/in"),
            name: "_.._.ssh_authorized_keys".into(),
            id: 77,
            size: 10,
            sha256: SHA,
        }]
    );
    sim.opened(1, 4, c, 77);
    sim.chunk_in(c, 77, 4, vec![1; 6]);
    assert_eq!(
        sim.take_disk(),
        vec![DiskOp::Write {
            transfer: 1,
            offset: 4,
            data: vec![1; 6]
        }]
    );
    sim.disk_says(DiskReply::Saved {
        transfer: 1,
        path: "/tmp/in/x".into(),
    });
    assert_eq!(sim.take_link(c), vec![LinkMsg::FileDone { id: 77 }]);
    assert!(matches!(
        &sim.take_events()[..],
        [Event::FileDone { direction: Direction::In, path, .. }] if path == "/tmp/in/x"
    ));
    // The offer again (it crossed our answer): the same answer.
    sim.link_in(c, &offer);
    assert_eq!(sim.take_link(c), vec![LinkMsg::FileDone { id: 77 }]);
}

#[test]
fn a_receiver_refuses_files_too_large_data_unasked_and_data_out_of_order() {
    let mut config = config();
    config.files.max_file_size = 1000;
    config.files.accept_from.insert("bob".into());
    let mut sim = Sim::with(config, Trust::default());
    sim.start();
    sim.registry_says(&welcome(&["bob", "carol"], false));
    sim.take_all();

    let c = sim.inbound("carol", 1);
    sim.link_in(
        c,
        &LinkMsg::FileOffer {
            id: 1,
            name: "big".into(),
            size: 1001,
            sha256: SHA,
        },
    );
    assert!(matches!(
        &sim.take_link(c)[..],
        [LinkMsg::FileCancel { id: 1, code, .. }] if code == "too_large"
    ));
    assert!(
        matches!(&sim.take_events()[..], [Event::FileFailed { code, .. }] if code == "too_large")
    );

    // Data for an offer not accepted: the link is refused.
    sim.link_in(
        c,
        &LinkMsg::FileOffer {
            id: 2,
            name: "f".into(),
            size: 10,
            sha256: SHA,
        },
    );
    sim.chunk_in(c, 2, 0, vec![0; 10]);
    assert_eq!(sim.error_code_on(c), "protocol");

    // bob's offers are taken at once; data past the window is refused.
    let b = sim.inbound("bob", 1);
    sim.link_in(
        b,
        &LinkMsg::FileOffer {
            id: 3,
            name: "f".into(),
            size: 1000,
            sha256: SHA,
        },
    );
    assert!(matches!(sim.take_disk()[..], [DiskOp::Receive { .. }]));
    sim.opened(3, 0, b, 3);
    sim.chunk_in(b, 3, 5, vec![0; 10]);
    assert_eq!(sim.error_code_on(b), "protocol", "data out of order");
}

#[test]
fn failures_reach_the_other_side_and_the_user() {
    let mut sim = Sim::online(&["bob"]);
    let (c, id) = sim.offer_to_bob(100);
    sim.link_out_answer(c, &LinkMsg::FileAccept { id, offset: 0 });
    sim.take_disk();
    sim.disk_says(DiskReply::Failed {
        transfer: 1,
        code: FileCode::Changed,
        message: "the file changed after it was offered".into(),
    });
    assert!(matches!(
        &sim.take_link(c)[..],
        [LinkMsg::FileCancel { code, .. }] if code == "changed"
    ));
    sim.take_events();

    // The receiver cancels: the sender hears it with the reason.
    let inc = sim.inbound("bob", 2);
    sim.link_in(
        inc,
        &LinkMsg::FileOffer {
            id: 5,
            name: "a".into(),
            size: 1,
            sha256: SHA,
        },
    );
    sim.command(Command::Reject(2));
    assert!(matches!(
        &sim.take_link(inc)[..],
        [LinkMsg::FileCancel { id: 5, code, .. }] if code == "rejected"
    ));
    sim.command(Command::Accept {
        transfer: 2,
        dir: None,
    });
    assert_eq!(
        sim.the_error_code(),
        "bad_command",
        "a rejected offer is gone"
    );
}

impl Sim {
    /// Registered with `peers` online, with a store.
    fn stored_online(peers: &[&str]) -> Sim {
        let config = Config {
            persistent: true,
            ..config()
        };
        let mut sim = Sim::with(config, Trust::default());
        sim.start();
        sim.registry_says(&welcome(peers, false));
        sim
    }

    /// The `file_failed` events since last taken; the others are dropped.
    fn take_failed(&mut self) -> Vec<Event> {
        self.take_events()
            .into_iter()
            .filter(|e| matches!(e, Event::FileFailed { .. }))
            .collect()
    }

    /// The disk opened transfer `number` holding `have` bytes: the sender
    /// of offer `id`, on link `c`, is asked for the rest.
    fn opened(&mut self, number: u64, have: u64, c: Conn, id: u64) {
        self.disk_says(DiskReply::Opened {
            transfer: number,
            have,
        });
        assert_eq!(
            self.take_link(c),
            vec![LinkMsg::FileAccept { id, offset: have }]
        );
    }

    fn chunk_in(&mut self, c: Conn, id: u64, offset: u64, data: Vec<u8>) {
        self.link_in(c, &LinkMsg::FileChunk { id, offset, data });
    }

    /// The receiver's answer on our file link `c`.
    fn link_out_answer(&mut self, c: Conn, msg: &LinkMsg) {
        self.raw_in(c, &file_body(msg));
    }

    fn the_error_code(&mut self) -> String {
        let events = self.take_events();
        match &events[..] {
            [.., Event::Error { code, .. }] => code.clone(),
            other => panic!("no error: {other:?}"),
        }
    }
}

#[test]
fn a_sender_past_its_window_is_refused() {
    let mut config = config();
    config.files.accept_from.insert("bob".into());
    let mut sim = Sim::with(config, Trust::default());
    sim.start();
    sim.registry_says(&welcome(&["bob"], false));
    let b = sim.inbound("bob", 1);
    sim.link_in(
        b,
        &LinkMsg::FileOffer {
            id: 3,
            name: "f".into(),
            size: 4 * WINDOW,
            sha256: SHA,
        },
    );
    sim.disk_says(DiskReply::Opened {
        transfer: 1,
        have: 0,
    });
    sim.take_all();
    let chunk = CHUNK as u64;
    // A window and one chunk more is tolerated: acks cross chunks.
    for n in 0..=WINDOW / chunk {
        let data = vec![0; CHUNK];
        sim.link_in(
            b,
            &LinkMsg::FileChunk {
                id: 3,
                offset: n * chunk,
                data,
            },
        );
    }
    assert!(sim.take_link(b).is_empty());
    let offset = (WINDOW / chunk + 1) * chunk;
    sim.link_in(
        b,
        &LinkMsg::FileChunk {
            id: 3,
            offset,
            data: vec![0; CHUNK],
        },
    );
    assert_eq!(sim.error_code_on(b), "protocol");
    // The link goes, not the transfer: offered again, it resumes from
    // what was taken.
    assert!(sim.take_events().is_empty());
    let again = sim.inbound("bob", 1);
    let offer = LinkMsg::FileOffer {
        id: 3,
        name: "f".into(),
        size: 4 * WINDOW,
        sha256: SHA,
    };
    sim.link_in(again, &offer);
    assert_eq!(
        sim.take_link(again),
        vec![LinkMsg::FileAccept {
            id: 3,
            offset: WINDOW + chunk
        }]
    );
}

fn kept(outgoing: bool, peer: &str, path: &str) -> journal::Transfer {
    journal::Transfer {
        id: 41,
        outgoing,
        peer: Party {
            key: key_of(peer),
            name: peer.into(),
        },
        path: path.into(),
        name: "report.pdf".into(),
        size: 100,
        sha256: SHA,
    }
}

fn resumed_with(transfers: Vec<journal::Transfer>) -> Sim {
    let saved = Saved {
        instance: 5,
        next_id: 1,
        transfers,
        ..Saved::default()
    };
    let config = Config {
        persistent: true,
        ..config()
    };
    let mut sim = Sim::resuming(config, Trust::default(), saved);
    sim.start();
    sim
}

#[test]
fn what_we_offered_before_a_restart_is_hashed_again_and_offered_under_its_id() {
    let mut sim = resumed_with(vec![kept(true, "bob", "/data/report.pdf")]);
    assert_eq!(
        sim.take_disk(),
        vec![DiskOp::Prepare {
            transfer: 1,
            path: "/data/report.pdf".into()
        }]
    );
    sim.registry_says(&welcome(&["bob"], false));
    sim.disk_says(DiskReply::Prepared {
        transfer: 1,
        name: "report.pdf".into(),
        size: 100,
        sha256: SHA,
    });
    let c = sim.link_conn("bob");
    let msgs = sim.take_link(c);
    assert!(
        matches!(
            &msgs[..],
            [
                LinkMsg::Hello { .. },
                LinkMsg::FileOffer {
                    id: 41,
                    size: 100,
                    ..
                }
            ]
        ),
        "{msgs:?}"
    );
    sim.link_out_answer(c, &LinkMsg::FileAccept { id: 41, offset: 60 });
    assert!(matches!(
        sim.take_disk()[..],
        [DiskOp::Read {
            offset: 60,
            len: 40,
            ..
        }]
    ));
    sim.link_out_answer(c, &LinkMsg::FileDone { id: 41 });
    assert!(sim.records.contains(&Record::TransferEnded {
        peer: key_of("bob"),
        id: 41,
        outgoing: true
    }));
}

#[test]
fn a_file_changed_since_it_was_offered_before_a_restart_is_not_offered_again() {
    let mut sim = resumed_with(vec![kept(true, "bob", "/data/report.pdf")]);
    sim.registry_says(&welcome(&["bob"], false));
    sim.take_all();
    sim.disk_says(DiskReply::Prepared {
        transfer: 1,
        name: "report.pdf".into(),
        size: 101,
        sha256: SHA,
    });
    assert!(sim.link_dials_to("bob").is_empty(), "nothing to offer");
    assert!(matches!(
        &sim.take_events()[..],
        [Event::FileFailed { code, .. }] if code == "changed"
    ));
}

#[test]
fn what_we_accepted_before_a_restart_resumes_without_asking_when_offered() {
    let mut sim = resumed_with(vec![kept(false, "bob", "/tmp/in")]);
    sim.registry_says(&welcome(&["bob"], false));
    sim.take_all();
    let c = sim.inbound("bob", 1);
    sim.link_in(
        c,
        &LinkMsg::FileOffer {
            id: 41,
            name: "report.pdf".into(),
            size: 100,
            sha256: SHA,
        },
    );
    assert!(sim.take_events().is_empty(), "not asked again");
    assert!(matches!(
        &sim.take_disk()[..],
        [DiskOp::Receive { transfer: 1, dir, id: 41, .. }] if dir == &PathBuf::from("/tmp/in")
    ));
    sim.opened(1, 70, c, 41);
}

#[test]
fn with_a_store_quitting_pauses_transfers_instead_of_ending_them() {
    let mut sim = Sim::stored_online(&["bob"]);
    let (c, id) = sim.offer_to_bob(100);
    let recorded = |sim: &Sim| {
        sim.records
            .iter()
            .any(|r| matches!(r, Record::Transfer(t) if t.id == id && t.outgoing))
    };
    assert!(recorded(&sim), "kept once offered");
    sim.take_all();
    sim.command(Command::Quit);
    sim.advance(Duration::from_secs(3));
    assert!(sim
        .take_link(c)
        .iter()
        .all(|m| !matches!(m, LinkMsg::FileCancel { .. })));
    assert!(!sim
        .records
        .iter()
        .any(|r| matches!(r, Record::TransferEnded { .. })));
}

#[test]
fn a_transfer_kept_from_before_a_restart_that_expires_unoffered_leaves_no_partial_file() {
    let mut sim = resumed_with(vec![kept(false, "bob", "/tmp/in")]);
    sim.take_disk();
    sim.advance(Duration::from_secs(601));
    assert_eq!(
        sim.take_disk(),
        vec![DiskOp::Discard {
            dir: "/tmp/in".into(),
            name: "report.pdf".into(),
            id: 41
        }]
    );
    let failed = sim.take_failed();
    assert!(
        matches!(&failed[..], [Event::FileFailed { code, .. }] if code == "expired"),
        "{failed:?}"
    );
    assert!(sim.records.contains(&Record::TransferEnded {
        peer: key_of("bob"),
        id: 41,
        outgoing: false
    }));
}

#[test]
fn quitting_before_a_file_is_hashed_ends_its_transfer_even_with_a_store() {
    let mut sim = Sim::stored_online(&["bob"]);
    sim.command(Command::SendFile {
        to: "bob".into(),
        path: "/data/huge.iso".into(),
    });
    sim.take_all();
    sim.command(Command::Quit);
    sim.advance(Duration::from_secs(3));
    let failed = sim.take_failed();
    assert!(
        matches!(&failed[..], [Event::FileFailed { code, reason, .. }] if code == "cancelled" && reason.contains("before the file was hashed")),
        "{failed:?}"
    );
}

#[test]
fn a_file_gone_since_it_was_offered_before_a_restart_ends_as_changed() {
    let mut sim = resumed_with(vec![kept(true, "bob", "/data/report.pdf")]);
    sim.registry_says(&welcome(&["bob"], false));
    sim.take_all();
    sim.disk_says(DiskReply::Failed {
        transfer: 1,
        code: FileCode::Io,
        message: "/data/report.pdf: No such file or directory".into(),
    });
    assert!(matches!(
        &sim.take_events()[..],
        [Event::FileFailed { code, .. }] if code == "changed"
    ));
}

#[test]
fn a_file_to_a_peer_with_no_path_ends_at_once_as_unreachable() {
    for (refusal, code) in [
        ("relay_refused", "unreachable"),
        ("unreachable", "unreachable"),
        ("relay_full", "relay_full"),
    ] {
        let mut sim = Sim::online(&["bob"]);
        sim.update(vec![Change::Moved {
            name: "bob".into(),
            addr: addr("bob"),
            reachable: Some(false),
        }]);
        sim.command(Command::SendFile {
            to: "bob".into(),
            path: "/data/report.pdf".into(),
        });
        sim.take_disk();
        sim.disk_says(DiskReply::Prepared {
            transfer: 1,
            name: "report.pdf".into(),
            size: 10,
            sha256: SHA,
        });
        sim.take_events();
        let relay = sim.relay_conn();
        let refused = FromRegistry::Error {
            code: refusal.into(),
            reason: "no".into(),
        };
        sim.raw_in(relay, &codec::encode(&refused).unwrap());
        let events = sim.take_events();
        assert!(
            matches!(&events[..], [Event::FileFailed { code: c, .. }] if c == code),
            "{refusal}: {events:?}"
        );
        assert!(
            sim.armed(|t| matches!(t, Timer::FileRetry(_))).is_none(),
            "{refusal}: nothing left to dial for"
        );
    }
}
