//! The full-screen terminal UI's model: conversations, the people online,
//! the registry's state, delivery marks and the input line. It is plain
//! state, fed the peer's events ([`Update`]) and the user's keys, and
//! drawn by [`render::draw`]; the binary owns the terminal and the thread
//! it runs on, so that everything here is tested without one.

mod convo;
mod editor;
mod keys;
pub mod render;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use peerchat_core::identity::PublicKey;
use peerchat_core::names::fold_name;

use crate::human::Local;
use crate::journal::Entry;
use crate::peer::{Direction, Event};
use convo::{Conv, Kind, Line, Message, MessageKey};
use editor::Editor;
pub use editor::HISTORY_KEPT;

/// Messages of a conversation asked of the store when it opens: more than
/// a screenful, so that scrolling up finds some.
pub const BACKLOG: usize = 200;

/// What the UI is told by the loop.
#[derive(Debug, Clone)]
pub enum Update {
    Event(Event),
    /// A message of ours, once the peer gave it an id (its `sent`): to
    /// `to`, or to everyone; `targets` are who it went to.
    Own {
        id: u64,
        text: String,
        to: Option<String>,
        targets: Vec<String>,
    },
    /// A key was pinned for a name in `known_peers`.
    Pinned {
        name: String,
        key: PublicKey,
    },
    /// A line of our own (such as what waits from an earlier run).
    Note(String),
}

/// What the UI asks of its host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// A line for the peer, as `--plain` would read it.
    Send(String),
    /// A line the user typed, for the input history kept in the store.
    Remember(String),
    /// Ctrl-C on an empty line: leave now.
    Quit,
    /// Ctrl-Z: stop the process, the terminal restored.
    Suspend,
    /// Ctrl-L: draw the whole screen again.
    Redraw,
}

/// Commands Tab completes, and `/help` lists, in this order.
pub const COMMANDS: &[(&str, &str)] = &[
    (
        "/msg",
        "/msg NAME TEXT: send to NAME alone, in NAME's conversation",
    ),
    ("/me", "/me TEXT: an action (\"* you TEXT\")"),
    (
        "/query",
        "/query NAME: open (or go to) the conversation with NAME",
    ),
    ("/close", "/close: close this conversation"),
    ("/peers", "/peers: who is online"),
    (
        "/whois",
        "/whois NAME: NAME's key fingerprint and whether it is pinned",
    ),
    ("/status", "/status: the registry connection"),
    (
        "/history",
        "/history [NAME] [N]: load the last N messages (of this conversation)",
    ),
    ("/search", "/search TEXT: messages that contain the words"),
    (
        "/outbox",
        "/outbox: your messages waiting for an acknowledgement",
    ),
    (
        "/info",
        "/info ID: where your message ID stands with each target",
    ),
    ("/send", "/send NAME PATH: offer a file to NAME"),
    (
        "/accept",
        "/accept N [DIR]: take the file offered as transfer N",
    ),
    (
        "/reject",
        "/reject N: refuse the file offered as transfer N",
    ),
    ("/cancel", "/cancel N: stop transfer N"),
    ("/clear", "/clear: empty this conversation's window"),
    ("/help", "/help: this list"),
    ("/quit", "/quit: leave (also Ctrl-C on an empty line)"),
];

const KEYS_HELP: &[&str] = &[
    "keys: Alt-1..9 or Ctrl-N/Ctrl-P switch conversations; PgUp/PgDn, the wheel, Home/End scroll",
    "keys: Tab completes; Up/Down recall; Ctrl-A/E/U/K/W/Y, Alt-B/F/D edit; Ctrl-L redraws; Ctrl-Z suspends",
    "names: + pinned key, * new (pinned at the first link), ! key differs from the pinned one",
    "marks: ✓ delivered to all, ✓ k/n to some, … on its way, queued (target away), ✗ failed (/info ID)",
];

/// Where one message of ours stands with each target.
#[derive(Debug, Clone, Default)]
pub struct Delivery {
    pub targets: Vec<String>,
    pub delivered: HashSet<String>,
    /// Target and reason.
    pub queued: BTreeMap<String, String>,
    pub failed: BTreeMap<String, String>,
}

