//! The peer's logic as a sans-IO state machine: the registry session (with
//! reconnects), the directory of who is online, the direct links, and the
//! outbox that turns every sent message into exactly one `delivered` or
//! `undelivered` per target.
//!
//! Every connection arrives with the static key its Noise handshake proved.
//! The registry's key must match the one pinned for it; a link's key must
//! match the key the directory lists for the peer's name, and the key
//! pinned for that name in `known_peers` (trust on first use), or the link
//! is refused.
//!
//! [`Peer`] keeps core's machine contract
//! ([`Machine`](peerchat_core::machine::Machine)): inputs are
//! commands, link events and its own timers, each with `now`; outputs are
//! [`Action`]s, with [`HostOutput`]s for the binary. Nothing here touches a
//! socket, a terminal or the clock, so tests run it with simulated time.
//!
//! [`Peer`] is a facade over four rooms, each owning its state: the
//! `session` with the registry, the `directory`, the `outbox` of our
//! links and the `inbox` of links to us. The facade routes each input to
//! the room that owns the connection or timer, and coordinates the rooms
//! where one's news is another's business (a peer leaving the directory
//! settles its messages and closes its links).

mod actions;
mod commands;
mod dial_backs;
mod dialing;
mod directory;
mod event;
mod inbox;
mod machine;
mod outbox;
mod relays;
mod session;
mod transfers;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use peerchat_core::identity::PublicKey;
use peerchat_core::machine::{LinkId, Output};
use peerchat_core::protocol::{self, fold_name, normalize_name, Change, LinkMsg, PeerEntry};

use crate::disk::{DiskOp, DiskReply};
use crate::journal::{Party, Query, Record, Saved};
use crate::trust;
use actions::{Actions, Held, Latest, Reversal, Rng, TimerKey};
use dial_backs::DialBacks;
use directory::Directory;
use event::{Code, Reason};
pub use event::{Direction, Event, Waiting};
use inbox::Inbox;
use outbox::Outbox;
use relays::Relays;
use session::{Heard, Session};
pub use transfers::FilesConfig;
use transfers::Transfers;

/// By the folded name of a peer: looked up several times for every
/// recipient of every message (the outbox's and the file links, the
/// pinned keys), so hashed with foldhash (seeded per process, hashbrown's
/// default) rather than std's slower SipHash.
type ByName<V> = foldhash::HashMap<String, V>;

#[derive(Debug, Clone)]
pub struct Config {
    /// The name to register as; the registry's welcome may spell it
    /// otherwise (see [`Peer::name`]).
    pub name: String,
    pub registry: SocketAddr,
    /// The other registries of its cluster: after losing one registry,
    /// the peer tries the next, in turn (keeping its name: a cluster's
    /// registries share the names).
    pub fallbacks: Vec<SocketAddr>,
    /// The port this peer accepts links on, declared to the registry.
    pub listen_port: u16,
    /// Reconnect delays start here and double up to `backoff_max`.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// How long `/quit` waits for outstanding acks.
    pub quit_grace: Duration,
    /// Time a registry connection has to produce a welcome.
    pub register_timeout: Duration,
    /// Time an accepted link has to say hello and be found in the directory.
    pub hello_timeout: Duration,
    /// After re-registering, how long a peer the new snapshot lacks is kept
    /// (it is probably re-registering too) before it counts as gone.
    pub stale_grace: Duration,
    /// A message still unacknowledged this long after it was sent is
    /// given up as `expired`.
    pub outbox_ttl: Duration,
    /// What the outbox holds at most, per target and in all.
    pub outbox_limits: OutboxLimits,
    /// A store keeps what the peer records: what it sends waits for the
    /// host to say each batch is written ([`Peer::committed`]), the host
    /// shows events only after their turn's batch, and what is
    /// unacknowledged at exit is kept for the next run. Without one,
    /// nothing is recorded and it is reported undelivered at exit.
    pub persistent: bool,
    /// Our own static key (the public half).
    pub key: PublicKey,
    /// The registry as named on the command line: the subject of its pin.
    pub registry_name: String,
    /// Where pins are kept, as shown in hints on what to change.
    pub known_peers: String,
    pub files: FilesConfig,
}

