//! Peers behind NATs, in network namespaces the test makes: a "public"
//! bridge with the registry and carol, and alice and bob each behind a NAT
//! of their own (a namespace with two interfaces that masquerades with
//! nftables). Nobody can dial alice or bob; every pair still chats both
//! ways, alice and bob through the registry's relay, and a capture on the
//! registry's interface shows none of what they said. Needs root, `ip`,
//! `nft` and `tcpdump`; it says so and skips where it cannot have them.

use std::fs;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use peerchat_testkit::launch::{can_be_dialed, is, PeerProc, Registry, LONG};
use peerchat_testkit::process::{run_ok, DataDir};

/// What alice and bob say: it must never cross the registry's wire.
const MARKER: &str = "plaintext-marker-7f3a9c";

/// The namespaces of one run, removed on drop. Public hosts are
/// `<public>.1` (the registry), `.2` (NAT-A), `.3` (NAT-B), `.4` (carol);
/// behind each NAT, `<private>.1` is the NAT and `.2` the peer.
struct Net {
    prefix: String,
    public: String,
    private: [String; 2],
}

/// Nets made by this process so far: the tests of one process run at
/// once, and each needs names of its own.
static NETS: AtomicU32 = AtomicU32::new(0);

impl Net {
    /// The namespaces, or why this machine cannot make them: it is not
    /// root, or lacks a tool. Anything else that fails is a failure.
    fn build() -> Result<Net, String> {
        if run_ok("sh", &["-c", "[ \"$(id -u)\" -eq 0 ]"]).is_err() {
            return Err("not root".into());
        }
        for tool in ["ip", "nft", "tcpdump"] {
            run_ok("sh", &["-c", &format!("command -v {tool}")])
                .map_err(|_| format!("{tool} is not installed"))?;
        }
        let id = (std::process::id() % 10_000) * 10 + NETS.fetch_add(1, Ordering::Relaxed) % 10;
        let net = Net {
            prefix: format!("pn{id}"),
            public: format!("10.214.{}", id % 250),
            private: [
                format!("192.168.{}", id % 120),
                format!("192.168.{}", 120 + id % 120),
            ],
        };
        // On failure `net` is dropped, and what was made goes with it.
        if let Err(why) = net.populate() {
            panic!("cannot make the NAT namespaces: {why}");
        }
        Ok(net)
    }

    /// [`Net::build`], or nothing (said on stderr) where this machine
    /// cannot make the namespaces: the test then skips.
    fn or_skip() -> Option<Net> {
        Net::build()
            .map_err(|why| eprintln!("skipped: cannot make the NAT namespaces here ({why})"))
            .ok()
    }

    fn populate(&self) -> Result<(), String> {
        let net = self;
        let hub = net.ns("hub");
        run_ok("ip", &["netns", "add", &hub])?;
        run_ok("ip", &["-n", &hub, "link", "add", "br0", "type", "bridge"])?;
        run_ok("ip", &["-n", &hub, "link", "set", "br0", "up"])?;
        for (host, last) in [("r", 1), ("na", 2), ("nb", 3), ("c", 4)] {
            net.host_on(&hub, "br0", host, &net.public, last)?;
        }
        for (nat, host, private) in [("na", "a", &net.private[0]), ("nb", "b", &net.private[1])] {
            // The NAT's private side is a second veth, straight to its host.
            let (nat_ns, host_ns) = (net.ns(nat), net.ns(host));
            run_ok("ip", &["netns", "add", &host_ns])?;
            let (inside, outside) = (net.dev(host, "i"), net.dev(host, "o"));
            run_ok(
                "ip",
                &[
                    "link", "add", &inside, "type", "veth", "peer", "name", &outside,
                ],
            )?;
            run_ok("ip", &["link", "set", &inside, "netns", &host_ns])?;
            run_ok("ip", &["link", "set", &outside, "netns", &nat_ns])?;
            let nat_addr = format!("{private}.1/24");
            run_ok(
                "ip",
                &["-n", &nat_ns, "addr", "add", &nat_addr, "dev", &outside],
            )?;
            run_ok("ip", &["-n", &nat_ns, "link", "set", &outside, "up"])?;
            let host_addr = format!("{private}.2/24");
            run_ok(
                "ip",
                &["-n", &host_ns, "addr", "add", &host_addr, "dev", &inside],
            )?;
            run_ok("ip", &["-n", &host_ns, "link", "set", &inside, "up"])?;
            run_ok("ip", &["-n", &host_ns, "link", "set", "lo", "up"])?;
            let gateway = format!("{private}.1");
            run_ok(
                "ip",
                &["-n", &host_ns, "route", "add", "default", "via", &gateway],
            )?;
            let exec = ["netns", "exec", nat_ns.as_str()];
            let sysctl = [&exec[..], &["sysctl", "-qw", "net.ipv4.ip_forward=1"]].concat();
            run_ok("ip", &sysctl)?;
            let public_dev = net.dev(nat, "i");
            let rules = format!(
                "add table ip nat\n\
                 add chain ip nat post {{ type nat hook postrouting priority 100; }}\n\
                 add rule ip nat post oifname \"{public_dev}\" masquerade\n"
            );
            let rules_file = std::env::temp_dir().join(format!("{}{nat}.nft", net.prefix));
            fs::write(&rules_file, rules).map_err(|e| e.to_string())?;
            let nft = [&exec[..], &["nft", "-f", rules_file.to_str().unwrap()]].concat();
            let done = run_ok("ip", &nft);
            let _ = fs::remove_file(&rules_file);
            done?;
        }
        Ok(())
    }