/// The registry as the status bar shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Registry {
    Connecting,
    Connected,
    /// Not reachable now; `reached` if it was since start.
    Lost {
        error: String,
        retry_at: Instant,
        reached: bool,
    },
}

/// Someone the directory lists.
#[derive(Debug, Clone)]
pub struct Online {
    pub name: String,
    pub key: PublicKey,
    /// The registry could not dial it: links to it are relayed.
    pub unreachable: bool,
}

pub struct App {
    pub(crate) me: String,
    pub(crate) my_key: PublicKey,
    pub(crate) registry: Registry,
    /// By folded name.
    pub(crate) online: BTreeMap<String, Online>,
    /// `known_peers`: by folded name.
    pub(crate) pins: HashMap<String, PublicKey>,
    pub(crate) convs: Vec<Conv>,
    pub(crate) current: usize,
    pub(crate) editor: Editor,
    pub(crate) deliveries: HashMap<u64, Delivery>,
    /// Updates that wait for the store to confirm what they show (see
    /// [`App::shown`]), with their sequence number.
    held: VecDeque<(u64, Update)>,
    shown_through: u64,
    /// Something changed since the last frame.
    pub dirty: bool,
    /// A mention came: the terminal's bell rings once.
    pub bell: bool,
    /// The user typed `/history`: an answer with nothing new says so.
    history_typed: bool,
    /// The message pane's size at the last frame, for scrolling.
    pub(crate) pane: (usize, usize),
    /// Stamps in UTC, not local time (rendering tests).
    pub(crate) utc: bool,
    /// The peer keeps a store to ask history of.
    store: bool,
    /// Transfers under way, by number: the status bar shows how far.
    pub(crate) transfers: BTreeMap<u64, Transfer>,
}

/// A transfer as the status bar shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Transfer {
    pub(crate) incoming: bool,
    pub(crate) bytes: u64,
    pub(crate) size: u64,
    pub(crate) rate: u64,
}

impl App {
    pub fn new(
        me: &str,
        my_key: PublicKey,
        pins: HashMap<String, PublicKey>,
        typed: Vec<String>,
    ) -> App {
        App {
            me: me.to_string(),
            my_key,
            registry: Registry::Connecting,
            online: BTreeMap::new(),
            pins: pins.into_iter().map(|(n, k)| (fold_name(&n), k)).collect(),
            convs: vec![Conv::new(None)],
            current: 0,
            editor: Editor::with_history(typed),
            deliveries: HashMap::new(),
            held: VecDeque::new(),
            shown_through: 0,
            dirty: true,
            bell: false,
            history_typed: false,
            pane: (80, 20),
            utc: false,
            store: true,
            transfers: BTreeMap::new(),
        }
    }

    /// The status bar counts down to the registry's next attempt: it
    /// changes every second.
    pub fn counting_down(&self) -> bool {
        matches!(self.registry, Registry::Lost { .. })
    }

    /// Stamps lines in UTC (for tests that must not depend on the zone).
    pub fn use_utc(&mut self) {
        self.utc = true;
    }

    /// An update that is shown once [`App::shown`] reaches `seq`.
    pub fn hold(&mut self, seq: u64, update: Update, now: Instant, wall: SystemTime) {
        if seq <= self.shown_through {
            self.apply(update, now, wall);
        } else {
            self.held.push_back((seq, update));
        }
    }

    /// Everything up to `seq` is in the store: show it.
    pub fn shown(&mut self, seq: u64, now: Instant, wall: SystemTime) {
        self.shown_through = self.shown_through.max(seq);
        while self
            .held
            .front()
            .is_some_and(|(s, _)| *s <= self.shown_through)
        {
            if let Some((_, update)) = self.held.pop_front() {
                self.apply(update, now, wall);
            }
        }
    }

