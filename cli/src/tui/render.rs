//! Draws the [`App`]: the message pane, the people online, the status bar
//! and the input line. Everything from the network goes through
//! [`clean`] first, so that no name, text or reason can move the cursor,
//! change colours or set the title.

use std::time::Instant;

use indicatif::HumanBytes;
use peerchat_core::identity::PublicKey;
use peerchat_core::names::{fold_name, name_skeleton};
use ratatui::layout::{Constraint, Layout, Position, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line as Row, Span};
use ratatui::widgets::{Block, Borders, Paragraph};
use ratatui::Frame;
use unicode_segmentation::UnicodeSegmentation;
use unicode_width::UnicodeWidthStr;

use super::convo::{Kind, Line, Message, Presence};
use super::{App, Delivery, Registry};
use crate::human::{clean, Local};

/// Nick colours: distinct on dark and light backgrounds; red is kept for
/// warnings and bold white for our own name.
const PALETTE: [Color; 10] = [
    Color::Cyan,
    Color::Green,
    Color::Yellow,
    Color::Blue,
    Color::Magenta,
    Color::LightCyan,
    Color::LightGreen,
    Color::LightYellow,
    Color::LightBlue,
    Color::LightMagenta,
];

/// Below this width the list of people online is left out.
const NICK_LIST_FROM: u16 = 60;

/// Presence lines name at most this many people.
const NAMES_SHOWN: usize = 8;

pub fn draw(frame: &mut Frame, app: &mut App, now: Instant) {
    let area = frame.area();
    let [body, status, input] = Layout::vertical([
        Constraint::Min(1),
        Constraint::Length(1),
        Constraint::Length(1),
    ])
    .areas(area);
    let list_width = if area.width >= NICK_LIST_FROM {
        let longest = app
            .online
            .values()
            .map(|o| clean(&o.name).width())
            .max()
            .unwrap_or(0);
        (longest as u16 + 4).clamp(14, 24)
    } else {
        0
    };
    let [pane, list] =
        Layout::horizontal([Constraint::Min(10), Constraint::Length(list_width)]).areas(body);
    app.pane = (usize::from(pane.width), usize::from(pane.height));
    messages(frame, app, pane);
    if list_width > 0 {
        people(frame, app, list);
    }
    status_bar(frame, app, status, now);
    input_line(frame, app, input);
    app.dirty = false;
}

fn messages(frame: &mut Frame, app: &mut App, pane: Rect) {
    let area = pane;
    let width = usize::from(area.width);
    let height = usize::from(area.height);
    let conv = &app.convs[app.current];
    // From the bottom up, only as far as the window reaches.
    let mut rows: Vec<Row<'static>> = Vec::new();
    let wanted = height.saturating_add(conv.scroll);
    for line in conv.lines.iter().rev() {
        let mut these = rows_for(app, line, width);
        these.reverse();
        rows.extend(these);
        if rows.len() >= wanted {
            break;
        }
    }
    // Scrolled past the top: stop at the oldest line.
    let scroll = conv.scroll.min(rows.len().saturating_sub(height));
    app.convs[app.current].scroll = scroll;
    let shown: Vec<Row<'static>> = rows.into_iter().skip(scroll).take(height).rev().collect();
    let top = height - shown.len();
    let area = Rect {
        y: area.y + top as u16,
        height: shown.len() as u16,
        ..area
    };
    frame.render_widget(Paragraph::new(shown), area);
    if scroll > 0 {
        let note = " more below: End ";
        let width = (note.width() as u16).min(pane.width);
        let corner = Rect {
            x: pane.x + pane.width - width,
            y: pane.y + pane.height.saturating_sub(1),
            width,
            height: 1.min(pane.height),
        };
        let style = Style::default().add_modifier(Modifier::REVERSED);
        frame.render_widget(Paragraph::new(note).style(style), corner);
    }
}

