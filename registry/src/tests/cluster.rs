//! Cluster mode without NATS: registries share a bucket modelled here
//! (compare-and-set writes, one ordered feed), and the test decides when
//! writes land and when each registry's feed catches up, so that races and
//! partitions happen exactly where a test puts them.

use std::collections::HashMap;

use super::*;
use crate::cluster::{ClusterEvent, ClusterWrite, Expect, NameRecord, RecordState, WriteResult};

/// The bucket: the latest record of each key, and every change in order.
#[derive(Default)]
struct Bucket {
    records: HashMap<String, (u64, NameRecord)>,
    log: Vec<(String, u64, Option<NameRecord>)>,
}

impl Bucket {
    fn apply(&mut self, write: &ClusterWrite) -> WriteResult {
        let current = self.records.get(&write.key).cloned();
        let matches = match (write.expect, &current) {
            (Expect::Absent, None) => true,
            (Expect::Revision(r), Some((at, _))) => r == *at,
            _ => false,
        };
        if !matches {
            return WriteResult::Conflict { current };
        }
        let revision = self.log.len() as u64 + 1;
        match &write.record {
            Some(record) => self
                .records
                .insert(write.key.clone(), (revision, record.clone())),
            None => self.records.remove(&write.key),
        };
        self.log
            .push((write.key.clone(), revision, write.record.clone()));
        WriteResult::Done { revision }
    }
}

/// A registry of the cluster: a [`Sim`] and how far its feed has read.
struct Member {
    sim: Sim,
    id: String,
    read: usize,
    /// Cut off from the bucket: its writes wait, its feed stalls.
    cut: bool,
    /// Writes taken from the registry, not landed yet.
    pending: Vec<ClusterWrite>,
}

impl Member {
    fn new(id: &str, config: Config, now: Instant) -> Member {
        let mut sim = Sim::new(config.clone());
        sim.now = now;
        sim.reg = Registry::new(config, now);
        sim.reg
            .join_cluster(id.into(), now, std::time::SystemTime::now());
        sim.reg.cluster_event(ClusterEvent::Up, now);
        sim.reg.cluster_event(ClusterEvent::CaughtUp, now);
        Member {
            sim,
            id: id.into(),
            read: 0,
            cut: false,
            pending: Vec::new(),
        }
    }

    fn event(&mut self, event: ClusterEvent) {
        self.sim.reg.cluster_event(event, self.sim.now);
        self.sim.apply();
        self.sim.flush();
    }

    /// Takes the writes the registry asked for.
    fn collect(&mut self) {
        while let Some(write) = self.sim.reg.poll_cluster_write() {
            self.pending.push(write);
        }
    }

    /// Lands its pending writes on the bucket and tells it the results.
    fn land(&mut self, bucket: &mut Bucket) {
        self.collect();
        for write in std::mem::take(&mut self.pending) {
            let result = bucket.apply(&write);
            self.event(ClusterEvent::Written {
                id: write.id,
                result,
            });
        }
    }

    /// Its feed delivers the bucket's changes it has not seen.
    fn catch_up(&mut self, bucket: &Bucket) {
        while self.read < bucket.log.len() {
            let (key, revision, record) = bucket.log[self.read].clone();
            self.read += 1;
            self.event(ClusterEvent::Record {
                key,
                revision,
                record,
            });
        }
    }

    fn heartbeat(&mut self, of: &str) {
        self.event(ClusterEvent::Alive {
            registry: of.into(),
        });
    }
}

/// Registries on one bucket.
struct Cluster {
    members: Vec<Member>,
    bucket: Bucket,
}

impl Cluster {
    fn new(n: usize) -> Cluster {
        Cluster::with(n, config())
    }

    fn with(n: usize, config: Config) -> Cluster {
        let now = Instant::now();
        Cluster {
            members: (0..n)
                .map(|i| Member::new(&format!("r{i}"), config.clone(), now))
                .collect(),
            bucket: Bucket::default(),
        }
    }

    /// Every write lands and every feed catches up, until nothing moves.
    fn settle(&mut self) {
        for _ in 0..10 {
            for m in self.members.iter_mut().filter(|m| !m.cut) {
                m.land(&mut self.bucket);
            }
            for m in self.members.iter_mut().filter(|m| !m.cut) {
                m.catch_up(&self.bucket);
            }
        }
    }

    fn register(&mut self, at: usize, c: Conn, name: &str) {
        self.members[at].sim.register(c, name, 7000);
        self.settle();
    }

    fn m(&mut self, i: usize) -> &mut Sim {
        &mut self.members[i].sim
    }

