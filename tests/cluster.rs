//! Registries in a cluster (`--cluster`): three NATS servers with
//! JetStream on loopback, made by each test, and three registries on
//! them. Peers on different registries see one directory and chat; a name
//! raced from two keys at two registries goes to exactly one; a registry
//! killed hands its peers to the others without a `left`; the loss of a
//! NATS server is invisible, the loss of NATS's quorum refuses new names
//! with `unavailable` until it is back. Needs `nats-server` (2.9 or newer).

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use peerchat_core::identity::Identity;
use peerchat_core::protocol::FromRegistry;
use peerchat_testkit::client::{code_of, Client};
use peerchat_testkit::launch::{is, PeerProc, Registry, LONG};
use peerchat_testkit::process::DataDir;

/// One NATS server of a test's cluster, killed when dropped.
struct NatsNode {
    child: Child,
    client_port: u16,
    _store: DataDir,
}

impl Drop for NatsNode {
    fn drop(&mut self) {
        self.signal(libc::SIGCONT);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl NatsNode {
    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.client_port)
    }

    fn signal(&self, signal: i32) {
        // SAFETY: kill only sends a signal to our own child.
        unsafe {
            libc::kill(self.child.id() as i32, signal);
        }
    }
}

/// Ports nobody listens on now (each bound, then let go).
fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("a free port"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

fn nats_server() -> PathBuf {
    for dir in ["/usr/sbin", "/usr/bin", "/usr/local/bin"] {
        let path = PathBuf::from(dir).join("nats-server");
        if path.exists() {
            return path;
        }
    }
    panic!("these tests need nats-server (apt-get install nats-server); .ci/run installs it");
}

/// Three NATS servers with JetStream, routed to each other.
fn nats_cluster() -> Vec<NatsNode> {
    let ports = free_ports(6);
    let (clients, routes) = ports.split_at(3);
    let route_urls: Vec<String> = routes
        .iter()
        .map(|p| format!("nats://127.0.0.1:{p}"))
        .collect();
    (0..3)
        .map(|i| {
            let store = DataDir::fresh();
            let child = Command::new(nats_server())
                .args(["-a", "127.0.0.1", "-p", &clients[i].to_string()])
                .args(["-n", &format!("n{i}-{}", clients[0])])
                .args(["-js", "-sd"])
                .arg(store.path())
                .args(["--cluster_name", &format!("pc{}", clients[0])])
                .args(["--cluster", &route_urls[i]])
                .args(["--routes", &route_urls.join(",")])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("nats-server starts");
            NatsNode {
                child,
                client_port: clients[i],
                _store: store,
            }
        })
        .collect()
}

/// A registry of the cluster, with the key all of them share (so that a
/// peer pins one key for the cluster), once it has loaded the directory.
fn cluster_registry(key: &DataDir, servers: &[String]) -> Registry {
    let servers = servers.join(",");
    let registry = Registry::start_in(key, "127.0.0.1:0", &["--cluster", &servers]);
    assert!(
        registry
            .proc
            .stderr
            .wait_for("cluster directory loaded", Duration::from_secs(30)),
        "the registry never loaded the cluster's directory: {:?}",
        registry.proc.stderr.tail(20)
    );
    registry
}

/// The NATS servers and three registries, each registry on all servers.
struct Cluster {
    nats: Vec<NatsNode>,
    registries: Vec<Registry>,
    _key: DataDir,
}

/// A failed test shows what the registries said.
impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for (i, registry) in self.registries.iter().enumerate() {
                let mut tail = registry.proc.stderr.tail(40);
                tail.reverse();
                eprintln!("registry {i}:\n{}", tail.join("\n"));
            }
        }
    }
}

impl Cluster {
    fn start() -> Cluster {
        let nats = nats_cluster();
        let urls: Vec<String> = nats.iter().map(NatsNode::url).collect();
        let key = DataDir::fresh();
        let registries = (0..3).map(|_| cluster_registry(&key, &urls)).collect();
        Cluster {
            nats,
            registries,
            _key: key,
        }
    }

