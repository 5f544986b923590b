//! Registration: a secured connection's first frame (`register`, or the
//! start of a relay connection), names and their owners, a key reclaiming
//! its name from a new session, and a newcomer's welcome and snapshot.
//!
//! Separate from `lib.rs`, which keeps the connection lifecycle and the
//! pushing of changes: this is where a connection becomes a session.

use std::fmt::Debug;
use std::hash::Hash;
use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use peerchat_core::identity::PublicKey;
use peerchat_core::protocol::{
    self, decode_first, fold_name, normalize_name, Change, ErrorCode, FirstFrameError,
    FromRegistry, ToRegistry, PROTOCOL_VERSION,
};

use crate::cluster::Claim;
use crate::owners::Reservation;
use crate::{
    millis, reversal, Action, Answers, LinkState, Listed, Registry, Session, Timer, PART_ENTRIES,
};

/// A registration about to be admitted: its name as registered and
/// folded, where others dial it (`addr`), what it said it answers, and
/// its key.
pub(crate) struct Newcomer {
    pub name: String,
    pub folded: String,
    pub addr: SocketAddr,
    pub answers: Answers,
    pub key: PublicKey,
}

impl<C: Copy + Eq + Hash + Debug> Registry<C> {
    pub(crate) fn on_register_frame(
        &mut self,
        conn: C,
        ip: IpAddr,
        key: PublicKey,
        body: &[u8],
        now: Instant,
    ) {
        let (name, port, answers) = match decode_first(body, ToRegistry::version) {
            Ok(ToRegistry::Register {
                name,
                port,
                relay,
                dial_back,
                ..
            }) => (name, port, Answers { relay, dial_back }),
            Ok(ToRegistry::RelayOpen { from, to, .. }) => {
                self.conns.remove(&conn);
                return self.relay_open(conn, key, &from, &to, now);
            }
            Ok(ToRegistry::RelayJoin { id, .. }) => {
                self.conns.remove(&conn);
                return self.relay_join(conn, key, id, now);
            }
            Ok(_) => {
                return self.reject(
                    conn,
                    ErrorCode::Protocol,
                    "the first message must be register, relay_open or relay_join".into(),
                )
            }
            Err(FirstFrameError::Version(v)) => {
                return self.reject(
                    conn,
                    ErrorCode::UnsupportedVersion,
                    format!("protocol version {v} is not supported; this registry speaks version {PROTOCOL_VERSION}"),
                )
            }
            Err(FirstFrameError::Malformed(e)) => {
                return self.reject(conn, ErrorCode::Protocol, format!("undecodable register message: {e}"))
            }
        };
        let name = match normalize_name(&name) {
            Ok(name) => name,
            Err(why) => return self.reject(conn, why.code(), why.to_string()),
        };
        let port = match u16::try_from(port) {
            Ok(p) if p != 0 => p,
            _ => {
                return self.reject(
                    conn,
                    ErrorCode::BadPort,
                    format!("port {port} is not a TCP port (1-65535)"),
                )
            }
        };
        let who = Newcomer {
            folded: fold_name(&name),
            name,
            addr: SocketAddr::new(ip.to_canonical(), port),
            answers,
            key,
        };
        let name = &who.name;
        if let Some(&holder) = self.names.get(&who.folded) {
            if self.session(holder).is_some_and(|s| s.key == key) {
                return self.reclaim(conn, holder, who, now);
            }
            return self.reject(
                conn,
                ErrorCode::NameTaken,
                format!("the name {name:?} is taken by a peer that is online"),
            );
        }
        if self.is_clustered() {
            return self.claim(conn, Claim::new(who), now);
        }
        // Expired reservations go at the end of the turn; until then their
        // deadline says they no longer count.
        let held_for_another = |r: &&Reservation| r.key != key && r.until > now;
        if let Some(r) = self.reserved.get(&who.folded).filter(held_for_another) {
            let secs = r.until.saturating_duration_since(now).as_secs() + 1;
            return self.reject(
                conn,
                ErrorCode::NameTaken,
                format!(
                    "the name {name:?} is kept for the key of the peer that had it, for another {secs}s"
                ),
            );
        }
        // A reservation that ran out this turn must not keep its look.
        self.expire_reservations(now);
        let held_itself = self.reserved.contains_key(&who.folded);
        let look = self.lookalikes.look(&who.folded);
        if self.lookalikes.taken_by_another(look, held_itself) {
            return self.reject(
                conn,
                ErrorCode::NameConfusable,
                format!(
                    "the name {name:?} looks like the name of a peer that is online or left recently; choose one that reads differently"
                ),
            );
        }
        if self.refused_as_full(conn) {
            return;
        }
        self.announce_join(&who.name, who.addr, key);
        // Only now: an owner turned away (a full registry) keeps its name.
        if self.reserved.remove(&who.folded).is_none() {
            self.lookalikes.hold(look);
        }
        self.admit(conn, who, now);
    }