    /// Time passes for everyone; the registries in `alive` heartbeat, and
    /// every peer does.
    fn advance(&mut self, by: Duration, alive: &[usize]) {
        let step = Duration::from_millis(100);
        let mut passed = Duration::ZERO;
        while passed < by {
            passed += step;
            for i in 0..self.members.len() {
                let sim = &mut self.members[i].sim;
                let peers: Vec<Conn> = sim.reg.local_sessions().map(|(c, _)| c).collect();
                for &c in &peers {
                    sim.send(c, &ToRegistry::Heartbeat {});
                }
                // The turn that read them ends, and answers them.
                sim.flush();
                for c in peers {
                    if let Some(inbox) = sim.inbox.get_mut(&c) {
                        inbox.retain(|m| *m != FromRegistry::Heartbeat {});
                    }
                }
                for &a in alive {
                    let id = self.members[a].id.clone();
                    self.members[i].heartbeat(&id);
                }
                self.members[i].sim.advance(step);
            }
            self.settle();
        }
    }
}

fn changes(msgs: &[FromRegistry]) -> Vec<Change> {
    msgs.iter()
        .flat_map(|m| match m {
            FromRegistry::Update { changes } => changes.clone(),
            _ => Vec::new(),
        })
        .collect()
}

fn joined(name: &str, port: u16, c: Conn) -> Change {
    Change::Joined {
        name: name.into(),
        addr: format!("{}:{port}", ip(c as u8)),
        key: owner(name),
    }
}

#[test]
fn a_peer_of_one_registry_is_listed_at_the_others() {
    let mut cluster = Cluster::new(2);
    cluster.register(0, 1, "alice");
    cluster.register(1, 2, "bob");
    let bob = cluster.m(1).take(2);
    assert_eq!(
        welcome_peers(&bob[0]),
        vec![entry("alice", &format!("{}:7000", ip(1)))]
    );
    assert_eq!(changes(&cluster.m(0).take(1)), vec![joined("bob", 7000, 2)]);
    assert_eq!(cluster.m(0).reg.directory().len(), 2);
    assert_eq!(cluster.m(1).reg.remote_count(), 1);

    cluster.m(1).send(2, &ToRegistry::Leave {});
    cluster.m(1).flush();
    cluster.settle();
    assert_eq!(
        changes(&cluster.m(0).take(1)),
        vec![Change::Left {
            name: "bob".into(),
            reason: "quit".into()
        }]
    );
    // Bob's name stays his key's at every registry.
    cluster.m(0).register_as(3, "bob", 7000, key("stranger"));
    cluster.settle();
    assert_eq!(cluster.m(0).error_code(3), "name_taken");
    cluster.register(0, 4, "bob");
    assert!(matches!(
        cluster.m(0).take(4)[0],
        FromRegistry::Welcome { .. }
    ));
}

#[test]
fn one_name_claimed_from_two_keys_at_once_goes_to_one() {
    let mut cluster = Cluster::new(2);
    // Both claims are written before either registry hears of the other.
    cluster.members[0]
        .sim
        .register_as(1, "carol", 7000, key("first"));
    cluster.members[1]
        .sim
        .register_as(2, "carol", 7000, key("second"));
    cluster.members[0].collect();
    cluster.members[1].collect();
    cluster.settle();
    let first = cluster.m(0).take(1);
    let second = cluster.m(1).take(2);
    assert!(
        matches!(first[0], FromRegistry::Welcome { .. }),
        "{first:?}"
    );
    assert_eq!(
        second,
        vec![FromRegistry::error(
            ErrorCode::NameTaken,
            "the name \"carol\" is taken by a peer that is online"
        )]
    );
    // A look-alike is refused across the cluster too.
    cluster.m(1).register_as(3, "caro1", 7000, key("third"));
    cluster.settle();
    assert_eq!(cluster.m(1).error_code(3), "name_confusable");
}

#[test]
fn a_peer_that_moves_registry_is_moved_not_left() {
    let mut cluster = Cluster::new(2);
    cluster.register(0, 1, "alice");
    cluster.register(1, 2, "bob");
    cluster.m(1).take(2);
    // Alice's registry looks dead to her; she registers at the other one,
    // from a new port.
    cluster.members[1].sim.accept_as(3, ip(1), owner("alice"));
    cluster.m(1).send(3, &register("alice", 7001));
    cluster.m(1).flush();
    cluster.settle();
    assert!(matches!(
        cluster.m(1).take(3)[0],
        FromRegistry::Welcome { .. }
    ));
    assert_eq!(
        changes(&cluster.m(1).take(2)),
        vec![Change::Moved {
            name: "alice".into(),
            addr: format!("{}:7001", ip(1)),
            reachable: None
        }]
    );
    // Her old session there is told it was replaced, and nobody hears
    // that she left.
    let old = cluster.m(0).take(1);
    assert!(
        matches!(old.last(), Some(FromRegistry::Error { code, .. }) if code == "replaced"),
        "{old:?}"
    );
    assert!(cluster.m(0).closed.contains_key(&1));
    assert_eq!(cluster.m(0).reg.peer_count(), 0);
    assert_eq!(cluster.m(0).reg.directory().len(), 2);
}

