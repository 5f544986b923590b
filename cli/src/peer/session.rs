//! The registry session: connecting and registering, the heartbeats that
//! keep us listed, and reconnecting with a jittered backoff when the
//! registry is lost.
//!
//! Separate because it is the peer's one conversation with the registry,
//! with a lifecycle and timers of its own: losing the registry leaves the
//! directory and the links alone. What the registry says about other peers
//! is handed to the facade as [`Heard`], for the directory.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use peerchat_core::codec;
use peerchat_core::identity::PublicKey;
use peerchat_core::machine::LinkId;
use peerchat_core::protocol::{
    self, Change, ErrorCode, FromRegistry, PeerEntry, ToRegistry, PROTOCOL_VERSION,
};

use super::actions::Reversal;
use super::{
    pin_text, Actions, Config, Event, HostOutput, Pin, RegistryTrust, Rng, Timer, TimerKey,
};

/// The heartbeat and timeout a registry may set, in milliseconds; values
/// outside are clamped.
const HEARTBEAT_MS: (u64, u64) = (10, 3_600_000);
const TIMEOUT_MS_MAX: u64 = 86_400_000;

/// The registry's refusals of a registration: retrying would only be
/// refused again.
const REFUSALS: [ErrorCode; 5] = [
    ErrorCode::NameTaken,
    ErrorCode::NameConfusable,
    ErrorCode::BadName,
    ErrorCode::BadPort,
    ErrorCode::UnsupportedVersion,
];

/// What the registry said that concerns more than the session.
pub(super) enum Heard {
    Nothing,
    /// The whole welcome came: who is online.
    Registered(Vec<PeerEntry>),
    Changes(Vec<Change>),
    /// `from` would reach us through the registry's relay (invitation `id`).
    RelayInvite {
        id: u64,
        from: String,
    },
    /// `from` cannot dial us and asks us to dial it (4.8).
    DialBack {
        from: String,
    },
    /// Our request that `to` dial us back was not passed on.
    ReverseFailed {
        to: String,
        code: String,
        reason: String,
    },
    /// The registry refused us, replaced us or proved a key we do not
    /// trust: the peer exits with status 2, reporting this code.
    Ended(ErrorCode),
}

enum State {
    /// Not connected: at start, or waiting for the retry timer after the
    /// registry was lost (why, and when the next attempt starts).
    Idle {
        lost: Option<(String, Instant)>,
    },
    /// Connecting or registered-and-waiting for the (whole) welcome.
    Registering {
        conn: LinkId,
        snapshot: Vec<PeerEntry>,
    },
    Online {
        conn: LinkId,
        last_heard: Instant,
    },
    /// Over for good.
    Closed,
}

pub(super) struct Session {
    state: State,
    /// The name we register as: the one asked for, then as the registry
    /// last welcomed it.
    name: String,
    /// Our address as the registry observed it.
    addr: String,
    trust: RegistryTrust,
    /// The peer is quitting, or the registry ended it: never reconnect.
    ending: bool,
    /// The one timer of the current state: the retry while idle, the
    /// register deadline while registering, the heartbeat while online.
    timer: Option<TimerKey>,
    backoff: Duration,
    heartbeat: Duration,
    timeout: Duration,
    /// The registry said in its welcome that it probes registrations.
    probed: bool,
    /// The first registration attempt has ended, one way or the other.
    first_attempt_over: bool,
    /// A welcome has come at least once: the registry is "lost", not
    /// "unreachable", when it goes.
    ever_registered: bool,
    /// The registry dialed last: one of `registries`.
    registry: SocketAddr,
    /// The registry, then its cluster's others, tried in turn.
    registries: Vec<SocketAddr>,
    registry_name: String,
    known_peers: String,
    listen_port: u16,
    backoff_min: Duration,
    backoff_max: Duration,
    register_timeout: Duration,
}

impl Session {
    pub(super) fn new(config: &Config, trust: RegistryTrust) -> Self {
        Session {
            state: State::Idle { lost: None },
            name: config.name.clone(),
            addr: String::new(),
            trust,
            ending: false,
            timer: None,
            backoff: config.backoff_min,
            heartbeat: Duration::from_secs(5),
            timeout: Duration::from_secs(15),
            probed: false,
            first_attempt_over: false,
            ever_registered: false,
            registry: config.registry,
            registries: std::iter::once(config.registry)
                .chain(config.fallbacks.iter().copied())
                .collect(),
            registry_name: config.registry_name.clone(),
            known_peers: config.known_peers.clone(),
            listen_port: config.listen_port,
            backoff_min: config.backoff_min,
            backoff_max: config.backoff_max,
            register_timeout: config.register_timeout,
        }
    }