    pub fn apply(&mut self, update: Update, now: Instant, wall: SystemTime) {
        self.dirty = true;
        match update {
            Update::Event(event) => self.event(event, now, wall),
            Update::Own {
                id,
                text,
                to,
                targets,
            } => {
                let conv = match &to {
                    Some(name) => self.open(name),
                    None => 0,
                };
                self.deliveries.insert(
                    id,
                    Delivery {
                        targets,
                        ..Delivery::default()
                    },
                );
                let (text, action) = action(&text);
                let line = Line {
                    time: wall,
                    kind: Kind::Message(Message {
                        from: self.me.clone(),
                        key: Some(self.my_key),
                        text,
                        action,
                        mention: false,
                        own: Some(id),
                        dated: false,
                    }),
                    key: Some(MessageKey {
                        outgoing: true,
                        from: String::new(),
                        id,
                    }),
                };
                self.push(conv, line, false);
            }
            Update::Pinned { name, key } => {
                self.pins.insert(fold_name(&name), key);
            }
            Update::Note(text) => self.status(0, wall, text, false),
        }
    }

    fn event(&mut self, event: Event, now: Instant, wall: SystemTime) {
        match event {
            Event::Message {
                from,
                text,
                direct,
                id,
                sent_at,
            } => {
                let conv = if direct { self.open(&from) } else { 0 };
                let time = sent_at.map_or(wall, |ms| UNIX_EPOCH + Duration::from_millis(ms));
                let (text, action) = action(&text);
                let mention = mentions(&text, &self.me);
                let key = self.online.get(&fold_name(&from)).map(|o| o.key);
                let line = Line {
                    time,
                    kind: Kind::Message(Message {
                        from: from.clone(),
                        key,
                        text,
                        action,
                        mention,
                        own: None,
                        dated: false,
                    }),
                    key: Some(MessageKey {
                        outgoing: false,
                        from: fold_name(&from),
                        id,
                    }),
                };
                if self.push(conv, line, mention) && mention {
                    self.bell = true;
                }
            }
            Event::Registered { name, peers, .. } => {
                self.me = name;
                self.registry = Registry::Connected;
                self.online = peers
                    .into_iter()
                    .map(|p| {
                        let online = Online {
                            name: p.name,
                            key: p.key,
                            unreachable: p.reachable == Some(false),
                        };
                        (fold_name(&online.name), online)
                    })
                    .collect();
            }
            Event::RegistryLost { error, retry_in_ms } => {
                let reached = match &self.registry {
                    Registry::Connecting => false,
                    Registry::Connected => true,
                    Registry::Lost { reached, .. } => *reached,
                };
                self.registry = Registry::Lost {
                    error,
                    retry_at: now + Duration::from_millis(retry_in_ms),
                    reached,
                };
            }
            Event::Joined { name, key, .. } => {
                self.online.insert(
                    fold_name(&name),
                    Online {
                        name: name.clone(),
                        key,
                        unreachable: false,
                    },
                );
                self.presence(&name, wall, now, |p| p.joined.push(name.clone()));
            }
            Event::Left { name, reason } => {
                self.online.remove(&fold_name(&name));
                self.presence(&name, wall, now, |p| {
                    p.left.push((name.clone(), reason.clone()))
                });
            }
            Event::Moved { name, addr } => {
                self.presence(&name, wall, now, |p| {
                    p.moved.push((name.clone(), addr.clone()))
                });
            }
            Event::Reachable {
                name,
                reachable,
                you: false,
            } => {
                if let Some(online) = self.online.get_mut(&fold_name(&name)) {
                    online.unreachable = !reachable;
                }
            }
            Event::Sent { .. } => {}
            Event::Delivered { id, to } => {
                if let Some(d) = self.deliveries.get_mut(&id) {
                    d.queued.remove(&to);
                    d.delivered.insert(to);
                }
            }
            Event::Queued { id, to, reason } => {
                match self.deliveries.get_mut(&id) {
                    Some(d) => {
                        d.queued.insert(to, reason);
                    }
                    None if reason != "exit" => {
                        let text = format!("message {id} (from an earlier run) waits for {to}, who is away ({reason})");
                        self.status(0, wall, text, false);
                    }
                    None => {}
                }
            }
            Event::Undelivered { id, to, reason } => match self.deliveries.get_mut(&id) {
                Some(d) => {
                    d.queued.remove(&to);
                    d.failed.insert(to, reason);
                }
                None => {
                    let text = format!("message {id} to {to} was not confirmed ({reason}); it may or may not have arrived");
                    self.status(0, wall, text, true);
                }
            },
            Event::History { with, messages } => {
                let conv = match &with {
                    Some(name) => self.open(name),
                    None => 0,
                };
                self.backlog(conv, messages, wall);
            }
            Event::Search { text, messages } => {
                let current = self.current;
                let title = match messages.len() {
                    0 => format!("no messages with {text:?}"),
                    n => format!("messages with {text:?}, the last {n}:"),
                };
                self.status(current, wall, title, false);
                for entry in messages {
                    let line = self.entry_line(&entry);
                    // A listing, not the conversation: shown even if the
                    // message is on screen already.
                    let line = Line { key: None, ..line };
                    self.push(current, line, false);
                }
            }
            Event::FileProgress {
                transfer,
                direction,
                bytes,
                size,
                rate,
                ..
            } => {
                self.transfers.insert(
                    transfer,
                    Transfer {
                        incoming: direction == Direction::In,
                        bytes,
                        size,
                        rate,
                    },
                );
            }
            other => {
                if let Event::FileDone { transfer, .. } | Event::FileFailed { transfer, .. } =
                    &other
                {
                    self.transfers.remove(transfer);
                }
                if let Some((text, warn)) = status_text(&other) {
                    let current = self.current;
                    self.status(current, wall, text, warn);
                }
            }
        }
    }