#[test]
fn a_silent_registrys_peers_leave_after_the_timeout() {
    let mut cluster = Cluster::new(2);
    cluster.register(0, 1, "alice");
    cluster.register(1, 2, "bob");
    cluster.m(1).take(2);
    cluster.advance(Duration::from_millis(500), &[0, 1]);
    assert!(changes(&cluster.m(1).take(2)).is_empty());
    // Registry 0 is cut off; 1 still hears itself.
    cluster.members[0].cut = true;
    cluster.advance(Duration::from_millis(900), &[1]);
    assert!(
        changes(&cluster.m(1).take(2)).is_empty(),
        "not before the timeout"
    );
    cluster.advance(Duration::from_millis(600), &[1]);
    assert_eq!(
        changes(&cluster.m(1).take(2)),
        vec![Change::Left {
            name: "alice".into(),
            reason: "timeout".into()
        }]
    );

    // Registry 0 was only cut off: back, it says alice is online again,
    // and she is listed again.
    cluster.members[0].cut = false;
    cluster.advance(Duration::from_millis(300), &[0, 1]);
    assert_eq!(
        changes(&cluster.m(1).take(2)),
        vec![joined("alice", 7000, 1)]
    );
    assert_eq!(cluster.m(0).reg.peer_count(), 1);
}

#[test]
fn nobody_is_found_dead_while_the_feed_stalls() {
    let mut cluster = Cluster::new(2);
    cluster.register(0, 1, "alice");
    cluster.register(1, 2, "bob");
    cluster.m(1).take(2);
    cluster.advance(Duration::from_millis(300), &[0, 1]);
    // No heartbeat reaches anyone, 1's own included.
    cluster.advance(Duration::from_secs(5), &[]);
    assert!(changes(&cluster.m(1).take(2)).is_empty());
    assert_eq!(cluster.m(1).reg.directory().len(), 2);
}

#[test]
fn cut_off_a_registry_refuses_new_names_and_resynchronises() {
    let mut cluster = Cluster::new(2);
    cluster.register(0, 1, "alice");
    cluster.register(0, 2, "dave");
    cluster.register(1, 3, "bob");
    cluster.m(1).take(3);
    cluster.members[0].event(ClusterEvent::Down {
        reason: "test".into(),
    });
    cluster.m(0).register(4, "erin", 7000);
    assert_eq!(cluster.m(0).error_code(4), "unavailable");
    // Dave leaves while registry 0 cannot write it: the write fails.
    cluster.m(0).send(2, &ToRegistry::Leave {});
    cluster.m(0).flush();
    cluster.members[0].collect();
    let lost = std::mem::take(&mut cluster.members[0].pending);
    assert_eq!(lost.len(), 1);
    cluster.members[0].event(ClusterEvent::Written {
        id: lost[0].id,
        result: WriteResult::Failed {
            reason: "no quorum".into(),
        },
    });
    cluster.settle();
    assert!(changes(&cluster.m(1).take(3)).is_empty());
    // Back: the registry compares, and writes dave's leave.
    cluster.members[0].event(ClusterEvent::CaughtUp);
    cluster.settle();
    assert_eq!(
        changes(&cluster.m(1).take(3)),
        vec![Change::Left {
            name: "dave".into(),
            reason: "disconnected".into()
        }]
    );
    let (_, record) = &cluster.bucket.records[&record_key("dave")];
    assert!(matches!(record.state, RecordState::Left { .. }));
    cluster.register(0, 5, "erin");
    assert!(matches!(
        cluster.m(0).take(5)[0],
        FromRegistry::Welcome { .. }
    ));
}

#[test]
fn a_failed_write_is_made_good_once_our_own_heartbeat_comes_round() {
    let mut cluster = Cluster::new(2);
    cluster.register(0, 1, "alice");
    cluster.register(1, 2, "bob");
    cluster.m(1).take(2);
    // Alice leaves while the write cannot land, and the feed never
    // restarts (no `CaughtUp`): the connection was never seen to drop.
    cluster.m(0).send(1, &ToRegistry::Leave {});
    cluster.m(0).flush();
    cluster.members[0].collect();
    let lost = std::mem::take(&mut cluster.members[0].pending);
    cluster.members[0].event(ClusterEvent::Written {
        id: lost[0].id,
        result: WriteResult::Failed {
            reason: "timed out".into(),
        },
    });
    cluster.settle();
    assert!(changes(&cluster.m(1).take(2)).is_empty());
    cluster.members[0].heartbeat("r0");
    cluster.settle();
    assert_eq!(
        changes(&cluster.m(1).take(2)),
        vec![Change::Left {
            name: "alice".into(),
            reason: "disconnected".into()
        }]
    );
}