impl Config {
    pub fn new(name: String, registry: SocketAddr, listen_port: u16, key: PublicKey) -> Self {
        Config {
            key,
            registry_name: registry.to_string(),
            known_peers: "known_peers".into(),
            name,
            registry,
            fallbacks: Vec::new(),
            listen_port,
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            quit_grace: Duration::from_secs(2),
            register_timeout: Duration::from_secs(5),
            hello_timeout: Duration::from_secs(5),
            stale_grace: Duration::from_secs(15),
            outbox_ttl: Duration::from_secs(7 * 24 * 3600),
            outbox_limits: OutboxLimits::default(),
            persistent: false,
            files: FilesConfig::default(),
        }
    }
}

/// The most the outbox holds: messages and bytes of text, waiting for one
/// target and for all of them together. A message beyond them is refused
/// (`outbox_full`); nothing already queued is dropped to make room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutboxLimits {
    pub per_target: usize,
    pub per_target_bytes: usize,
    pub total: usize,
    pub total_bytes: usize,
}

impl Default for OutboxLimits {
    fn default() -> Self {
        OutboxLimits {
            per_target: 10_000,
            per_target_bytes: 64 << 20,
            total: 100_000,
            total_bytes: 256 << 20,
        }
    }
}

/// The keys trusted at start, from `known_peers` and the command line. The
/// peer adds to them as keys are first proved, and says so with
/// [`HostOutput::Pin`].
#[derive(Debug, Clone, Default)]
pub struct Trust {
    /// What the registry's key is checked against.
    pub registry: RegistryTrust,
    /// Keys pinned per peer (folded name).
    pub peers: HashMap<String, PublicKey>,
}

/// Where the registry's expected key comes from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum RegistryTrust {
    /// Nothing known: the first key proved is pinned.
    #[default]
    FirstUse,
    /// Given on the command line but not in `known_peers` yet: required, and
    /// pinned once the registry proves it.
    Given(PublicKey),
    /// Already in `known_peers`: required.
    Pinned(PublicKey),
}

/// What only the binary around the peer can do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostOutput {
    /// Show this to the user. With a store, events and [`HostOutput::Record`]s
    /// are one stream: an event is about the records before it, which are
    /// written once it is shown (a crash in between shows it again, never
    /// loses it).
    Show(Event),
    /// Remember this key for good (append it to `known_peers`).
    Pin(Pin),
    /// Flush and end the process with this status.
    Exit(i32),
    /// Write this, in order with the events around it (see
    /// [`HostOutput::Show`]).
    Record(Record),
    /// The records of a turn end here: once they are written and the
    /// events before this shown, call [`Peer::committed`] with this number.
    /// Batches come numbered in order, one for each turn that records.
    Batch(u64),
    /// Ask the history; show the answer as the event this query is for.
    Query(Query),
    /// Read, hash or write a file; answer with [`Peer::disk`].
    Disk(DiskOp),
}

/// What the peer wants done, on links it names by [`LinkId`].
pub type Action = Output<LinkId, HostOutput>;

/// A key seen for the first time, to be trusted from now on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pin {
    Peer { name: String, key: PublicKey },
    Registry(PublicKey),
}

/// What the peer waits for. Each room cancels its timers once they no
/// longer apply, so a timer that fires is always current.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Timer {
    RegistryRetry,
    RegisterDeadline,
    Heartbeat,
    LinkRetry(String),
    HelloDeadline(LinkId),
    /// The oldest unacknowledged message to this target (folded) is due.
    SendDeadline(String),
    StaleCheck,
    QuitDeadline,
    /// Our file link to this target (folded) is dialed again.
    FileRetry(String),
    /// The transfer of this number has made no progress for the offer's
    /// lifetime.
    FileDeadline(u64),
    /// This relay connection to us must be up by now.
    RelayJoinDeadline(LinkId),
    /// This connection, dialing back a peer that asked, must be up by now.
    DialBackDeadline(LinkId),
    /// Our relayed link's own session must be up by now (a link that is
    /// up, or gone, lets it pass).
    TunnelDeadline(LinkId),
}