    /// A namespace on the bridge at `<subnet>.<last>`.
    fn host_on(
        &self,
        hub: &str,
        bridge: &str,
        host: &str,
        subnet: &str,
        last: u8,
    ) -> Result<(), String> {
        let ns = self.ns(host);
        let (inner, outer) = (self.dev(host, "i"), self.dev(host, "o"));
        run_ok("ip", &["netns", "add", &ns])?;
        run_ok(
            "ip",
            &[
                "link", "add", &inner, "type", "veth", "peer", "name", &outer,
            ],
        )?;
        run_ok("ip", &["link", "set", &inner, "netns", &ns])?;
        run_ok("ip", &["link", "set", &outer, "netns", hub])?;
        run_ok(
            "ip",
            &["-n", hub, "link", "set", &outer, "master", bridge, "up"],
        )?;
        let addr = format!("{subnet}.{last}/24");
        run_ok("ip", &["-n", &ns, "addr", "add", &addr, "dev", &inner])?;
        run_ok("ip", &["-n", &ns, "link", "set", &inner, "up"])?;
        run_ok("ip", &["-n", &ns, "link", "set", "lo", "up"])
    }

    fn ns(&self, host: &str) -> String {
        format!("{}{host}", self.prefix)
    }

    /// An interface name (at most 15 characters).
    fn dev(&self, host: &str, side: &str) -> String {
        format!("{}{host}{side}", self.prefix)
    }

    fn exec(&self, host: &str) -> Vec<String> {
        ["ip", "netns", "exec"]
            .iter()
            .map(|s| s.to_string())
            .chain([self.ns(host)])
            .collect()
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for host in ["r", "na", "nb", "c", "a", "b", "hub"] {
            let _ = run_ok("ip", &["netns", "del", &self.ns(host)]);
        }
    }
}

fn strs(words: &[String]) -> Vec<&str> {
    words.iter().map(String::as_str).collect()
}

/// tcpdump on the registry's interface, writing every packet whole.
struct Capture {
    child: Child,
    file: std::path::PathBuf,
}

impl Capture {
    fn start(net: &Net, dir: &DataDir) -> Capture {
        let file = dir.path().join("registry.pcap");
        let mut cmd = Command::new("ip");
        cmd.args([
            "netns",
            "exec",
            &net.ns("r"),
            "tcpdump",
            // Without it, what the kernel holds in a block not yet full
            // when tcpdump stops never reaches the file.
            "--immediate-mode",
            "-U",
            "-s",
            "0",
            "-i",
        ])
        .arg(net.dev("r", "i"))
        .arg("-w")
        .arg(&file)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
        let child = cmd.spawn().expect("tcpdump starts");
        // tcpdump says "listening on" once it captures.
        let deadline = Instant::now() + LONG;
        while !file.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(300));
        Capture { child, file }
    }

    /// Stops the capture and returns what it holds.
    fn finish(mut self) -> Vec<u8> {
        let _ = run_ok("kill", &["-INT", &self.child.id().to_string()]);
        let _ = self.child.wait();
        fs::read(&self.file).expect("the capture file")
    }
}