    /// A line for a conversation; unread and mention marks when it is
    /// not the one shown. False if it was already there.
    fn push(&mut self, conv: usize, line: Line, mention: bool) -> bool {
        let is_message = matches!(line.kind, Kind::Message(_));
        // Keeps what the reader scrolled to where it is.
        let rows = match self.convs[conv].scroll {
            0 => 0,
            _ => render::rows_of(self, &line),
        };
        let utc = self.utc;
        let c = &mut self.convs[conv];
        if !c.push(line, |t| day_of(t, utc)) {
            return false;
        }
        c.scroll += rows;
        if conv != self.current && is_message {
            c.unread += 1;
            c.mentioned |= mention;
        }
        true
    }

    fn status(&mut self, conv: usize, wall: SystemTime, text: String, warn: bool) {
        self.push(conv, Line::new(wall, Kind::Status { text, warn }), false);
    }

    fn presence(
        &mut self,
        name: &str,
        wall: SystemTime,
        now: Instant,
        add: impl Fn(&mut convo::Presence),
    ) {
        let mut targets = vec![0];
        if let Some(i) = self.find(name) {
            targets.push(i);
        }
        let utc = self.utc;
        for i in targets {
            self.convs[i].presence(wall, now, |t| day_of(t, utc), &add);
        }
    }

    fn backlog(&mut self, conv: usize, entries: Vec<Entry>, wall: SystemTime) {
        let lines: Vec<Line> = entries.iter().map(|e| self.entry_line(e)).collect();
        for entry in &entries {
            if entry.outgoing && !self.deliveries.contains_key(&entry.id) {
                self.deliveries.insert(entry.id, delivery_of(entry));
            }
        }
        let utc = self.utc;
        let added = self.convs[conv].backlog(lines, |t| day_of(t, utc));
        if added == 0 && std::mem::take(&mut self.history_typed) {
            let text = "no earlier messages in the history".to_string();
            self.status(conv, wall, text, false);
        }
        self.convs[conv].backlog_asked = true;
    }

    fn entry_line(&self, entry: &Entry) -> Line {
        let time = entry.sent_at.map_or(
            UNIX_EPOCH + Duration::from_millis(entry.received_at),
            |ms| UNIX_EPOCH + Duration::from_millis(ms),
        );
        let (text, action) = action(&entry.text);
        let key = if entry.outgoing {
            Some(self.my_key)
        } else {
            self.online.get(&fold_name(&entry.from)).map(|o| o.key)
        };
        Line {
            time,
            kind: Kind::Message(Message {
                from: entry.from.clone(),
                key,
                mention: !entry.outgoing && mentions(&text, &self.me),
                text,
                action,
                own: entry.outgoing.then_some(entry.id),
                dated: true,
            }),
            key: Some(MessageKey {
                outgoing: entry.outgoing,
                from: if entry.outgoing {
                    String::new()
                } else {
                    fold_name(&entry.from)
                },
                id: entry.id,
            }),
        }
    }