fn people(frame: &mut Frame, app: &App, area: Rect) {
    let block = Block::default()
        .borders(Borders::LEFT)
        .title(format!(" {} online", app.online.len()))
        .border_style(Style::default().fg(Color::DarkGray));
    let mut rows = Vec::new();
    // Only those that fit: with thousands online, a frame stays cheap.
    for online in app.online.values().take(usize::from(area.height)) {
        let (mark, mark_style) = match app.pins.get(&fold_name(&online.name)) {
            Some(pinned) if *pinned == online.key => ("+", Style::default().fg(Color::Green)),
            Some(_) => (
                "!",
                Style::default().fg(Color::Red).add_modifier(Modifier::BOLD),
            ),
            None => ("*", Style::default().fg(Color::DarkGray)),
        };
        let colour = nick_colour(app, &online.name, Some(online.key));
        let mut row = vec![
            Span::styled(mark, mark_style),
            Span::styled(
                clean(&online.name).into_owned(),
                Style::default().fg(colour),
            ),
        ];
        if online.unreachable {
            // Nobody can dial it (a NAT or a firewall): our links to it are
            // reversed or relayed.
            row.push(Span::styled(" ~nat", Style::default().fg(Color::DarkGray)));
        }
        rows.push(Row::from(row));
    }
    frame.render_widget(Paragraph::new(rows).block(block), area);
}

fn status_bar(frame: &mut Frame, app: &App, area: Rect, now: Instant) {
    let bar = Style::default().bg(Color::Blue).fg(Color::White);
    // Narrow: the essentials only, so that the conversations still show.
    let wide = area.width >= 80;
    let mut spans = vec![Span::raw(format!(" {} ", clean(&app.me)))];
    if wide {
        let key = app.my_key.to_string();
        spans.push(Span::styled(
            format!("({}) ", &key[..8]),
            bar.fg(Color::Gray),
        ));
    }
    spans.push(Span::raw("│"));
    for (i, conv) in app.convs.iter().enumerate() {
        let mut label = format!(" {}:{}", i + 1, clean(conv.title()));
        if conv.unread > 0 {
            label.push_str(&format!("({})", conv.unread));
        }
        let style = if i == app.current {
            bar.add_modifier(Modifier::BOLD | Modifier::REVERSED)
        } else if conv.mentioned {
            bar.fg(Color::LightRed).add_modifier(Modifier::BOLD)
        } else if conv.unread > 0 {
            bar.fg(Color::LightCyan)
        } else {
            bar
        };
        spans.push(Span::styled(label, style));
    }
    spans.push(Span::raw(" │ "));
    let label = if wide { "registry:" } else { "reg" };
    let (registry, warn) = match &app.registry {
        Registry::Connecting => (format!("{label} connecting…"), false),
        Registry::Connected if wide => ("registry: connected".to_string(), false),
        Registry::Connected => ("reg ok".to_string(), false),
        Registry::Lost {
            error,
            retry_at,
            reached,
        } => {
            let wait = retry_at.saturating_duration_since(now).as_secs_f64().ceil();
            let when = if wait > 0.0 {
                format!("in {wait}s")
            } else {
                "now".to_string()
            };
            let state = match (*reached, wide) {
                (true, true) => "reconnecting",
                (false, true) => "never reached, retrying",
                (_, false) => "retry",
            };
            let mut text = format!("{label} {state} {when}");
            if wide {
                text.push_str(&format!(" ({})", clean(error)));
            }
            (text, true)
        }
    };
    let registry_style = if warn {
        bar.fg(Color::LightYellow).add_modifier(Modifier::BOLD)
    } else {
        bar
    };
    spans.push(Span::styled(registry, registry_style));
    // Transfers: the first two, then how many more.
    for (number, t) in app.transfers.iter().take(2) {
        let arrow = if t.incoming { '↓' } else { '↑' };
        let percent = t.bytes.saturating_mul(100) / t.size.max(1);
        let text = if wide {
            format!(" │ #{number}{arrow}{percent}% {}/s", HumanBytes(t.rate))
        } else {
            format!(" │{arrow}{percent}%")
        };
        spans.push(Span::raw(text));
    }
    if app.transfers.len() > 2 {
        spans.push(Span::raw(format!(" +{}", app.transfers.len() - 2)));
    }
    frame.render_widget(Paragraph::new(Row::from(spans)).style(bar), area);
}