#[test]
fn peers_behind_two_nats_chat_through_the_relay_and_the_registry_sees_no_plaintext() {
    let Some(net) = Net::or_skip() else {
        return;
    };
    let dir = DataDir::fresh();
    let listen = format!("{}.1:7000", net.public);
    let any = ["--listen", "0.0.0.0:0"];
    let capture = Capture::start(&net, &dir);
    let _reg = Registry::launch(&strs(&net.exec("r")), &listen, &[]);
    let mut carol = PeerProc::start_in(&strs(&net.exec("c")), "carol", &listen, &any);
    carol.registered();
    let mut alice = PeerProc::start_in(&strs(&net.exec("a")), "alice", &listen, &any);
    let registered = alice.registered();
    assert!(
        registered["addr"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{}.2:", net.public)),
        "the registry sees alice as her NAT's public address: {registered}"
    );
    let mut bob = PeerProc::start_in(&strs(&net.exec("b")), "bob", &listen, &any);
    bob.registered();
    carol.expect("bob joined", LONG, is("joined", "name", "bob"));
    alice.expect("bob joined", LONG, is("joined", "name", "bob"));

    let mut peers = [("alice", alice), ("bob", bob), ("carol", carol)];
    for from in 0..3 {
        for to in 0..3 {
            if from == to {
                continue;
            }
            let to_name = peers[to].0;
            let text = format!("{MARKER} from {} to {to_name}", peers[from].0);
            peers[from].1.say(&format!("/msg {to_name} {text}"));
            peers[to]
                .1
                .expect("the message", LONG, is("message", "text", &text));
            peers[from]
                .1
                .expect("delivered", LONG, is("delivered", "to", to_name));
        }
    }
    // To everyone, from behind a NAT.
    let text = format!("{MARKER} to everyone");
    peers[0].1.say(&text);
    for p in &mut peers[1..] {
        p.1.expect("the broadcast", LONG, is("message", "text", &text));
    }
    // Behind two NATs, only the relay joins alice and bob; carol, whom
    // everyone can dial, is dialed back by the peers she cannot dial.
    for (from, to, path) in [
        (0, "bob", "relayed"),
        (0, "carol", "direct"),
        (2, "alice", "reversed"),
        (2, "bob", "reversed"),
    ] {
        peers[from].1.say(&format!("/whois {to}"));
        let whois = peers[from].1.expect_event("whois", LONG);
        assert_eq!(whois["link"], path, "{whois}");
    }

    let captured = capture.finish();
    assert!(
        captured.len() > 1000,
        "the capture holds the registry's traffic ({} bytes)",
        captured.len()
    );
    assert!(
        !captured
            .windows(MARKER.len())
            .any(|w| w == MARKER.as_bytes()),
        "the registry's wire carries only ciphertext"
    );
}

#[test]
fn without_the_relay_a_message_between_two_nats_ends_as_unreachable_within_5s_and_dial_backs_still_work(
) {
    let Some(net) = Net::or_skip() else {
        return;
    };
    let listen = format!("{}.1:7000", net.public);
    let any = ["--listen", "0.0.0.0:0"];
    let _reg = Registry::launch(&strs(&net.exec("r")), &listen, &["--no-relay"]);
    let mut alice = PeerProc::start_in(&strs(&net.exec("a")), "alice", &listen, &any);
    alice.registered();
    let mut bob = PeerProc::start_in(&strs(&net.exec("b")), "bob", &listen, &any);
    bob.registered();
    let mut carol = PeerProc::start_in(&strs(&net.exec("c")), "carol", &listen, &any);
    carol.registered();
    alice.expect("bob joined", LONG, is("joined", "name", "bob"));
    alice.expect("carol joined", LONG, is("joined", "name", "carol"));
    carol.expect("that others can dial her", LONG, can_be_dialed);
    carol.say("/msg alice no relay needed");
    alice.expect(
        "the message",
        LONG,
        is("message", "text", "no relay needed"),
    );
    carol.expect("delivered", LONG, is("delivered", "to", "alice"));
    carol.say("/whois alice");
    assert_eq!(carol.expect_event("whois", LONG)["link"], "reversed");

    let sent = Instant::now();
    alice.say("/msg bob can you hear me?");
    let outcome = alice.expect("the outcome", LONG, |e| {
        e["event"] == "undelivered" || e["event"] == "delivered"
    });
    assert_eq!(outcome["reason"], "unreachable", "{outcome}");
    assert!(
        sent.elapsed() < Duration::from_secs(5),
        "{:?}",
        sent.elapsed()
    );
}

#[test]
fn relayed_chat_waits_out_a_registry_killed_mid_conversation() {
    let Some(net) = Net::or_skip() else {
        return;
    };
    let listen = format!("{}.1:7000", net.public);
    let any = ["--listen", "0.0.0.0:0"];
    let registry_data = DataDir::fresh();
    let registry = |data: &DataDir| Registry::launch_in(&strs(&net.exec("r")), data, &listen, &[]);
    let reg = registry(&registry_data);
    let mut alice = PeerProc::start_in(&strs(&net.exec("a")), "alice", &listen, &any);
    alice.registered();
    let mut bob = PeerProc::start_in(&strs(&net.exec("b")), "bob", &listen, &any);
    bob.registered();
    alice.expect("bob joined", LONG, is("joined", "name", "bob"));
    alice.say("/msg bob before");
    bob.expect("the message", LONG, is("message", "text", "before"));
    alice.expect("delivered", LONG, is("delivered", "to", "bob"));

    // The registry dies with the relayed link in it.
    drop(reg);
    for p in [&mut alice, &mut bob] {
        p.expect_event("registry_lost", LONG);
    }
    alice.say("/msg bob while it was down");
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        bob.count(|e| e["event"] == "message" && e["text"] == "while it was down"),
        0,
        "no path while the registry is down"
    );
    assert_eq!(alice.count(is("delivered", "to", "bob")), 1, "it waits");

    // Back, with its key: the peers register again and the message goes.
    let _reg = registry(&registry_data);
    bob.expect(
        "the waiting message",
        Duration::from_secs(30),
        is("message", "text", "while it was down"),
    );
    alice.expect("delivered", LONG, |e| {
        is("delivered", "to", "bob")(e) && e["id"] != 1
    });
    bob.say("/msg alice and back");
    alice.expect("the answer", LONG, is("message", "text", "and back"));
}
