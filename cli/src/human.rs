//! What a person reads: events turned into lines of text, stamped with the
//! time, with everything that came from the network made harmless for a
//! terminal ([`clean`]).
//!
//! [`View`] keeps what the lines depend on across events: the day of the
//! last line (a day-change line when it moves on), the registry's state (one
//! line when it changes, not one per retry) and the last status line (an
//! identical run of them is folded into a count).

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use indicatif::{HumanBytes, HumanDuration};
use peerchat_core::identity::PublicKey;
use peerchat_core::protocol::PeerEntry;
use unicode_segmentation::UnicodeSegmentation;
use unicode_width::{UnicodeWidthChar, UnicodeWidthStr};

use crate::journal::Entry;
use crate::peer::{Direction, Event};

/// A sender's clock that differs from ours by more than this is shown next
/// to ours.
const CLOCK_SKEW_SHOWN: Duration = Duration::from_secs(5);

/// A run of identical status lines is summed up at least this often.
const REPEAT_SUMMARY_EVERY: Duration = Duration::from_secs(60);

/// Makes text from the network safe to print: C0 and C1 control
/// characters, ESC, DEL, the bidirectional overrides, isolates and marks,
/// and the Unicode line and paragraph separators become visible
/// placeholders (`␛`, `␍`, `<U+202E>`), so that a peer can neither send
/// escape sequences to the terminal nor reorder, overwrite or break the
/// line it is shown on. Written here rather than taken from a crate: the
/// crates that handle escapes strip them, and a reader should see that
/// something was there.
pub fn clean(text: &str) -> Cow<'_, str> {
    if !text.chars().any(is_unsafe) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            // The Control Pictures block has a glyph for each C0 control.
            '\0'..='\u{1F}' => out.push(char::from_u32(0x2400 + c as u32).unwrap_or('?')),
            '\u{7F}' => out.push('\u{2421}'),
            c if is_unsafe(c) => {
                let _ = write!(out, "<U+{:04X}>", c as u32);
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

fn is_unsafe(c: char) -> bool {
    matches!(c,
        '\0'..='\u{1F}' | '\u{7F}'..='\u{9F}'
        | '\u{061C}' | '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}'
        | '\u{2066}'..='\u{2069}' | '\u{2028}' | '\u{2029}')
}

/// Local calendar time, as shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Local {
    year: i32,
    month: u32,
    day: u32,
    weekday: usize,
    hour: u32,
    minute: u32,
    second: u32,
}

impl Local {
    pub(crate) fn at(time: SystemTime) -> Local {
        Local::convert(time, false)
    }

    /// The same instant in UTC: for output that must not depend on where
    /// it is made (the UI's rendering tests).
    pub(crate) fn at_utc(time: SystemTime) -> Local {
        Local::convert(time, true)
    }

    fn convert(time: SystemTime, utc: bool) -> Local {
        let secs = time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let t = libc::time_t::try_from(secs).unwrap_or(0);
        // SAFETY: localtime_r and gmtime_r write only into the struct we
        // own. Without a time zone to be had, the time is shown in UTC.
        let mut tm: libc::tm = unsafe { std::mem::zeroed() };
        if utc || unsafe { libc::localtime_r(&t, &mut tm) }.is_null() {
            unsafe { libc::gmtime_r(&t, &mut tm) };
        }
        Local {
            year: tm.tm_year + 1900,
            month: u32::try_from(tm.tm_mon + 1).unwrap_or(1),
            day: u32::try_from(tm.tm_mday).unwrap_or(1),
            weekday: usize::try_from(tm.tm_wday).unwrap_or(0),
            hour: u32::try_from(tm.tm_hour).unwrap_or(0),
            minute: u32::try_from(tm.tm_min).unwrap_or(0),
            second: u32::try_from(tm.tm_sec).unwrap_or(0),
        }
    }

    pub(crate) fn date(&self) -> (i32, u32, u32) {
        (self.year, self.month, self.day)
    }

    pub(crate) fn clock(&self) -> String {
        format!("{:02}:{:02}:{:02}", self.hour, self.minute, self.second)
    }

    /// Hours and minutes, as the UI stamps its lines.
    pub(crate) fn short_clock(&self) -> String {
        format!("{:02}:{:02}", self.hour, self.minute)
    }