fn input_line(frame: &mut Frame, app: &App, area: Rect) {
    let prompt = format!("[{}] ", clean(app.convs[app.current].title()));
    let prompt_width = prompt.width().min(usize::from(area.width) / 2);
    let room = usize::from(area.width).saturating_sub(prompt_width + 1);
    let (text, column) = app.editor.visible(room);
    let row = Row::from(vec![
        Span::styled(prompt, Style::default().fg(Color::Cyan)),
        // What the user typed or pasted: shown harmless too.
        Span::raw(clean(text).into_owned()),
    ]);
    frame.render_widget(Paragraph::new(row), area);
    let x = area.x + (prompt_width + column).min(usize::from(area.width).saturating_sub(1)) as u16;
    frame.set_cursor_position(Position::new(x, area.y));
}

/// How many rows `line` takes in the message pane as last drawn.
pub(crate) fn rows_of(app: &App, line: &Line) -> usize {
    rows_for(app, line, app.pane.0).len()
}

/// The rows of one line at `width` columns: a prefix (time, name), then
/// the text wrapped under it.
fn rows_for(app: &App, line: &Line, width: usize) -> Vec<Row<'static>> {
    let local = if app.utc {
        Local::at_utc(line.time)
    } else {
        Local::at(line.time)
    };
    let dim = Style::default().fg(Color::DarkGray);
    let stamp = Span::styled(format!("{} ", local.short_clock()), dim);
    match &line.kind {
        Kind::Day(day) => vec![Row::from(Span::styled(format!("─── {day} ───"), dim))],
        Kind::Status { text, warn } => {
            let style = if *warn {
                Style::default().fg(Color::Yellow)
            } else {
                Style::default()
            };
            let marker = Span::styled("-!- ", if *warn { style } else { dim });
            wrapped(vec![stamp, marker], &clean(text), style, width)
        }
        Kind::Presence(p) => wrapped(vec![stamp], &presence_text(p), dim, width),
        Kind::Message(m) => message_rows(app, m, &local, stamp, width),
    }
}

fn message_rows(
    app: &App,
    m: &Message,
    local: &Local,
    stamp: Span<'static>,
    width: usize,
) -> Vec<Row<'static>> {
    let stamp = if m.dated {
        Span::styled(
            format!("{} {} ", local.long_date(), local.short_clock()),
            stamp.style,
        )
    } else {
        stamp
    };
    let own = m.own.is_some();
    let mut nick = Style::default()
        .fg(if own {
            Color::White
        } else {
            nick_colour(app, &m.from, m.key)
        })
        .add_modifier(Modifier::BOLD);
    if m.mention {
        nick = nick.add_modifier(Modifier::REVERSED);
    }
    let from = clean(&m.from).into_owned();
    let mut prefix = vec![stamp];
    if m.action {
        prefix.push(Span::styled("* ", nick));
        prefix.push(Span::styled(format!("{from} "), nick));
    } else {
        prefix.push(Span::styled("<", Style::default().fg(Color::DarkGray)));
        prefix.push(Span::styled(from, nick));
        prefix.push(Span::styled("> ", Style::default().fg(Color::DarkGray)));
    }
    let mut text_style = Style::default();
    if m.mention {
        text_style = text_style.fg(Color::LightRed).add_modifier(Modifier::BOLD);
    }
    if m.action {
        text_style = text_style.add_modifier(Modifier::ITALIC);
    }
    // Each line of a message of several lines under the same prefix.
    let text = clean(&m.text.replace("\r\n", "\n").replace('\n', " ↵ ")).into_owned();
    let mut rows = wrapped(prefix, &text, text_style, width);
    if let Some(id) = m.own {
        if let Some((mark, style)) = app.deliveries.get(&id).map(|d| mark(id, d)) {
            if let Some(last) = rows.last_mut() {
                if last.width() + mark.width() < width {
                    last.spans.push(Span::styled(format!(" {mark}"), style));
                } else {
                    rows.push(Row::from(Span::styled(format!("  {mark}"), style)));
                }
            }
        }
    }
    rows
}