#[test]
fn a_key_cannot_take_a_look_alike_of_its_own_name_at_another_registry() {
    let mut cluster = Cluster::new(2);
    cluster.register(0, 1, "alice");
    cluster.m(1).register_as(2, "a1ice", 7000, owner("alice"));
    cluster.settle();
    assert_eq!(cluster.m(1).error_code(2), "name_confusable");
}

#[test]
fn a_leave_while_the_record_is_being_written_is_written_after_it() {
    let mut cluster = Cluster::new(2);
    cluster.register(0, 1, "alice");
    cluster.register(1, 3, "bob");
    cluster.m(1).take(3);
    // Alice comes back from a new port (her record is rewritten), and
    // leaves before that write lands.
    cluster.members[0].sim.accept_as(2, ip(1), owner("alice"));
    cluster.m(0).send(2, &register("alice", 7001));
    cluster.m(0).send(2, &ToRegistry::Leave {});
    cluster.m(0).flush();
    cluster.settle();
    let (_, record) = &cluster.bucket.records[&record_key("alice")];
    assert!(
        matches!(&record.state, RecordState::Left { reason, .. } if reason == "quit"),
        "{record:?}"
    );
    let seen = changes(&cluster.m(1).take(3));
    assert_eq!(
        seen.last(),
        Some(&Change::Left {
            name: "alice".into(),
            reason: "quit".into()
        }),
        "{seen:?}"
    );
}

#[test]
fn two_claims_of_one_key_at_one_registry_leave_one_session() {
    let mut cluster = Cluster::new(2);
    cluster.register(1, 9, "bob");
    cluster.m(1).take(9);
    // Both claims go out before either lands.
    cluster.members[0].sim.register(1, "carol", 7000);
    cluster.members[0].sim.register(2, "carol", 7001);
    cluster.settle();
    assert_eq!(cluster.m(0).reg.peer_count(), 1);
    let first = cluster.m(0).take(1);
    assert!(
        matches!(first.last(), Some(FromRegistry::Error { code, .. }) if code == "replaced"),
        "{first:?}"
    );
    let carols = cluster
        .m(1)
        .reg
        .directory()
        .into_iter()
        .filter(|e| e.name == "carol")
        .count();
    assert_eq!(carols, 1);
    let joins = changes(&cluster.m(1).take(9))
        .into_iter()
        .filter(|c| matches!(c, Change::Joined { name, .. } if name == "carol"))
        .count();
    assert_eq!(joins, 1);
}

#[test]
fn a_name_whose_grace_is_over_is_removed_from_the_bucket() {
    let mut cluster = Cluster::with(
        2,
        Config {
            name_grace: Duration::from_secs(2),
            ..config()
        },
    );
    cluster.register(0, 1, "alice");
    cluster.m(0).send(1, &ToRegistry::Leave {});
    cluster.m(0).flush();
    cluster.settle();
    assert!(cluster.bucket.records.contains_key(&record_key("alice")));
    // Looked for once a minute.
    cluster.advance(Duration::from_secs(62), &[0, 1]);
    assert!(!cluster.bucket.records.contains_key(&record_key("alice")));
    // And another key may have the name.
    cluster.m(1).register_as(2, "alice", 7000, key("stranger"));
    cluster.settle();
    assert!(matches!(
        cluster.m(1).take(2)[0],
        FromRegistry::Welcome { .. }
    ));
}

#[test]
fn a_registry_cut_off_for_half_the_grace_sends_its_peers_elsewhere() {
    let mut cluster = Cluster::with(
        2,
        Config {
            name_grace: Duration::from_secs(4),
            ..config()
        },
    );
    cluster.register(0, 1, "alice");
    cluster.m(0).take(1);
    cluster.advance(Duration::from_millis(300), &[0, 1]);
    cluster.members[0].cut = true;
    // Two seconds: half the grace, and past the timeout and five
    // heartbeats.
    cluster.advance(Duration::from_millis(1900), &[1]);
    assert!(!cluster.m(0).closed.contains_key(&1));
    cluster.advance(Duration::from_millis(300), &[1]);
    assert_eq!(cluster.m(0).error_code(1), "unavailable");
    cluster.m(0).register(2, "bob", 7000);
    assert_eq!(cluster.m(0).error_code(2), "unavailable");
    // Back: alice's record says she left, as she did here.
    cluster.members[0].cut = false;
    cluster.advance(Duration::from_millis(300), &[0, 1]);
    let (_, record) = &cluster.bucket.records[&record_key("alice")];
    assert!(
        matches!(record.state, RecordState::Left { .. }),
        "{record:?}"
    );
}