    fn find(&self, name: &str) -> Option<usize> {
        self.convs.iter().position(|c| c.is_with(name))
    }

    /// The conversation with `name`, opened (and its history asked for)
    /// if it was not.
    fn open(&mut self, name: &str) -> usize {
        if let Some(i) = self.find(name) {
            return i;
        }
        let listed = self
            .online
            .get(&fold_name(name))
            .map_or(name.to_string(), |o| o.name.clone());
        self.convs.push(Conv::new(Some(listed)));
        self.convs.len() - 1
    }

    /// There is no store (`--no-store`): no history to ask for.
    pub fn without_store(&mut self) {
        self.store = false;
    }

    /// Conversations opened since the last call, whose history the host
    /// should ask for.
    pub fn backlog_wanted(&mut self) -> Vec<Effect> {
        let mut wanted = Vec::new();
        if !self.store {
            return wanted;
        }
        for conv in &mut self.convs {
            if !conv.backlog_asked {
                conv.backlog_asked = true;
                let line = match &conv.with {
                    Some(name) => format!("/history {name} {BACKLOG}"),
                    None => format!("/history {BACKLOG}"),
                };
                wanted.push(Effect::Send(line));
            }
        }
        wanted
    }

    fn switch(&mut self, to: usize) {
        if to < self.convs.len() {
            self.current = to;
            let c = &mut self.convs[to];
            c.unread = 0;
            c.mentioned = false;
            self.dirty = true;
        }
    }
}

/// `/me TEXT` as sent: the action's text, and whether it is one.
fn action(text: &str) -> (String, bool) {
    match text.strip_prefix("/me ") {
        Some(rest) => (rest.to_string(), true),
        None => (text.to_string(), false),
    }
}

/// `name` as a word of `text`, ignoring case.
fn mentions(text: &str, name: &str) -> bool {
    if name.is_empty() {
        return false;
    }
    let text = text.to_lowercase();
    let name = name.to_lowercase();
    let word = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '-');
    text.match_indices(&name).any(|(i, m)| {
        !word(text[..i].chars().next_back()) && !word(text[i + m.len()..].chars().next())
    })
}

fn day_of(time: SystemTime, utc: bool) -> String {
    let local = if utc {
        Local::at_utc(time)
    } else {
        Local::at(time)
    };
    local.long_date()
}

fn delivery_of(entry: &Entry) -> Delivery {
    let mut d = Delivery::default();
    for t in &entry.targets {
        d.targets.push(t.to.clone());
        let reason = t.reason.clone().unwrap_or_default();
        match t.state {
            "delivered" => {
                d.delivered.insert(t.to.clone());
            }
            "undelivered" => {
                d.failed.insert(t.to.clone(), reason);
            }
            _ => {
                d.queued.insert(t.to.clone(), reason);
            }
        }
    }
    d
}

/// Events shown as a line of our own, and whether it is a warning: the
/// line mode's words, without its `* ` and `! ` marks.
fn status_text(event: &Event) -> Option<(String, bool)> {
    if let Event::Outbox { messages } = event {
        if messages.is_empty() {
            return Some((
                "the outbox is empty: everything sent was acknowledged".into(),
                false,
            ));
        }
        let list: Vec<String> = messages
            .iter()
            .map(|m| {
                let state = if m.online { "on its way" } else { "away" };
                format!("#{} to {} ({state})", m.id, m.to)
            })
            .collect();
        let text = format!("waiting for an acknowledgement: {}", list.join(", "));
        return Some((text, false));
    }
    let line = crate::human::status_line(event)?;
    Some(match line.strip_prefix("! ") {
        Some(warning) => (warning.to_string(), true),
        None => (line.strip_prefix("* ").unwrap_or(&line).to_string(), false),
    })
}

#[cfg(test)]
mod tests;