/// A message of ours: where it stands, in a few characters.
fn mark(id: u64, d: &Delivery) -> (String, Style) {
    let n = d.targets.len();
    let done = d.delivered.len();
    if n == 0 {
        return ("✗ nobody online".into(), Style::default().fg(Color::Red));
    }
    if !d.failed.is_empty() {
        let text = format!("✗ {} of {n} failed #{id}", d.failed.len());
        return (text, Style::default().fg(Color::Red));
    }
    if done == n {
        return ("✓".into(), Style::default().fg(Color::Green));
    }
    if !d.queued.is_empty() {
        let text = format!("queued for {} #{id}", d.queued.len());
        return (text, Style::default().fg(Color::Yellow));
    }
    if done > 0 {
        return (
            format!("✓ {done}/{n}"),
            Style::default().fg(Color::DarkGray),
        );
    }
    ("…".into(), Style::default().fg(Color::DarkGray))
}

fn presence_text(p: &Presence) -> String {
    let names = |list: Vec<String>| {
        let more = list.len().saturating_sub(NAMES_SHOWN);
        let mut shown: Vec<String> = list.into_iter().take(NAMES_SHOWN).collect();
        if more > 0 {
            shown.push(format!("+{more} more"));
        }
        shown.join(", ")
    };
    let mut parts = Vec::new();
    if !p.joined.is_empty() {
        let list = p.joined.iter().map(|n| clean(n).into_owned()).collect();
        parts.push(format!("→ {} joined: {}", p.joined.len(), names(list)));
    }
    if !p.left.is_empty() {
        let list = p
            .left
            .iter()
            .map(|(n, why)| format!("{} ({})", clean(n), clean(why)))
            .collect();
        parts.push(format!("← {} left: {}", p.left.len(), names(list)));
    }
    if !p.moved.is_empty() {
        let list = p
            .moved
            .iter()
            .map(|(n, addr)| format!("{} to {}", clean(n), clean(addr)))
            .collect();
        parts.push(format!("↔ {} moved: {}", p.moved.len(), names(list)));
    }
    parts.join("; ")
}

/// `prefix` then `text`, wrapped at `width` columns by grapheme, each
/// further row indented under the text's start (or by two columns, if the
/// prefix leaves too little room).
fn wrapped(
    prefix: Vec<Span<'static>>,
    text: &str,
    style: Style,
    width: usize,
) -> Vec<Row<'static>> {
    let prefix_width: usize = prefix.iter().map(Span::width).sum();
    let indent = if width >= prefix_width + 10 {
        prefix_width
    } else {
        2
    };
    let mut rows = Vec::new();
    let mut spans = prefix;
    let mut used = prefix_width;
    let mut chunk = String::new();
    for g in text.graphemes(true) {
        let w = g.width();
        if used + w > width && (used > indent || !chunk.is_empty()) {
            spans.push(Span::styled(std::mem::take(&mut chunk), style));
            rows.push(Row::from(std::mem::take(&mut spans)));
            spans.push(Span::raw(" ".repeat(indent)));
            used = indent;
        }
        chunk.push_str(g);
        used += w;
    }
    spans.push(Span::styled(chunk, style));
    rows.push(Row::from(spans));
    rows
}

/// A stable colour per key. A name that looks like a pinned name of
/// another key never gets that name's colour, so that `a1ice` cannot pass
/// for `alice` by colour either.
pub(crate) fn nick_colour(app: &App, name: &str, key: Option<PublicKey>) -> Color {
    // Not std's hasher: its output may change between Rust releases, and
    // a name's colour should not.
    let base = |bytes: &[u8]| {
        let hash = bytes
            .iter()
            .fold(0u32, |h, &b| h.wrapping_mul(31).wrapping_add(u32::from(b)));
        hash as usize % PALETTE.len()
    };
    let Some(key) = key else {
        return PALETTE[base(fold_name(name).as_bytes())];
    };
    let skeleton = name_skeleton(name);
    let taken: Vec<usize> = app
        .pins
        .iter()
        .filter(|(pinned_name, pinned_key)| {
            **pinned_key != key && name_skeleton(pinned_name) == skeleton
        })
        .map(|(_, pinned_key)| base(pinned_key.as_bytes()))
        .collect();
    let start = base(key.as_bytes());
    (0..PALETTE.len())
        .map(|step| (start + step) % PALETTE.len())
        .find(|i| !taken.contains(i))
        .map_or(PALETTE[start], |i| PALETTE[i])
}