    fn addr(&self, i: usize) -> SocketAddr {
        self.registries[i].addr
    }

    /// A peer on registry `i`, with the others as its fallbacks.
    fn peer(&self, name: &str, i: usize) -> PeerProc {
        let mut extra: Vec<String> = Vec::new();
        for j in (0..self.registries.len()).filter(|j| *j != i) {
            extra.push("--registry".into());
            extra.push(self.addr(j).to_string());
        }
        extra.push("--no-store".into());
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        PeerProc::start_with(name, &self.addr(i).to_string(), &extra)
    }
}

fn names_in(registered: &serde_json::Value) -> Vec<String> {
    let mut names: Vec<String> = registered["peers"]
        .as_array()
        .map(|peers| {
            peers
                .iter()
                .filter_map(|p| p["name"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[test]
fn peers_of_different_registries_share_one_directory_and_chat() {
    let cluster = Cluster::start();
    let mut alice = cluster.peer("alice", 0);
    alice.registered();
    let mut bob = cluster.peer("bob", 1);
    assert_eq!(names_in(&bob.registered()), ["alice"]);
    alice.expect("bob joining", LONG, is("joined", "name", "bob"));
    let mut carol = cluster.peer("carol", 2);
    assert_eq!(names_in(&carol.registered()), ["alice", "bob"]);
    alice.expect("carol joining", LONG, is("joined", "name", "carol"));
    bob.expect("carol joining", LONG, is("joined", "name", "carol"));

    alice.say("hello from registry 0");
    for peer in [&mut bob, &mut carol] {
        peer.expect("alice's message", LONG, |v| {
            v["event"] == "message" && v["text"] == "hello from registry 0"
        });
    }
    carol.say("/msg bob just for bob");
    bob.expect("carol's direct message", LONG, |v| {
        v["event"] == "message" && v["text"] == "just for bob"
    });

    // A name taken at one registry is taken at the others.
    let (_, reply) = Client::register(cluster.addr(2), "alice", 9);
    assert_eq!(code_of(Some(reply)), "name_taken");
    let (_, reply) = Client::register(cluster.addr(1), "a1ice", 9);
    assert_eq!(code_of(Some(reply)), "name_confusable");

    // A leave at one registry reaches the others.
    carol.close_input();
    alice.expect("carol leaving", LONG, |v| {
        v["event"] == "left" && v["name"] == "carol" && v["reason"] == "quit"
    });
    bob.expect("carol leaving", LONG, is("left", "name", "carol"));
}

/// The same name, from two keys, at two registries at once: exactly one
/// is welcomed, every time.
#[test]
fn a_name_raced_from_two_keys_at_two_registries_goes_to_exactly_one() {
    let cluster = Cluster::start();
    let (a, b) = (cluster.addr(0), cluster.addr(1));
    let rounds = 300;
    let mut wins = [0usize; 2];
    let mut kept = Vec::new();
    for round in 0..rounds {
        let name = format!("race{round}");
        let start = Arc::new(Barrier::new(2));
        let racers: Vec<_> = [a, b]
            .into_iter()
            .map(|addr| {
                let (name, start) = (name.clone(), start.clone());
                std::thread::spawn(move || {
                    let identity = Identity::generate();
                    let mut client = Client::connect_as(addr, &identity);
                    start.wait();
                    client.send(&peerchat_testkit::client::register_msg(&name, 9));
                    let reply = client.recv();
                    (client, reply)
                })
            })
            .collect();
        let replies: Vec<(Client, Option<FromRegistry>)> =
            racers.into_iter().map(|r| r.join().unwrap()).collect();
        let welcomed: Vec<usize> = replies
            .iter()
            .enumerate()
            .filter(|(_, (_, reply))| matches!(reply, Some(FromRegistry::Welcome { .. })))
            .map(|(i, _)| i)
            .collect();
        assert_eq!(
            welcomed.len(),
            1,
            "round {round}: {:?}",
            replies.iter().map(|(_, r)| r).collect::<Vec<_>>()
        );
        let loser = 1 - welcomed[0];
        let code = code_of(replies[loser].1.clone());
        assert_eq!(code, "name_taken", "round {round}");
        wins[welcomed[0]] += 1;
        // Held open: the winner stays online while later rounds run.
        kept.extend(replies.into_iter().map(|(c, _)| c));
    }
    // Both registries won some: the race was a real one.
    assert!(wins[0] > 0 && wins[1] > 0, "wins per registry: {wins:?}");
}

/// kill -9 one registry: its peers move to the others and keep their
/// names, and nobody hears them leave. A peer with no other registry to
/// go to is reported left (`timeout`) once the dead registry's silence
/// passes the timeout.
#[test]
fn a_killed_registrys_peers_move_to_the_others_and_keep_their_names() {
    let mut cluster = Cluster::start();
    let mut alice = cluster.peer("alice", 0);
    alice.registered();
    let mut bob = cluster.peer("bob", 1);
    bob.registered();
    let mut dave = PeerProc::start_with("dave", &cluster.addr(1).to_string(), &["--no-store"]);
    dave.registered();
    alice.expect("dave joining", LONG, is("joined", "name", "dave"));

    let killed_at = Instant::now();
    cluster.registries[1].proc.child.kill().unwrap();
    bob.expect("bob's re-registration", LONG, |v| {
        v["event"] == "registered" && v["name"] == "bob"
    });
    alice.expect("dave's eviction", Duration::from_secs(30), |v| {
        v["event"] == "left" && v["name"] == "dave" && v["reason"] == "timeout"
    });
    // The timeout is 5 s; the check runs every heartbeat.
    assert!(killed_at.elapsed() >= Duration::from_secs(4));
    assert_eq!(
        alice.count(|v| v["event"] == "left" && v["name"] == "bob"),
        0,
        "bob moved, he did not leave: {:?}",
        alice.seen
    );
    alice.say("/msg bob still here?");
    bob.expect("alice's message", LONG, |v| {
        v["event"] == "message" && v["text"] == "still here?"
    });
}

/// Two NATS servers of three frozen (no quorum): the registries keep
/// their peers chatting and refuse new names with `unavailable`; once the
/// servers resume, names are taken again. Then one server killed: nothing
/// shows.
#[test]
fn nats_losing_quorum_refuses_new_names_until_it_is_back() {
    let mut cluster = Cluster::start();
    let mut alice = cluster.peer("alice", 0);
    alice.registered();
    let mut bob = cluster.peer("bob", 1);
    bob.registered();
    alice.expect("bob joining", LONG, is("joined", "name", "bob"));

    for node in &cluster.nats[..2] {
        node.signal(libc::SIGSTOP);
    }
    // Until the registry notices, a name may still go through: erin's key
    // can take it again later.
    let erin = Identity::generate();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, reply) = Client::register_as(cluster.addr(0), &erin, "erin", 9);
        match reply {
            FromRegistry::Error { code, .. } if code == "unavailable" => break,
            FromRegistry::Welcome { .. } => {}
            other => panic!("expected unavailable, got {other:?}"),
        }
        assert!(
            Instant::now() < deadline,
            "names still given out without a quorum"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    alice.say("during the outage");
    bob.expect("alice's message", LONG, |v| {
        v["event"] == "message" && v["text"] == "during the outage"
    });

    for node in &cluster.nats[..2] {
        node.signal(libc::SIGCONT);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let _erin = loop {
        let (client, reply) = Client::register_as(cluster.addr(0), &erin, "erin", 9);
        if matches!(reply, FromRegistry::Welcome { .. }) {
            break client;
        }
        assert!(
            Instant::now() < deadline,
            "names still refused after NATS came back: {reply:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    bob.expect("erin joining", LONG, is("joined", "name", "erin"));

    // One server gone: names still go through, at every registry.
    drop(cluster.nats.remove(0));
    let mut carol = cluster.peer("carol", 2);
    carol.registered();
    alice.expect("carol joining", LONG, is("joined", "name", "carol"));
    bob.expect("carol joining", LONG, is("joined", "name", "carol"));
}