    pub(super) fn conn(&self) -> Option<LinkId> {
        match &self.state {
            State::Registering { conn, .. } | State::Online { conn, .. } => Some(*conn),
            State::Idle { .. } | State::Closed => None,
        }
    }

    pub(super) fn is_online(&self) -> bool {
        matches!(self.state, State::Online { .. })
    }

    pub(super) fn name(&self) -> &str {
        &self.name
    }

    pub(super) fn addr(&self) -> &str {
        &self.addr
    }

    /// The registry's key, once one is trusted: what a relay connection
    /// must prove.
    pub(super) fn registry_key(&self) -> Option<PublicKey> {
        match self.trust {
            RegistryTrust::Pinned(key) => Some(key),
            RegistryTrust::FirstUse | RegistryTrust::Given(_) => None,
        }
    }

    pub(super) fn is_ending(&self) -> bool {
        self.ending
    }

    pub(super) fn first_attempt_over(&self) -> bool {
        self.first_attempt_over
    }

    /// Arms `timer` as the one of the state just entered, in place of the
    /// last state's.
    fn set_timer(&mut self, at: Instant, timer: Timer, actions: &mut Actions) {
        actions.cancel(self.timer.take());
        self.timer = Some(actions.arm(at, timer));
    }

    pub(super) fn dial(&mut self, now: Instant, actions: &mut Actions) {
        let conn = actions.dial(self.registry);
        self.state = State::Registering {
            conn,
            snapshot: Vec::new(),
        };
        // The deadline covers the connect and the handshake too.
        self.set_timer(
            now + self.register_timeout,
            Timer::RegisterDeadline,
            actions,
        );
    }

    /// The registry proved `key`: register if it is the one we trust.
    pub(super) fn on_connected(
        &mut self,
        conn: LinkId,
        key: PublicKey,
        actions: &mut Actions,
    ) -> Heard {
        match self.trust {
            RegistryTrust::Given(expected) | RegistryTrust::Pinned(expected) if expected != key => {
                let fix = match self.trust {
                    RegistryTrust::Given(_) => format!(
                        "--registry-key gave {expected}; if the registry's key really changed (ask its operator), start again with --registry-key {key}"
                    ),
                    _ => format!(
                        "{expected} is pinned for it; if the registry's key really changed (ask its operator), delete the line \"{}\" from {} and start again",
                        pin_text("registry", &self.registry_name, &expected),
                        self.known_peers
                    ),
                };
                let message = format!(
                    "the registry at {} proved key {key}: not the registry you trust, so this peer stops. {fix}",
                    self.registry
                );
                actions.error(ErrorCode::KeyMismatch, message.clone());
                actions.close(conn, message);
                self.end(actions);
                self.first_attempt_over = true;
                return Heard::Ended(ErrorCode::KeyMismatch);
            }
            RegistryTrust::Pinned(_) => {}
            RegistryTrust::FirstUse | RegistryTrust::Given(_) => {
                self.trust = RegistryTrust::Pinned(key);
                actions.host(HostOutput::Pin(Pin::Registry(key)));
            }
        }
        let register = ToRegistry::Register {
            version: PROTOCOL_VERSION,
            name: self.name.clone(),
            port: i64::from(self.listen_port),
            relay: true,
            dial_back: true,
        };
        actions.send(conn, protocol::frame(&register));
        Heard::Nothing
    }