    /// A new peer joins the directory: everyone hears it, and it counts.
    pub(crate) fn announce_join(&mut self, name: &str, addr: SocketAddr, key: PublicKey) {
        self.announce(Change::Joined {
            name: name.into(),
            addr: addr.to_string(),
            key,
        });
        self.stats.joins += 1;
        tracing::info!(%name, %addr, %key, "joined");
    }

    /// Refuses `conn` (`registry_full`) if the registry holds its most
    /// peers already; says whether it did.
    pub(crate) fn refused_as_full(&mut self, conn: C) -> bool {
        let full = self.names.len() >= self.config.max_peers;
        if full {
            let max = self.config.max_peers;
            self.reject(
                conn,
                ErrorCode::RegistryFull,
                format!("the registry holds its maximum of {max} peers"),
            );
        }
        full
    }

    /// The key that holds a name registered it again on a new connection
    /// (a restart, or a reconnect while the old connection is half-open):
    /// the new session takes over at once, without a leave, and the others
    /// hear of it only if the address or the name's spelling changed. The
    /// old session is told it was replaced, in case it is still alive.
    pub(crate) fn reclaim(&mut self, conn: C, old: C, who: Newcomer, now: Instant) {
        let Some(LinkState::Registered(previous)) = self.conns.remove(&old) else {
            return;
        };
        self.unlist(previous.order);
        self.names.remove(&previous.folded);
        let (name, addr) = (&who.name, who.addr);
        let notice = FromRegistry::error(
            ErrorCode::Replaced,
            format!("a newer session of this key registered {name:?} from {addr}"),
        );
        self.actions
            .push_back(Action::Send(old, protocol::frame(&notice)));
        self.actions
            .push_back(Action::Close(old, "replaced by a new session".into()));
        // A new spelling of the name is news too: views apply it by the
        // folded name and then show the new one.
        if previous.addr != addr || previous.name != *name {
            self.announce(Change::Moved {
                name: name.clone(),
                addr: addr.to_string(),
                reachable: None,
            });
        }
        tracing::info!(%name, %addr, old_addr = %previous.addr, "reclaimed its name");
        let who = Newcomer {
            folded: previous.folded,
            key: previous.key,
            ..who
        };
        self.admit(conn, who, now);
    }

    /// The newcomer becomes a session: it gets its welcome and a place in
    /// the registration order.
    pub(crate) fn admit(&mut self, conn: C, who: Newcomer, now: Instant) {
        let Newcomer {
            name,
            folded,
            addr,
            answers,
            key,
        } = who;
        self.owners_changed = true;
        let welcome = |more| FromRegistry::Welcome {
            version: PROTOCOL_VERSION,
            name: name.clone(),
            addr: addr.to_string(),
            heartbeat_ms: millis(self.config.heartbeat),
            timeout_ms: millis(self.config.timeout),
            probes: self.probes.enabled(),
            more,
            peers: Vec::new(),
        };
        let frames = if self.order.len() as u64 <= PART_ENTRIES {
            vec![protocol::frame_with_items(
                &welcome(false),
                &self.encoded_entries(..),
            )]
        } else {
            // The parts are shared: only the welcome's head and the closing
            // empty part are this newcomer's own.
            let mut frames = vec![protocol::frame(&welcome(true))];
            frames.extend(self.snapshot_parts());
            frames.push(protocol::frame(&FromRegistry::Snapshot {
                more: false,
                peers: Vec::new(),
            }));
            frames
        };
        self.actions
            .push_back(Action::SetMaxFrame(conn, self.config.max_frame));
        self.actions
            .extend(frames.into_iter().map(|frame| Action::Send(conn, frame)));
        let order = self.next_order;
        self.next_order += 1;
        self.order.insert(order, Listed::Local(conn));
        self.parts.remove(&(order / PART_ENTRIES));
        self.names.insert(folded.clone(), conn);
        self.conns.insert(
            conn,
            LinkState::Registered(Box::new(Session {
                name,
                folded,
                addr,
                key,
                last_seen: now,
                order,
                answers,
                reachable: None,
                reversals: reversal::Budget::new(now),
                seen: self.log.end(),
                answer_held: false,
            })),
        );
        self.want_probe(conn);
        self.timers
            .arm(now + self.config.timeout, Timer::Liveness(conn));
        self.cluster_assert(conn);
    }
}
