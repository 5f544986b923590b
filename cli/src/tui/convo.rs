//! A conversation as the UI keeps it: everyone's, or the direct one with
//! one peer (irssi's windows), with its lines, its unread count and where
//! its scrollback stands.

use std::collections::{HashSet, VecDeque};
use std::time::{Duration, Instant, SystemTime};

use peerchat_core::identity::PublicKey;

/// Lines a conversation keeps; older ones are dropped (the store keeps them
/// all, and `/history` brings them back).
pub const LINES_KEPT: usize = 5000;

/// Joins, leaves and moves this close together share one line.
pub const FOLD_WITHIN: Duration = Duration::from_secs(2);

/// Which message a line shows, so that history loaded later never repeats
/// one already on screen.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MessageKey {
    pub outgoing: bool,
    pub from: String,
    pub id: u64,
}

#[derive(Debug, Clone)]
pub struct Message {
    pub from: String,
    /// The sender's key when known: its colour.
    pub key: Option<PublicKey>,
    pub text: String,
    /// `/me`: shown as `* name text`.
    pub action: bool,
    /// Mentions our name.
    pub mention: bool,
    /// Ours: its id, for the delivery mark.
    pub own: Option<u64>,
    /// From the store: stamped with the date as well.
    pub dated: bool,
}

/// Joins, leaves and moves, folded while they come in quick succession.
#[derive(Debug, Clone, Default)]
pub struct Presence {
    pub joined: Vec<String>,
    /// Name and reason.
    pub left: Vec<(String, String)>,
    /// Name and new address.
    pub moved: Vec<(String, String)>,
}

#[derive(Debug, Clone)]
pub enum Kind {
    Message(Message),
    /// Our own words: answers to commands, news. `warn` ones stand out.
    Status {
        text: String,
        warn: bool,
    },
    Presence(Presence),
    /// The date, when it changes between two lines.
    Day(String),
}

#[derive(Debug, Clone)]
pub struct Line {
    /// When it happened, as shown (a message: its sender's time).
    pub time: SystemTime,
    pub kind: Kind,
    /// The message it shows, if it shows one.
    pub key: Option<MessageKey>,
}

impl Line {
    pub fn new(time: SystemTime, kind: Kind) -> Line {
        Line {
            time,
            kind,
            key: None,
        }
    }
}

#[derive(Debug)]
pub struct Conv {
    /// The peer of a direct conversation; `None` for everyone's.
    pub with: Option<String>,
    pub lines: VecDeque<Line>,
    /// Messages that came while another conversation was shown.
    pub unread: u32,
    /// One of them mentions us.
    pub mentioned: bool,
    /// Rows scrolled up from the bottom.
    pub scroll: usize,
    /// History was asked for when it opened.
    pub backlog_asked: bool,
    shown: HashSet<MessageKey>,
    /// When the last presence line was started, to fold the next into it.
    presence_at: Option<Instant>,
    /// The date of the last line.
    day: Option<String>,
}

impl Conv {
    pub fn new(with: Option<String>) -> Conv {
        Conv {
            with,
            lines: VecDeque::new(),
            unread: 0,
            mentioned: false,
            scroll: 0,
            backlog_asked: false,
            shown: HashSet::new(),
            presence_at: None,
            day: None,
        }
    }

    /// Whether this is the conversation with `name` (ignoring case).
    pub fn is_with(&self, name: &str) -> bool {
        self.with
            .as_deref()
            .is_some_and(|with| with.to_lowercase() == name.to_lowercase())
    }

    /// The title shown in the status bar.
    pub fn title(&self) -> &str {
        self.with.as_deref().unwrap_or("everyone")
    }

    /// Appends a line (a day line first when the date moved on); false if
    /// it shows a message already shown.
    pub fn push(&mut self, line: Line, day: impl Fn(SystemTime) -> String) -> bool {
        if let Some(key) = &line.key {
            if !self.shown.insert(key.clone()) {
                return false;
            }
        }
        self.day_line(day(line.time), line.time);
        self.presence_at = None;
        self.lines.push_back(line);
        self.trim();
        true
    }

    /// A join, leave or move: folded into the last line if that is one
    /// from within [`FOLD_WITHIN`]. True if it started a new line.
    pub fn presence(
        &mut self,
        time: SystemTime,
        now: Instant,
        day: impl Fn(SystemTime) -> String,
        add: impl FnOnce(&mut Presence),
    ) -> bool {
        let recent = self
            .presence_at
            .is_some_and(|at| now.saturating_duration_since(at) <= FOLD_WITHIN);
        if recent {
            if let Some(Line {
                kind: Kind::Presence(p),
                ..
            }) = self.lines.back_mut()
            {
                add(p);
                return false;
            }
        }
        self.day_line(day(time), time);
        let mut p = Presence::default();
        add(&mut p);
        self.lines.push_back(Line::new(time, Kind::Presence(p)));
        self.presence_at = Some(now);
        self.trim();
        true
    }

    /// Messages from the store, oldest first, placed before what is
    /// shown; those already shown are skipped. Returns how many were new.
    pub fn backlog(&mut self, lines: Vec<Line>, day: impl Fn(SystemTime) -> String) -> usize {
        let mut earlier: Vec<Line> = Vec::new();
        let mut last_day = None;
        for line in lines {
            if line
                .key
                .as_ref()
                .is_some_and(|key| !self.shown.insert(key.clone()))
            {
                continue;
            }
            let this_day = day(line.time);
            if last_day.as_ref() != Some(&this_day) {
                earlier.push(Line::new(line.time, Kind::Day(this_day.clone())));
                last_day = Some(this_day);
            }
            earlier.push(line);
        }
        if self.day.is_none() {
            self.day = last_day;
        }
        let added = earlier.len();
        for line in earlier.into_iter().rev() {
            self.lines.push_front(line);
        }
        self.trim();
        added
    }

    /// A day line before a line of another day than the last one.
    fn day_line(&mut self, this_day: String, time: SystemTime) {
        let last = self.day.replace(this_day.clone());
        if last.is_some_and(|last| last != this_day) {
            self.lines.push_back(Line::new(time, Kind::Day(this_day)));
        }
    }

    pub fn clear(&mut self) {
        self.lines.clear();
        self.shown.clear();
        self.scroll = 0;
        self.presence_at = None;
    }

    fn trim(&mut self) {
        while self.lines.len() > LINES_KEPT {
            if let Some(key) = self.lines.pop_front().and_then(|line| line.key) {
                self.shown.remove(&key);
            }
        }
    }
}