    pub(super) fn on_frame(
        &mut self,
        conn: LinkId,
        body: &[u8],
        now: Instant,
        rng: &mut Rng,
        actions: &mut Actions,
    ) -> Heard {
        let msg = match codec::decode::<FromRegistry>(body) {
            Ok(msg) => msg,
            Err(e) => {
                let why = format!("undecodable message from the registry: {e}");
                return self.hang_up(conn, why, now, rng, actions);
            }
        };
        if let State::Online { last_heard, .. } = &mut self.state {
            *last_heard = now;
        }
        match msg {
            FromRegistry::Welcome {
                version,
                name,
                addr,
                heartbeat_ms,
                timeout_ms,
                probes,
                peers,
                more,
            } => {
                let State::Registering { snapshot, .. } = &mut self.state else {
                    return self.hang_up(conn, "unexpected welcome".into(), now, rng, actions);
                };
                if version != PROTOCOL_VERSION {
                    let why = format!("registry speaks version {version}");
                    return self.hang_up(conn, why, now, rng, actions);
                }
                snapshot.extend(peers);
                let heartbeat_ms = heartbeat_ms.clamp(HEARTBEAT_MS.0, HEARTBEAT_MS.1);
                self.heartbeat = Duration::from_millis(heartbeat_ms);
                self.timeout =
                    Duration::from_millis(timeout_ms.clamp(heartbeat_ms + 10, TIMEOUT_MS_MAX));
                self.name = name;
                self.addr = addr;
                self.probed = probes;
                self.welcome_part_done(conn, more, now, actions)
            }
            FromRegistry::Snapshot { peers, more } => {
                let State::Registering { snapshot, .. } = &mut self.state else {
                    return self.hang_up(conn, "unexpected snapshot".into(), now, rng, actions);
                };
                snapshot.extend(peers);
                self.welcome_part_done(conn, more, now, actions)
            }
            FromRegistry::Update { changes } => Heard::Changes(changes),
            FromRegistry::Heartbeat {} => Heard::Nothing,
            FromRegistry::Error { code, reason } if code == ErrorCode::Replaced.as_str() => {
                // Another process holding our key took our name over; two
                // of us would only keep replacing each other.
                let message = format!("this session was replaced: {reason}");
                actions.error(ErrorCode::Replaced, message);
                self.end(actions);
                actions.close(conn, "replaced");
                Heard::Ended(ErrorCode::Replaced)
            }
            FromRegistry::Error { code, reason } => {
                let refusal = REFUSALS.into_iter().find(|r| r.as_str() == code);
                match refusal {
                    Some(refusal) if matches!(self.state, State::Registering { .. }) => {
                        let message = format!("the registry refused us: {reason}");
                        actions.error(refusal, message);
                        self.end(actions);
                        actions.close(conn, "refused");
                        Heard::Ended(refusal)
                    }
                    _ => {
                        let why = format!("registry error {code}: {reason}");
                        self.hang_up(conn, why, now, rng, actions)
                    }
                }
            }
            FromRegistry::Shutdown { reason } => {
                let why = format!("the registry shut down: {reason}");
                self.hang_up(conn, why, now, rng, actions)
            }
            FromRegistry::Relay { id, from } => Heard::RelayInvite { id, from },
            FromRegistry::DialBack { from } => Heard::DialBack { from },
            FromRegistry::ReverseFailed { to, code, reason } => {
                Heard::ReverseFailed { to, code, reason }
            }
            FromRegistry::RelayReady {} => {
                let why = "relay_ready on the registry session".to_string();
                self.hang_up(conn, why, now, rng, actions)
            }
        }
    }

    /// After each part of the welcome: the last one makes us registered.
    fn welcome_part_done(
        &mut self,
        conn: LinkId,
        more: bool,
        now: Instant,
        actions: &mut Actions,
    ) -> Heard {
        if more {
            return Heard::Nothing;
        }
        let online = State::Online {
            conn,
            last_heard: now,
        };
        let snapshot = match std::mem::replace(&mut self.state, online) {
            State::Registering { snapshot, .. } => snapshot,
            _ => Vec::new(),
        };
        self.backoff = self.backoff_min;
        self.first_attempt_over = true;
        self.ever_registered = true;
        // Relays pair peers of one registry: ours, from now on.
        actions.set_relay_via(self.registry);
        // Whether others can dial us is for this registration's probe to
        // say (again).
        actions.reversal = if self.probed {
            Reversal::Pending
        } else {
            Reversal::Off
        };
        Heard::Registered(snapshot)
    }

    /// The registry found whether others can dial us at the address it
    /// lists: while they can, peers we cannot dial may be asked to dial us.
    pub(super) fn set_reachable(&self, reachable: bool, actions: &mut Actions) {
        actions.reversal = match self.state {
            State::Online { conn, .. } if reachable => Reversal::Via(conn),
            _ => Reversal::Off,
        };
    }

    /// Called once the rest of the peer has taken the welcome in, so that
    /// the first heartbeat is armed after whatever that armed.
    pub(super) fn start_heartbeats(&mut self, now: Instant, actions: &mut Actions) {
        self.set_timer(now + self.heartbeat, Timer::Heartbeat, actions);
    }

    pub(super) fn on_heartbeat(&mut self, now: Instant, rng: &mut Rng, actions: &mut Actions) {
        self.timer = None;
        let State::Online { conn, last_heard } = self.state else {
            return;
        };
        let silent = now.saturating_duration_since(last_heard);
        if silent >= self.timeout {
            let why = format!("the registry was silent for {} ms", silent.as_millis());
            self.hang_up(conn, why, now, rng, actions);
            return;
        }
        actions.send(conn, protocol::frame(&ToRegistry::Heartbeat {}));
        self.set_timer(now + self.heartbeat, Timer::Heartbeat, actions);
    }