/// Milliseconds since the Unix epoch; 0 for a clock set before it.
fn unix_ms(wall: SystemTime) -> u64 {
    wall.duration_since(UNIX_EPOCH)
        .ok()
        .and_then(|d| u64::try_from(d.as_millis()).ok())
        .unwrap_or(0)
}

pub struct Peer {
    session: Session,
    directory: Directory,
    outbox: Outbox,
    inbox: Inbox,
    transfers: Transfers,
    relays: Relays,
    dial_backs: DialBacks,
    actions: Actions,
    rng: Rng,
    /// Said in our hello, so that a peer tells our restart from a resend.
    instance: u64,
    /// Our own static key (the public half).
    key: PublicKey,
    quit_grace: Duration,
    quit_deadline: Option<TimerKey>,
    exited: bool,
}

impl Peer {
    /// A peer that carries on from `saved` (the store as the last run left
    /// it; `Saved::default()` without one). `seed` drives the reconnect
    /// jitter, and the instance id when `saved` has none. `now` and `wall`
    /// are the same moment on both clocks. Nothing happens before
    /// [`Peer::start`].
    pub fn new(
        config: Config,
        trust: Trust,
        saved: Saved,
        seed: u64,
        now: Instant,
        wall: SystemTime,
    ) -> Self {
        let mut rng = Rng::new(seed);
        let instance = match saved.instance {
            0 => rng.next(),
            kept => kept,
        };
        Peer {
            session: Session::new(&config, trust.registry),
            directory: Directory::new(&config, trust.peers),
            outbox: Outbox::new(&config, saved.outbox, saved.next_id, now, unix_ms(wall)),
            inbox: Inbox::new(&config, saved.seen),
            transfers: Transfers::new(
                config.files.clone(),
                saved.transfers,
                config.backoff_min,
                config.backoff_max,
            ),
            relays: Relays::default(),
            dial_backs: DialBacks::default(),
            actions: Actions::new(config.persistent, now, wall, config.registry),
            rng,
            instance,
            key: config.key,
            quit_grace: config.quit_grace,
            quit_deadline: None,
            exited: false,
        }
    }

    /// Messages from earlier runs (and this one) waiting for a target.
    pub fn outbox_len(&self) -> usize {
        self.outbox.waiting()
    }

    /// The directory, sorted by name.
    pub fn peers(&self) -> Vec<PeerEntry> {
        self.directory.peers()
    }

    /// Our name as the registry accepted it (trimmed).
    pub fn name(&self) -> &str {
        self.session.name()
    }

    pub fn is_online(&self) -> bool {
        self.session.is_online()
    }

    /// Whether the user's lines should be taken now. Lines wait for the
    /// first registration attempt to end (a welcome, or the registry found
    /// missing), so that a script's first line reaches the peers already
    /// online instead of an empty directory.
    pub fn takes_input(&self) -> bool {
        self.session.first_attempt_over() || self.quitting()
    }

    /// The session ends only when the peer does.
    fn quitting(&self) -> bool {
        self.session.is_ending()
    }

    /// Begins: connect to the registry; what the store left waits for
    /// its targets.
    pub fn start(&mut self, now: Instant) {
        self.actions.now = now;
        self.outbox.start(&mut self.actions);
        self.transfers.start(&mut self.actions);
        self.session.dial(now, &mut self.actions);
    }

    /// The host wrote every batch up to `batch`: what waited for them goes
    /// out, in order.
    pub fn committed(&mut self, batch: u64, now: Instant) {
        self.actions.now = now;
        self.actions.durable = self.actions.durable.max(batch);
        self.release();
    }

    /// Acts on what waited for batches now written.
    fn release(&mut self) {
        while let Some(held) = self.actions.ready() {
            match held {
                Held::Output(action) => self.actions.push(action),
                Held::Ack(link, id) => self
                    .actions
                    .send(link, protocol::frame(&LinkMsg::Ack { id })),
                Held::Release(id) => self.outbox.release(id, &mut self.actions),
            }
        }
    }

    /// The turn is over: its records become a batch.
    fn finish_turn(&mut self) {
        self.actions.seal();
        self.release();
    }

