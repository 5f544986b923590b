//! Three hosts on one machine: the registry, alice and bob each in a network
//! namespace of their own, joined by veth pairs on a bridge that lives in a
//! fourth namespace. Checks observed addresses, direct chat across hosts,
//! and eviction when a cable is cut without a FIN. Needs root and `ip`; it
//! says so and skips where namespaces cannot be made.

use std::time::Duration;

use peerchat_testkit::launch::{PeerProc, Registry, EVICT_AFTER, LONG};
use peerchat_testkit::process::run_ok;

/// The namespaces and links of one test run, removed on drop.
struct Net {
    prefix: String,
    subnet: String,
}

fn ip(args: &[&str]) -> Result<(), String> {
    run_ok("ip", args)
}

impl Net {
    /// Hosts get `<subnet>.1` (registry), `.2` (alice), `.3` (bob).
    fn build() -> Result<Net, String> {
        let id = std::process::id();
        let net = Net {
            prefix: format!("pc{id}"),
            subnet: format!("10.213.{}", id % 250),
        };
        let hub = net.ns("hub");
        ip(&["netns", "add", &hub])?;
        ip(&["-n", &hub, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &hub, "link", "set", "br0", "up"])?;
        for (host, last) in [("r", 1), ("a", 2), ("b", 3)] {
            let ns = net.ns(host);
            let (inner, outer) = (net.veth(host, "i"), net.veth(host, "o"));
            ip(&["netns", "add", &ns])?;
            ip(&[
                "link", "add", &inner, "type", "veth", "peer", "name", &outer,
            ])?;
            ip(&["link", "set", &inner, "netns", &ns])?;
            ip(&["link", "set", &outer, "netns", &hub])?;
            ip(&["-n", &hub, "link", "set", &outer, "master", "br0", "up"])?;
            let addr = format!("{}.{last}/24", net.subnet);
            ip(&["-n", &ns, "addr", "add", &addr, "dev", &inner])?;
            ip(&["-n", &ns, "link", "set", &inner, "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        }
        Ok(net)
    }

    fn ns(&self, host: &str) -> String {
        format!("{}{host}", self.prefix)
    }

    fn veth(&self, host: &str, side: &str) -> String {
        format!("{}{host}{side}", self.prefix)
    }

    fn addr(&self, last: u8) -> String {
        format!("{}.{last}", self.subnet)
    }

    /// The command prefix that runs a program on `host`.
    fn exec(&self, host: &str) -> [String; 4] {
        ["ip".into(), "netns".into(), "exec".into(), self.ns(host)]
    }
}

fn strs(words: &[String]) -> Vec<&str> {
    words.iter().map(String::as_str).collect()
}

impl Drop for Net {
    fn drop(&mut self) {
        for host in ["r", "a", "b", "hub"] {
            let _ = ip(&["netns", "del", &self.ns(host)]);
        }
    }
}

#[test]
fn three_hosts_chat_directly_and_a_cut_cable_is_evicted() {
    let net = match Net::build() {
        Ok(net) => net,
        Err(why) => {
            eprintln!("skipped: cannot make network namespaces here ({why})");
            return;
        }
    };
    let listen = format!("{}:7000", net.addr(1));
    let (r, a, b) = (net.exec("r"), net.exec("a"), net.exec("b"));
    let any = ["--listen", "0.0.0.0:0"];
    let reg = Registry::launch(&strs(&r), &listen, &["--timeout", EVICT_AFTER]);
    let mut alice = PeerProc::start_in(&strs(&a), "alice", &listen, &any);
    let registered = alice.registered();
    let alice_addr = registered["addr"].as_str().unwrap().to_string();
    assert!(
        alice_addr.starts_with(&format!("{}:", net.addr(2))),
        "the registry reports alice's observed address: {alice_addr}"
    );
    let mut bob = PeerProc::start_in(&strs(&b), "bob", &listen, &any);
    let registered = bob.registered();
    assert_eq!(registered["peers"][0]["addr"], alice_addr.as_str());
    assert_eq!(
        registered["peers"][0]["key"],
        alice.key().to_string().as_str(),
        "the directory carries the key alice proved"
    );
    let joined = alice.expect_event("joined", LONG);
    assert!(joined["addr"]
        .as_str()
        .unwrap()
        .starts_with(&format!("{}:", net.addr(3))));
    assert_eq!(joined["key"], bob.key().to_string().as_str());

    alice.say("/msg bob across the bridge");
    bob.expect("message", LONG, |v| v["text"] == "across the bridge");
    alice.expect_event("delivered", LONG);
    bob.say("and back");
    alice.expect("message", LONG, |v| v["text"] == "and back");
    // Both ends pinned the registry (by the address they were given) and
    // each other.
    let pins = alice.data.known_peers_text();
    assert!(
        pins.contains(&format!("registry {listen} {}", reg.key)),
        "{pins}"
    );
    assert!(pins.contains(&format!("peer bob {}", bob.key())), "{pins}");

    // Cut bob's cable at the bridge: no FIN, no RST, just silence.
    ip(&[
        "-n",
        &net.ns("hub"),
        "link",
        "set",
        &net.veth("b", "o"),
        "down",
    ])
    .unwrap();
    let left = alice.expect("left", Duration::from_secs(10), |v| v["event"] == "left");
    assert_eq!(
        (left["name"].as_str(), left["reason"].as_str()),
        (Some("bob"), Some("timeout"))
    );
    assert!(reg
        .proc
        .stderr
        .wait_for("reason=\"timeout\"", Duration::from_secs(2)));
}