    pub(super) fn on_retry(&mut self, now: Instant, actions: &mut Actions) {
        self.timer = None;
        if matches!(self.state, State::Idle { .. }) && !self.ending {
            self.dial(now, actions);
        }
    }

    pub(super) fn on_register_deadline(
        &mut self,
        now: Instant,
        rng: &mut Rng,
        actions: &mut Actions,
    ) {
        self.timer = None;
        if let State::Registering { conn, .. } = self.state {
            let secs = self.register_timeout.as_secs_f64();
            self.hang_up(
                conn,
                format!("no welcome within {secs}s"),
                now,
                rng,
                actions,
            );
        }
    }

    /// The registry connection closed, whoever closed it.
    pub(super) fn on_closed(
        &mut self,
        reason: String,
        now: Instant,
        rng: &mut Rng,
        actions: &mut Actions,
    ) {
        self.lost(reason, now, rng, actions);
    }

    /// The peer quits. Online, we stay listed until [`Session::leave`]: a
    /// peer checks our hello against its directory, so leaving first would
    /// cost the messages still on their way. A registration not yet done is
    /// dropped.
    pub(super) fn quit(&mut self, actions: &mut Actions) {
        self.ending = true;
        if !self.is_online() {
            self.close(actions);
        }
    }

    /// The last of the session: tell the registry we leave, if registered.
    pub(super) fn leave(&mut self, actions: &mut Actions) {
        if let State::Online { conn, .. } = self.state {
            actions.send(conn, protocol::frame(&ToRegistry::Leave {}));
        }
        self.close(actions);
    }

    fn close(&mut self, actions: &mut Actions) {
        if let Some(conn) = self.conn() {
            actions.close(conn, "quit");
        }
        self.state = State::Closed;
        actions.cancel(self.timer.take());
    }

    /// Over for good: the registry refused or replaced us, or proved a key
    /// we do not trust.
    fn end(&mut self, actions: &mut Actions) {
        actions.reversal = Reversal::Off;
        self.state = State::Closed;
        self.ending = true;
        actions.cancel(self.timer.take());
    }

    fn hang_up(
        &mut self,
        conn: LinkId,
        reason: String,
        now: Instant,
        rng: &mut Rng,
        actions: &mut Actions,
    ) -> Heard {
        actions.close(conn, reason.clone());
        self.lost(reason, now, rng, actions);
        Heard::Nothing
    }

    /// The registry connection failed, went quiet or was closed: say so and
    /// retry after a capped, jittered, doubling delay. The connection is
    /// closed already.
    fn lost(&mut self, error: String, now: Instant, rng: &mut Rng, actions: &mut Actions) {
        actions.reversal = Reversal::Off;
        if self.ending {
            self.state = State::Closed;
            actions.cancel(self.timer.take());
            return;
        }
        // The next registry of the cluster may serve us while this one
        // cannot (it died, or lost its cluster).
        if let Some(at) = self.registries.iter().position(|r| *r == self.registry) {
            self.registry = self.registries[(at + 1) % self.registries.len()];
        }
        let delay = rng.jitter(self.backoff);
        self.state = State::Idle {
            lost: Some((error.clone(), now + delay)),
        };
        self.backoff = (self.backoff * 2).min(self.backoff_max);
        tracing::info!(%error, retry_in = ?delay, "registry lost");
        self.first_attempt_over = true;
        actions.emit(Event::RegistryLost {
            error,
            retry_in_ms: u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
        });
        self.set_timer(now + delay, Timer::RegistryRetry, actions);
    }

    /// The answer to `/status`.
    pub(super) fn status(&self, now: Instant, peers: usize) -> Event {
        let (registry, lost) = match &self.state {
            State::Online { .. } => ("registered", None),
            State::Idle { lost } if self.ever_registered => ("lost", lost.clone()),
            State::Idle { lost } => ("unreachable", lost.clone()),
            _ => ("connecting", None),
        };
        let (error, retry_at) = lost.unzip();
        let retry_in_ms = retry_at.map(|at| {
            u64::try_from(at.saturating_duration_since(now).as_millis()).unwrap_or(u64::MAX)
        });
        Event::Status {
            registry: registry.into(),
            error,
            retry_in_ms,
            peers,
        }
    }

    #[cfg(test)]
    pub(super) fn is_registering(&self) -> bool {
        matches!(self.state, State::Registering { .. })
    }

    /// The heartbeat interval and the silence timeout, as last welcomed.
    #[cfg(test)]
    pub(super) fn timings(&self) -> (Duration, Duration) {
        (self.heartbeat, self.timeout)
    }
}