    fn on_heard(&mut self, heard: Heard, now: Instant) {
        match heard {
            Heard::Nothing => {}
            Heard::Registered(snapshot) => self.registered(&snapshot, now),
            Heard::Changes(changes) => {
                for change in changes {
                    self.apply_change(change);
                }
            }
            Heard::Ended(code) => self.exit(2, &Reason::Code(code)),
            Heard::RelayInvite { id, from } => {
                if self.quitting() {
                    return;
                }
                self.relays.invited(id, from, now, &mut self.actions);
            }
            Heard::DialBack { from } => {
                if self.quitting() {
                    return;
                }
                self.dial_backs
                    .asked(&from, &self.directory, now, &mut self.actions);
            }
            Heard::ReverseFailed { to, code, reason } => {
                tracing::info!(peer = %to, %code, %reason, "the registry did not ask the peer to dial us back");
                let folded = fold_name(to.trim());
                // Waiting links try the relay at once.
                let (dir, actions) = (&self.directory, &mut self.actions);
                if self
                    .outbox
                    .targets()
                    .reversal_failed(&folded, &code, actions)
                {
                    self.outbox.ensure_link(&folded, dir, actions);
                }
                if self
                    .transfers
                    .targets()
                    .reversal_failed(&folded, &code, actions)
                {
                    self.transfers.ensure_link(&folded, dir, actions);
                }
            }
        }
    }

    /// The whole welcome came: the directory takes the snapshot, and links
    /// held for the peers it lists are admitted.
    fn registered(&mut self, snapshot: &[PeerEntry], now: Instant) {
        let mut listed = HashSet::new();
        for entry in snapshot {
            if !is_valid_name(&entry.name) {
                tracing::warn!(name = ?entry.name, "the registry listed an invalid name; ignored");
                continue;
            }
            let folded = fold_name(&entry.name);
            if self.directory.is_me(&folded) {
                continue;
            }
            if let Ok(addr) = entry.addr.parse() {
                self.learn(
                    folded.clone(),
                    entry.name.clone(),
                    addr,
                    entry.key,
                    entry.reachable,
                );
                listed.insert(folded);
            }
        }
        self.directory.mark_missing(&listed, now, &mut self.actions);
        let (name, addr) = (self.session.name(), self.session.addr());
        tracing::info!(%name, %addr, peers = snapshot.len(), "registered");
        // The directory, not just the snapshot: peers kept through a
        // registry restart are still reachable and still listed by /peers.
        self.actions.emit(Event::Registered {
            name: name.to_string(),
            addr: addr.to_string(),
            key: self.key,
            peers: self.directory.peers(),
        });
        let waiting = self.inbox.waiting();
        for folded in listed.intersection(&waiting) {
            self.inbox
                .admit(folded, &mut self.directory, &mut self.actions);
        }
        self.session.start_heartbeats(now, &mut self.actions);
    }

    fn apply_change(&mut self, change: Change) {
        match change {
            Change::Joined { name, addr, key } => self.listed(name, addr, Some(key), None),
            // A move keeps the key.
            Change::Moved {
                name,
                addr,
                reachable,
            } => self.listed(name, addr, None, reachable),
            Change::Left { name, reason } => {
                let folded = fold_name(&name);
                if self.directory.contains(&folded) {
                    let reason = Reason::Left(reason);
                    self.actions.emit(Event::Left {
                        name,
                        reason: reason.to_string(),
                    });
                    self.forget(&folded, &reason);
                }
            }
        }
    }