    pub(crate) fn long_date(&self) -> String {
        const DAYS: [&str; 7] = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"];
        format!(
            "{} {}-{:02}-{:02}",
            DAYS[self.weekday % 7],
            self.year,
            self.month,
            self.day
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RegistryState {
    /// Not reached yet since start.
    Starting,
    Registered,
    /// Reached once, lost since.
    Lost,
    /// Never reached since start.
    Unreachable,
}

/// A run of identical status lines being folded.
struct Run {
    body: String,
    /// Lines of the run not shown yet.
    hidden: u32,
    last_summary: SystemTime,
}

/// The human front end's memory: see the module documentation.
pub struct View {
    me: String,
    registry: String,
    retry_max: Duration,
    state: RegistryState,
    day: Option<(i32, u32, u32)>,
    run: Option<Run>,
    /// The quarters of each transfer shown so far.
    quarters: HashMap<u64, u8>,
}

impl View {
    /// `registry` as the user named it; `retry_max` is the longest wait
    /// between two attempts to reach it.
    pub fn new(me: &str, registry: &str, retry_max: Duration) -> View {
        View {
            me: me.to_string(),
            registry: registry.to_string(),
            retry_max,
            state: RegistryState::Starting,
            day: None,
            run: None,
            quarters: HashMap::new(),
        }
    }

    /// The lines for one event at wall-clock time `now`; none for the
    /// events a person does not need to see.
    pub fn event(&mut self, event: &Event, now: SystemTime) -> Vec<String> {
        let mut out = Vec::new();
        match event {
            Event::Message {
                from,
                text,
                direct,
                sent_at,
                ..
            } => {
                let stamp = self.message_stamp(*sent_at, now);
                // Inside the brackets, where the sender's text cannot
                // imitate it.
                let to_me = if *direct { " \u{2192} you" } else { "" };
                self.day_line(now, &mut out);
                self.end_run(now, &mut out);
                push_message(&mut out, &stamp, from, to_me, text);
            }
            Event::Registered {
                name, addr, peers, ..
            } => {
                let was = std::mem::replace(&mut self.state, RegistryState::Registered);
                self.me = name.clone();
                let back = if matches!(was, RegistryState::Lost | RegistryState::Unreachable) {
                    "registry back: "
                } else {
                    ""
                };
                let line = format!("* {back}registered as {name} at {addr}; {}", names(peers));
                self.status(line, now, &mut out);
            }
            Event::RegistryLost { error, .. } => {
                let line = match self.state {
                    RegistryState::Registered => format!(
                        "! registry lost ({error}); chat goes on, and it is tried again in the background (at most every {}; /status)",
                        seconds(self.retry_max)
                    ),
                    RegistryState::Starting => format!(
                        "! registry at {} not reachable ({error}); tried again in the background (at most every {}; /status); you can chat with peers once it lists them",
                        self.registry,
                        seconds(self.retry_max)
                    ),
                    RegistryState::Lost | RegistryState::Unreachable => return out,
                };
                self.state = match self.state {
                    RegistryState::Starting => RegistryState::Unreachable,
                    _ => RegistryState::Lost,
                };
                self.status(line, now, &mut out);
            }
            Event::Sent { .. } | Event::Delivered { .. } => {}
            Event::FileProgress {
                transfer,
                name,
                bytes,
                size,
                rate,
                eta_ms,
                ..
            } => {
                // A line a quarter, not four a second: the lines scroll.
                let quarter = (bytes.saturating_mul(4) / (*size).max(1)).min(3) as u8;
                let shown = self.quarters.entry(*transfer).or_insert(0);
                if quarter > *shown {
                    *shown = quarter;
                    let left = eta_ms.map_or(String::new(), |ms| {
                        format!(", {} left", HumanDuration(Duration::from_millis(ms)))
                    });
                    let line = format!(
                        "* transfer {transfer}: {name} {}% ({} of {}) at {}/s{left}",
                        bytes.saturating_mul(100) / (*size).max(1),
                        HumanBytes(*bytes),
                        HumanBytes(*size),
                        HumanBytes(*rate)
                    );
                    self.status(line, now, &mut out);
                }
            }
            Event::History { with, messages } => {
                let title = match with {
                    Some(name) => format!("your messages with {name}"),
                    None => "messages to everyone".into(),
                };
                self.listing(&title, messages, now, &mut out);
            }
            Event::Search { text, messages } => {
                let title = format!("messages with {text:?}");
                self.listing(&title, messages, now, &mut out);
            }
            Event::Outbox { messages } => {
                let line = match messages.len() {
                    0 => "* the outbox is empty: everything sent was acknowledged".into(),
                    1 => "* 1 message waits for an acknowledgement:".into(),
                    n => format!("* {n} messages wait for an acknowledgement:"),
                };
                self.status(line, now, &mut out);
                for m in messages {
                    let state = if m.online { "on its way" } else { "away" };
                    let when = Local::at(UNIX_EPOCH + Duration::from_millis(m.sent_at));
                    out.push(format!(
                        "    #{} to {} ({state}), sent {} {}: {}",
                        m.id,
                        clean(&m.to),
                        when.long_date(),
                        when.clock(),
                        clean(&one_line(&m.text))
                    ));
                }
            }
            other => {
                if let Some(line) = status_line(other) {
                    self.status(line, now, &mut out);
                }
            }
        }
        out
    }

    /// How a message of ours is echoed back to us.
    pub fn echo(&mut self, text: &str, to: Option<&str>, now: SystemTime) -> Vec<String> {
        let mut out = Vec::new();
        self.day_line(now, &mut out);
        self.end_run(now, &mut out);
        let stamp = Local::at(now).clock();
        let me = self.me.clone();
        let to = to.map(|to| format!(" \u{2192} {}", clean(to)));
        push_message(&mut out, &stamp, &me, to.as_deref().unwrap_or(""), text);
        out
    }

    /// A line of our own (not an event), such as the fingerprint at start.
    pub fn note(&mut self, line: &str, now: SystemTime) -> Vec<String> {
        let mut out = Vec::new();
        self.status(line.to_string(), now, &mut out);
        out
    }

    /// Messages from the history, each stamped with its date, and for ours
    /// the targets that have not had it yet.
    fn listing(&mut self, title: &str, messages: &[Entry], now: SystemTime, out: &mut Vec<String>) {
        let line = match messages.len() {
            0 => format!("* no {title}"),
            n => format!("* {title}, the last {n}:"),
        };
        self.status(line, now, out);
        for m in messages {
            let when = Local::at(UNIX_EPOCH + Duration::from_millis(m.received_at));
            let stamp = format!("{} {}", when.long_date(), when.clock());
            let to = match (&m.with, m.outgoing) {
                (Some(with), true) => format!(" \u{2192} {}", clean(with)),
                (Some(_), false) => " \u{2192} you".into(),
                (None, _) => String::new(),
            };
            push_message(out, &stamp, &m.from, &to, &m.text);
            let pending: Vec<String> = m
                .targets
                .iter()
                .filter(|t| t.state != "delivered")
                .map(|t| match &t.reason {
                    Some(reason) => format!("{} {} ({reason})", clean(&t.to), t.state),
                    None => format!("{} {}", clean(&t.to), t.state),
                })
                .collect();
            if !pending.is_empty() {
                out.push(format!("    ({})", pending.join(", ")));
            }
        }
    }

    fn message_stamp(&self, sent_at: Option<u64>, now: SystemTime) -> String {
        let here = Local::at(now);
        let Some(sent) = sent_at.map(|ms| UNIX_EPOCH + Duration::from_millis(ms)) else {
            return here.clock();
        };
        let skew = match sent.duration_since(now) {
            Ok(ahead) => ahead,
            Err(behind) => behind.duration(),
        };
        let there = Local::at(sent);
        if skew <= CLOCK_SKEW_SHOWN {
            return there.clock();
        }
        let sent_text = if there.date() == here.date() {
            there.clock()
        } else {
            format!("{} {}", there.long_date(), there.clock())
        };
        format!("sent {sent_text}, here {}", here.clock())
    }

    fn day_line(&mut self, now: SystemTime, out: &mut Vec<String>) {
        let local = Local::at(now);
        let previous = self.day.replace(local.date());
        if previous.is_some_and(|day| day != local.date()) {
            out.push(format!("--- day changed: {}", local.long_date()));
        }
    }

    /// A `*` or `!` line, stamped. A warning (`!`) that says the same as
    /// the one before is folded into its run; answers to commands and
    /// news (`*`) always show.
    fn status(&mut self, body: String, now: SystemTime, out: &mut Vec<String>) {
        self.day_line(now, out);
        let stamp = Local::at(now).clock();
        if !body.starts_with('!') {
            self.end_run(now, out);
            out.push(format!("[{stamp}] {}", clean(&body)));
            return;
        }
        if let Some(run) = self.run.as_mut().filter(|run| run.body == body) {
            run.hidden += 1;
            let due = now
                .duration_since(run.last_summary)
                .is_ok_and(|d| d >= REPEAT_SUMMARY_EVERY);
            if due {
                out.push(format!(
                    "[{stamp}] {} (repeated {} times)",
                    clean(&body),
                    run.hidden
                ));
                run.hidden = 0;
                run.last_summary = now;
            }
            return;
        }
        self.end_run(now, out);
        out.push(format!("[{stamp}] {}", clean(&body)));
        self.run = Some(Run {
            body,
            hidden: 0,
            last_summary: now,
        });
    }

    /// Says how often the last status line repeated unseen, if it did.
    fn end_run(&mut self, now: SystemTime, out: &mut Vec<String>) {
        if let Some(run) = self.run.take().filter(|run| run.hidden > 0) {
            let stamp = Local::at(now).clock();
            out.push(format!(
                "[{stamp}] {} (repeated {} times)",
                clean(&run.body),
                run.hidden
            ));
        }
    }
}

/// Marks the rows of a line too wide for the terminal after the first.
const WRAP_MARK: &str = "           \u{2506} ";

/// Breaks a line into rows of at most `columns` cells, every row after the
/// first marked with [`WRAP_MARK`]. The terminal would wrap a long line by
/// itself, at column 0: a peer could pad its text so that a row it wrote
/// starts a screen line and reads as another message. Terminals disagree
/// on how wide some text is (emoji sequences, variation selectors,
/// characters of ambiguous width), so every grapheme counts as the widest
/// any of them draws it: a row may end early, never late.
pub fn wrap(line: &str, columns: usize) -> Vec<String> {
    let mark_width = widest(WRAP_MARK);
    if columns <= mark_width + 8 {
        return vec![line.to_string()];
    }
    let mut rows = Vec::new();
    let mut row = String::new();
    let mut width = 0;
    for grapheme in line.graphemes(true) {
        let w = widest(grapheme);
        if width + w > columns && !row.is_empty() {
            rows.push(std::mem::take(&mut row));
            row.push_str(WRAP_MARK);
            width = mark_width;
        }
        row.push_str(grapheme);
        width += w;
    }
    rows.push(row);
    rows
}

/// The most cells a terminal may give `text`: its width as one cluster or
/// as the sum of its characters, counting ambiguous ones as wide, and at
/// least two cells for a cluster that holds a variation selector.
fn widest(text: &str) -> usize {
    let whole = UnicodeWidthStr::width_cjk(text);
    let each: usize = text
        .chars()
        .map(|c| UnicodeWidthChar::width_cjk(c).unwrap_or(0))
        .sum();
    let selector = text.chars().any(|c| matches!(c, '\u{FE00}'..='\u{FE0F}'));
    whole.max(each).max(if selector { 2 } else { 0 })
}

/// A chat message: its first line after the sender's name, and every
/// further line marked as the same sender's continuation, so that no line
/// of it reads as a message of its own.
fn push_message(out: &mut Vec<String>, stamp: &str, from: &str, to: &str, text: &str) {
    let from = clean(from);
    let mut lines = text.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
    let first = lines.next().unwrap_or("");
    out.push(format!("[{stamp}] <{from}{to}> {}", clean(first)));
    let indent = " ".repeat(stamp.chars().count() + 2);
    for line in lines {
        out.push(format!("{indent} <{from}{to}> \u{2502} {}", clean(line)));
    }
}

/// A message's text on one line, for a list: its line breaks shown.
fn one_line(text: &str) -> Cow<'_, str> {
    if text.contains('\n') {
        Cow::Owned(text.replace("\r\n", "\n").replace('\n', " \u{21b5} "))
    } else {
        Cow::Borrowed(text)
    }
}

fn seconds(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{} s", d.as_secs())
    } else {
        format!("{} ms", d.as_millis())
    }
}

fn names(peers: &[PeerEntry]) -> String {
    if peers.is_empty() {
        return "nobody else is online".into();
    }
    let list: Vec<String> = peers
        .iter()
        .map(|p| match p.reachable {
            Some(false) => format!("{} ({}, not reachable directly)", p.name, p.addr),
            _ => format!("{} ({})", p.name, p.addr),
        })
        .collect();
    format!("{} online: {}", peers.len(), list.join(", "))
}

/// The text of the events shown as status lines (unstamped, not cleaned):
/// `* ` news and answers, `! ` warnings. The terminal UI shows them too.
pub(crate) fn status_line(event: &Event) -> Option<String> {
    Some(match event {
        Event::Joined { name, addr, .. } => format!("* {name} joined ({addr})"),
        Event::Left { name, reason } => format!("* {name} left ({reason})"),
        Event::Moved { name, addr } => format!("* {name} moved to {addr}"),
        Event::Reachable {
            reachable: false,
            you: true,
            ..
        } => "! others cannot dial you (a NAT or a firewall is in the way): peers that can be dialed will be asked to dial you back, and the others reach you through the registry's relay, still end to end encrypted".into(),
        Event::Reachable {
            reachable: true,
            you: true,
            ..
        } => "* others can dial you directly".into(),
        Event::Peers { peers } => format!("* {}", names(peers)),
        Event::Sent { to, .. } if to.is_empty() => {
            "! nobody else is online; the message went nowhere".into()
        }
        Event::Undelivered { id, to, reason } => format!(
            "! message {id} to {to} was not confirmed ({reason}); it may or may not have arrived"
        ),
        Event::Error { code, message } => format!("! {code}: {message}"),
        Event::Queued { id, to, reason } if reason == "exit" => {
            format!("* message {id} to {to} is kept: it is sent when you are both online")
        }
        Event::Queued { id, to, reason } => format!(
            "* message {id} waits for {to}, who is away ({reason}): it is sent when they are back"
        ),
        Event::Whois {
            name,
            key,
            pinned,
            you,
            pinned_key,
            link,
        } => {
            let mut line = whois_line(name, key, *pinned, *you, pinned_key.as_ref());
            match link.as_deref() {
                Some("relayed") => line.push_str(
                    "; our link goes through the registry's relay (still end to end encrypted)",
                ),
                Some("reversed") => {
                    let _ = write!(
                        line,
                        "; {name} cannot be dialed, so our link runs on a connection {name} opened to us when we asked"
                    );
                }
                Some(path) => {
                    let _ = write!(line, "; our link is {path}");
                }
                None => {}
            }
            line
        }
        Event::Status {
            registry,
            error,
            retry_in_ms,
            peers,
        } => {
            let mut line = format!("* registry: {registry}");
            if let Some(error) = error {
                let _ = write!(line, " ({error})");
            }
            if let Some(ms) = retry_in_ms {
                let _ = write!(line, "; next attempt in {:.1} s", *ms as f64 / 1000.0);
            }
            let _ = write!(line, "; peers known: {peers}");
            line
        }
        Event::FileOffer {
            transfer,
            direction: Direction::In,
            peer,
            name,
            size,
            ..
        } => format!(
            "* {peer} offers {name} ({}): /accept {transfer} [DIR] to take it, /reject {transfer} to refuse it",
            HumanBytes(*size)
        ),
        Event::FileOffer {
            transfer,
            direction: Direction::Out,
            peer,
            name,
            size,
            ..
        } => format!(
            "* transfer {transfer}: {name} ({}) offered to {peer}; it goes once they accept (/cancel {transfer} to stop)",
            HumanBytes(*size)
        ),
        Event::FileDone {
            transfer,
            direction: Direction::In,
            peer,
            size,
            path,
            ..
        } => format!(
            "* transfer {transfer}: saved {path} from {peer} ({}, SHA-256 checked)",
            HumanBytes(*size)
        ),
        Event::FileDone {
            transfer,
            direction: Direction::Out,
            peer,
            name,
            size,
            ..
        } => format!(
            "* transfer {transfer}: {peer} has {name} ({}, SHA-256 checked)",
            HumanBytes(*size)
        ),
        Event::FileFailed {
            transfer,
            direction,
            peer,
            name,
            code,
            reason,
        } => {
            let way = match direction {
                Direction::In => "from",
                Direction::Out => "to",
            };
            format!("! transfer {transfer}: {name} {way} {peer} failed ({code}): {reason}")
        }
        Event::Registered { .. }
        | Event::RegistryLost { .. }
        | Event::Message { .. }
        | Event::Sent { .. }
        | Event::Delivered { .. }
        | Event::History { .. }
        | Event::Search { .. }
        | Event::Outbox { .. }
        | Event::FileProgress { .. }
        // Of another peer: /peers says it, no need for a line each.
        | Event::Reachable { you: false, .. } => return None,
    })
}

/// `/whois`'s line for a peer (or ourselves), before what it says of our
/// link.
fn whois_line(
    name: &str,
    key: &PublicKey,
    pinned: bool,
    you: bool,
    pinned_key: Option<&PublicKey>,
) -> String {
    match (you, pinned_key) {
        (true, _) => format!("* {name} (you): key {key}"),
            (false, Some(pin)) => format!(
                "! {name}: the registry lists key {key}, but known_peers pins {pin} for {name}; links with {name} are refused until you check with them and delete that line"
            ),
            (false, None) if pinned => format!("* {name}: key {key} (pinned in known_peers)"),
            (false, None) => format!("* {name}: key {key} (not pinned yet: pinned when a link first succeeds)"),
    }
}

#[cfg(test)]
mod tests;
