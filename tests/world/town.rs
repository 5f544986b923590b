//! A registry and named peers in one world, and ways to wait for what a
//! peer shows its user.

use std::collections::HashMap;
use std::time::Duration;

use peerchat_core::machine::LinkId;
use peerchat_peer::command::Command;
use peerchat_peer::journal::Saved;
use peerchat_peer::peer::{Config, Event, HostOutput, Peer, Trust};
use peerchat_registry::Registry;
use peerchat_testkit::world::{NodeId, World};

/// The port every peer accepts links on (each has an address of its own).
const LINK_PORT: u16 = 7100;

pub fn registry_config() -> peerchat_registry::Config {
    peerchat_registry::Config {
        heartbeat: Duration::from_millis(500),
        timeout: Duration::from_secs(2),
        ..peerchat_registry::Config::default()
    }
}

pub struct Town {
    pub world: World,
    pub registry: NodeId,
    names: HashMap<NodeId, String>,
    seed: u64,
}

impl Town {
    pub fn new() -> Town {
        Town::with_registry(registry_config())
    }

    pub fn with_registry(config: peerchat_registry::Config) -> Town {
        let mut world = World::new();
        let registry = world.add(Some(7000), |n| Registry::new(config, n.now));
        Town {
            world,
            registry,
            names: HashMap::new(),
            seed: 1,
        }
    }

    /// A town whose peers have all registered.
    pub fn with(names: &[&str]) -> (Town, Vec<NodeId>) {
        let mut town = Town::new();
        let peers: Vec<NodeId> = names.iter().map(|n| town.peer(n)).collect();
        for &p in &peers {
            town.wait(p, "registered", |e| matches!(e, Event::Registered { .. }));
        }
        (town, peers)
    }

    pub fn peer(&mut self, name: &str) -> NodeId {
        self.peer_trusting(name, Trust::default())
    }

    pub fn peer_trusting(&mut self, name: &str, trust: Trust) -> NodeId {
        self.add_peer(name, trust, true)
    }

    /// A peer nobody can dial (behind a NAT): it declares its port, but
    /// dials to its address are refused.
    pub fn peer_behind_nat(&mut self, name: &str) -> NodeId {
        self.add_peer(name, Trust::default(), false)
    }

    fn add_peer(&mut self, name: &str, trust: Trust, reachable: bool) -> NodeId {
        let registry = self.world.addr(self.registry);
        self.seed += 1;
        let seed = self.seed;
        let node = self.world.add(reachable.then_some(LINK_PORT), |n| {
            let config = Config::new(name.into(), registry, LINK_PORT, n.key);
            let mut peer = Peer::new(config, trust, Saved::default(), seed, n.now, n.wall);
            peer.start(n.now);
            peer
        });
        self.names.insert(node, name.into());
        node
    }

    pub fn registry(&mut self) -> &mut Registry<LinkId> {
        let registry = self.registry;
        self.world.machine(registry)
    }

    /// What a peer has shown its user so far.
    pub fn events(&self, node: NodeId) -> Vec<&Event> {
        self.world
            .host::<HostOutput>(node)
            .filter_map(|h| match h {
                HostOutput::Show(event) => Some(event),
                _ => None,
            })
            .collect()
    }

    pub fn count(&self, node: NodeId, pred: impl Fn(&Event) -> bool) -> usize {
        self.events(node).into_iter().filter(|e| pred(e)).count()
    }

    /// Runs until the peer has shown `n` events that match, within a
    /// minute of simulated time.
    pub fn wait_for(
        &mut self,
        node: NodeId,
        n: usize,
        what: &str,
        pred: impl Fn(&Event) -> bool,
    ) -> Event {
        let shown = |w: &World| {
            w.host::<HostOutput>(node)
                .filter_map(|h| match h {
                    HostOutput::Show(e) if pred(e) => Some(e.clone()),
                    _ => None,
                })
                .nth(n - 1)
        };
        if !self
            .world
            .run_until(Duration::from_secs(60), |w| shown(w).is_some())
        {
            let name = &self.names[&node];
            panic!("{name} never showed {what}: {:#?}", self.events(node));
        }
        shown(&self.world).expect("it was just shown")
    }

    /// The first event that matches, waited for.
    pub fn wait(&mut self, node: NodeId, what: &str, pred: impl Fn(&Event) -> bool) -> Event {
        self.wait_for(node, 1, what, pred)
    }

    pub fn command(&mut self, node: NodeId, command: Command) {
        let wall = self.world.wall();
        self.world.with::<Peer, _>(node, |peer, now| {
            peer.command(command, now, wall);
        });
    }

    pub fn say_to(&mut self, node: NodeId, to: &str, text: &str) {
        self.command(
            node,
            Command::Direct {
                to: to.into(),
                text: text.into(),
            },
        );
    }

    /// Whether the peer asked to end its process, and with which status.
    pub fn exit_status(&self, node: NodeId) -> Option<i32> {
        self.world.host::<HostOutput>(node).find_map(|h| match h {
            HostOutput::Exit(status) => Some(*status),
            _ => None,
        })
    }
}

pub fn left(name: &str, reason: &str) -> impl Fn(&Event) -> bool {
    let (name, reason) = (name.to_string(), reason.to_string());
    move |e| matches!(e, Event::Left { name: n, reason: r } if *n == name && *r == reason)
}

pub fn joined(name: &str) -> impl Fn(&Event) -> bool {
    let name = name.to_string();
    move |e| matches!(e, Event::Joined { name: n, .. } if *n == name)
}

pub fn message(text: &str) -> impl Fn(&Event) -> bool {
    let text = text.to_string();
    move |e| matches!(e, Event::Message { text: t, .. } if *t == text)
}

pub fn registered(e: &Event) -> bool {
    matches!(e, Event::Registered { .. })
}

pub fn registry_lost(e: &Event) -> bool {
    matches!(e, Event::RegistryLost { .. })
}