    /// The registry lists `name` at `addr`, under `key` (or the key we
    /// already have for it, for a move), reachable there or not if it
    /// says.
    fn listed(
        &mut self,
        name: String,
        addr: String,
        key: Option<PublicKey>,
        reachable: Option<bool>,
    ) {
        if !is_valid_name(&name) {
            tracing::warn!(?name, "the registry sent an invalid name; ignored");
            return;
        }
        let folded = fold_name(&name);
        if self.directory.is_me(&folded) {
            // Our own probe: whether others can dial us.
            if let Some(reachable) = reachable {
                self.now_reachable(reachable);
                self.actions.emit(Event::Reachable {
                    name,
                    reachable,
                    you: true,
                });
            }
            return;
        }
        let Ok(parsed) = addr.parse() else {
            tracing::warn!(%name, %addr, "the registry sent an unusable address");
            return;
        };
        // A move of a peer we do not list tells us nothing we could check a
        // link against.
        let Some(key) = key.or_else(|| self.directory.get(&folded).map(|k| k.key)) else {
            tracing::warn!(%name, "the registry moved a peer it never listed");
            return;
        };
        // A peer we still list (kept across a registry restart) never left
        // as far as the user knows: say nothing unless its address or the
        // spelling of its name changed.
        let known = self.directory.contains(&folded);
        let (moved, reachability) =
            self.learn(folded.clone(), name.clone(), parsed, key, reachable);
        if !known {
            self.actions.emit(Event::Joined {
                name: name.clone(),
                addr: addr.clone(),
                key,
            });
        } else if moved {
            self.actions.emit(Event::Moved {
                name: name.clone(),
                addr,
            });
        }
        if let Some(reachable) = reachability {
            self.actions.emit(Event::Reachable {
                name,
                reachable,
                you: false,
            });
        }
        // After the event: chats held from this peer follow its join.
        self.inbox
            .admit(&folded, &mut self.directory, &mut self.actions);
    }

    /// The registry found whether others can dial us. Once they can, our
    /// relayed links try again, since a peer we cannot dial may now dial
    /// us back (4.8) and keep the registry off the path.
    fn now_reachable(&mut self, reachable: bool) {
        let via = |r: Reversal| matches!(r, Reversal::Via(_));
        let was = via(self.actions.reversal);
        self.session.set_reachable(reachable, &mut self.actions);
        let (dir, actions) = (&self.directory, &mut self.actions);
        for folded in self.outbox.targets().probe_answered(actions) {
            self.outbox.ensure_link(&folded, dir, actions);
        }
        for folded in self.transfers.targets().probe_answered(actions) {
            self.transfers.ensure_link(&folded, dir, actions);
        }
        if was || !via(actions.reversal) {
            return;
        }
        for folded in self.outbox.targets().relayed() {
            self.outbox.redial(&folded, dir, actions);
        }
        for folded in self.transfers.targets().relayed() {
            self.transfers.redial(&folded, dir, actions);
        }
    }

    /// Adds or refreshes a directory entry, and carries what changed over to
    /// the links. Says whether the user should hear of a move (a new
    /// address or spelling), and what the registry newly found of the
    /// peer's reachability.
    fn learn(
        &mut self,
        folded: String,
        name: String,
        addr: SocketAddr,
        key: PublicKey,
        reachable: Option<bool>,
    ) -> (bool, Option<bool>) {
        let learned = self
            .directory
            .learn(&folded, name, addr, key, reachable, &mut self.actions);
        if let Some(reason) = &learned.give_up {
            self.outbox.fail_queued(&folded, reason, &mut self.actions);
        }
        if learned.rekeyed {
            self.inbox.forget_sender(&folded, &mut self.actions);
        }
        if learned.redial {
            self.outbox
                .redial(&folded, &self.directory, &mut self.actions);
            self.transfers
                .redial(&folded, &self.directory, &mut self.actions);
        } else if learned.reachable_now {
            self.outbox
                .go_direct(&folded, &self.directory, &mut self.actions);
            self.transfers
                .go_direct(&folded, &self.directory, &mut self.actions);
        }
        self.outbox
            .on_listed(&folded, key, &self.directory, &mut self.actions);
        self.transfers
            .on_listed(&folded, key, &self.directory, &mut self.actions);
        self.maybe_finish_quit();
        (learned.moved, learned.reachability)
    }

    /// A peer is gone: what waits for it is kept until it is back, and
    /// its links close.
    fn forget(&mut self, folded: &str, reason: &Reason) {
        let Some(known) = self.directory.remove(folded) else {
            return;
        };
        self.outbox.away(folded, reason, &mut self.actions);
        self.transfers.away(folded, &mut self.actions);
        let why = format!("{} left", known.name);
        self.inbox.close_from(folded, &why, &mut self.actions);
        self.maybe_finish_quit();
    }

