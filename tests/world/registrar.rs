//! A client that only registers: the smallest machine that can hold a name
//! in the world, for scenarios about the registry alone.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use peerchat_core::codec;
use peerchat_core::event_loop::CloseReason;
use peerchat_core::identity::PublicKey;
use peerchat_core::machine::{LinkId, Machine, Output};
use peerchat_core::protocol::{self, FromRegistry, ToRegistry, PROTOCOL_VERSION};

/// Registers `name` once and heartbeats while `beating`; keeps what the
/// registry says and how the link ended.
pub struct Registrar {
    name: String,
    pub beating: bool,
    heartbeat: Duration,
    next_beat: Option<Instant>,
    link: Option<LinkId>,
    pub heard: Vec<FromRegistry>,
    pub closed: Option<CloseReason>,
    out: Vec<Output<LinkId, Infallible>>,
}

impl Registrar {
    pub fn new(name: &str, registry: SocketAddr) -> Self {
        let link = LinkId::Dialed(0);
        Registrar {
            name: name.into(),
            beating: true,
            heartbeat: Duration::from_secs(1),
            next_beat: None,
            link: Some(link),
            heard: Vec::new(),
            closed: None,
            out: vec![Output::Dial {
                link,
                addr: registry,
            }],
        }
    }

    /// The directory as this client was told it: names joined and not left.
    pub fn directory(&self) -> Vec<String> {
        let mut names: Vec<String> = Vec::new();
        for msg in &self.heard {
            match msg {
                FromRegistry::Welcome { peers, .. } | FromRegistry::Snapshot { peers, .. } => {
                    names.extend(peers.iter().map(|p| p.name.clone()))
                }
                FromRegistry::Update { changes } => {
                    for change in changes {
                        match change {
                            protocol::Change::Joined { name, .. } => names.push(name.clone()),
                            protocol::Change::Left { name, .. } => names.retain(|n| n != name),
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        names.sort();
        names
    }

    pub fn left_reasons(&self) -> Vec<(String, String)> {
        let mut left = Vec::new();
        for msg in &self.heard {
            if let FromRegistry::Update { changes } = msg {
                for change in changes {
                    if let protocol::Change::Left { name, reason } = change {
                        left.push((name.clone(), reason.clone()));
                    }
                }
            }
        }
        left
    }

    pub fn is_welcomed(&self) -> bool {
        self.closed.is_none()
            && self
                .heard
                .iter()
                .any(|m| matches!(m, FromRegistry::Welcome { .. }))
    }
}

impl Machine for Registrar {
    type HostOutput = Infallible;

    fn handle_accepted(&mut self, link: LinkId, _: SocketAddr, _: PublicKey, _: Instant) {
        self.out
            .push(Output::Close(link, "a registrar takes no links".into()));
    }

    fn handle_connected(&mut self, link: LinkId, _key: PublicKey, now: Instant) {
        let register = ToRegistry::Register {
            version: PROTOCOL_VERSION,
            name: self.name.clone(),
            port: 7000,
            relay: false,
            dial_back: false,
        };
        self.out
            .push(Output::Send(link, protocol::frame(&register)));
        self.next_beat = Some(now + self.heartbeat);
    }

    fn handle_frame(&mut self, _link: LinkId, body: &[u8], _now: Instant) {
        let msg = codec::decode::<FromRegistry>(body).expect("the registry speaks the protocol");
        if let FromRegistry::Welcome { heartbeat_ms, .. } = &msg {
            self.heartbeat = Duration::from_millis(*heartbeat_ms);
        }
        self.heard.push(msg);
    }

    fn handle_closed(&mut self, _link: LinkId, reason: &CloseReason, _now: Instant) {
        self.link = None;
        self.next_beat = None;
        self.closed = Some(reason.clone());
    }

    fn poll_timeout(&self) -> Option<Instant> {
        self.next_beat.filter(|_| self.beating)
    }

    fn handle_timeout(&mut self, now: Instant) {
        if let Some(link) = self.link {
            let beat = protocol::frame(&ToRegistry::Heartbeat {});
            self.out.push(Output::Send(link, beat));
            self.next_beat = Some(now + self.heartbeat);
        }
    }

    fn poll_output(&mut self) -> Option<Output<LinkId, Infallible>> {
        (!self.out.is_empty()).then(|| self.out.remove(0))
    }
}