    /// The disk answered a [`HostOutput::Disk`].
    pub fn disk(&mut self, reply: DiskReply, now: Instant) {
        self.actions.now = now;
        self.transfers
            .disk(reply, &self.directory, &mut self.actions);
    }

    /// Waits (at most `quit_grace`) for outstanding acks, still listed,
    /// reports the rest undelivered, then leaves the registry and exits.
    pub fn quit(&mut self, now: Instant) {
        if self.quitting() {
            return;
        }
        self.session.quit(&mut self.actions);
        let deadline = self.actions.arm(now + self.quit_grace, Timer::QuitDeadline);
        self.quit_deadline = Some(deadline);
        self.maybe_finish_quit();
    }

    fn maybe_finish_quit(&mut self) {
        if self.quitting() && self.outbox.is_settled(&self.directory) {
            self.finish_quit();
        }
    }

    fn finish_quit(&mut self) {
        self.actions.cancel(self.quit_deadline.take());
        self.session.leave(&mut self.actions);
        self.exit(0, &Reason::Quit);
    }

    /// Keeps what is still unacknowledged for the next run (without a
    /// store: reports it undelivered for `reason`), then exits with
    /// `status`, once the last records are written; only the first call
    /// does anything.
    fn exit(&mut self, status: i32, reason: &Reason) {
        if std::mem::replace(&mut self.exited, true) {
            return;
        }
        self.outbox.exit(reason, &self.directory, &mut self.actions);
        self.transfers.exit(&mut self.actions);
        let exit = Output::Host(HostOutput::Exit(status));
        self.actions.hold(Held::Output(exit));
    }

    fn fire(&mut self, timer: Timer, now: Instant) {
        let (rng, actions) = (&mut self.rng, &mut self.actions);
        match timer {
            Timer::RegistryRetry => self.session.on_retry(now, actions),
            Timer::RegisterDeadline => self.session.on_register_deadline(now, rng, actions),
            Timer::Heartbeat => self.session.on_heartbeat(now, rng, actions),
            Timer::LinkRetry(target) => self.outbox.on_retry(&target, &self.directory, actions),
            Timer::HelloDeadline(link) => self.inbox.on_hello_deadline(link, actions),
            Timer::SendDeadline(target) => {
                self.outbox.on_deadline(&target, now, actions);
                self.maybe_finish_quit();
            }
            Timer::StaleCheck => {
                for folded in self.directory.expired(now) {
                    let name = self.directory.display_name(&folded);
                    self.actions.emit(Event::Left {
                        name,
                        reason: Reason::Gone.to_string(),
                    });
                    self.forget(&folded, &Reason::Gone);
                }
            }
            Timer::QuitDeadline => {
                self.quit_deadline = None;
                self.finish_quit();
            }
            Timer::FileRetry(target) => self.transfers.on_retry(&target, &self.directory, actions),
            Timer::FileDeadline(number) => self.transfers.on_deadline(number, actions),
            Timer::RelayJoinDeadline(link) => self.relays.on_deadline(link, actions),
            Timer::DialBackDeadline(link) => self.dial_backs.on_deadline(link, actions),
            Timer::TunnelDeadline(link) => {
                let dialing = machine::our_dialing(&mut self.outbox, &mut self.transfers, link);
                if dialing.is_some_and(|(_, d)| d.up().is_none()) {
                    tracing::info!(%link, "the relayed session did not come up in time");
                    actions.close(link, "the relayed session did not come up in time");
                }
            }
        }
    }
}

/// A name as the registry must send it: already trimmed and within the
/// rules. Anything else (spaces, control characters) never reaches the
/// user's screen or `known_peers`.
fn is_valid_name(name: &str) -> bool {
    normalize_name(name).is_ok_and(|n| n == name)
}

/// A pin as its line in `known_peers` reads, for hints on what to delete.
fn pin_text(kind: &str, subject: &str, key: &PublicKey) -> String {
    trust::pin_line(kind, subject, key)
        .map(|line| line.trim_end().to_string())
        .unwrap_or_else(|| format!("{kind} {subject} {key}"))
}

#[cfg(test)]
mod tests;
