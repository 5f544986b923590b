//! The human front end: turns events into readable lines, and reads what
//! the user types. On a terminal, rustyline keeps the input line intact
//! while messages arrive (it redraws the prompt below each printed line);
//! from a pipe or a file, lines are read plainly.

use std::io::{self, BufRead, IsTerminal, Write};
use std::sync::mpsc::Sender;
use std::sync::Arc;

use mio::Waker;
use peerchat_peer::peer::Event;
use rustyline::error::ReadlineError;
use rustyline::ExternalPrinter;

/// One thing from the input thread.
pub enum Input {
    Line(String),
    /// A line that was not UTF-8.
    Garbled,
    /// The end of piped input: it comes after every line before it.
    Eof,
    /// Ctrl-C or Ctrl-D at the terminal: the user wants out now.
    Interrupt,
}

/// Where output goes: a thread that writes it, so that a reader who stops
/// reading (a stalled pipe) never stops the loop from heartbeating and
/// acknowledging. Lines wait in memory meanwhile.
pub struct Output {
    lines: Option<Sender<String>>,
    writer: Option<std::thread::JoinHandle<()>>,
}

enum Sink {
    /// Plain stdout: a pipe, a file, or `--json`.
    Plain,
    /// Above rustyline's prompt.
    Prompt(Box<dyn ExternalPrinter + Send>),
}

impl Output {
    fn start(mut sink: Sink) -> io::Result<Output> {
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let writer = std::thread::Builder::new()
            .name("output".into())
            .spawn(move || {
                let mut batch = String::new();
                while let Ok(text) = rx.recv() {
                    let written = match &mut sink {
                        Sink::Plain => {
                            // Everything already waiting goes out in one
                            // write: a burst of events costs one syscall.
                            batch.clear();
                            batch.push_str(&text);
                            batch.push('\n');
                            while batch.len() < 64 * 1024 {
                                let Ok(more) = rx.try_recv() else { break };
                                batch.push_str(&more);
                                batch.push('\n');
                            }
                            let mut out = io::stdout().lock();
                            out.write_all(batch.as_bytes()).and_then(|()| out.flush())
                        }
                        Sink::Prompt(printer) => {
                            printer.print(format!("{text}\n")).map_err(io::Error::other)
                        }
                    };
                    // A reader that went away is no reason to stop chatting.
                    if written.is_err() {
                        tracing::debug!("output is gone; dropping what follows");
                    }
                }
            })?;
        Ok(Output {
            lines: Some(tx),
            writer: Some(writer),
        })
    }

    pub fn line(&mut self, text: &str) {
        if let Some(lines) = &self.lines {
            let _ = lines.send(text.to_string());
        }
    }

    /// Writes out everything sent so far; the process is about to exit.
    pub fn finish(&mut self) {
        self.lines = None;
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

/// Starts the thread that reads input and wakes the loop for each line.
/// Uses line editing when stdin and stdout are a terminal and `plain` is
/// not forced.
pub fn spawn_input(tx: Sender<Input>, waker: Arc<Waker>, plain: bool) -> io::Result<Output> {
    let interactive = !plain && io::stdin().is_terminal() && io::stdout().is_terminal();
    if interactive {
        let mut editor = rustyline::DefaultEditor::new().map_err(io::Error::other)?;
        let printer = editor.create_external_printer().map_err(io::Error::other)?;
        std::thread::Builder::new()
            .name("input".into())
            .spawn(move || loop {
                let input = match editor.readline("> ") {
                    Ok(line) => {
                        let _ = editor.add_history_entry(line.as_str());
                        Input::Line(line)
                    }
                    // Ctrl-C and Ctrl-D leave, as /quit does.
                    Err(ReadlineError::Interrupted | ReadlineError::Eof) => Input::Interrupt,
                    Err(e) => {
                        tracing::warn!(error = %e, "reading the terminal failed");
                        Input::Interrupt
                    }
                };
                let last = matches!(input, Input::Interrupt);
                if tx.send(input).is_err() || waker.wake().is_err() || last {
                    return;
                }
            })?;
        return Output::start(Sink::Prompt(Box::new(printer)));
    }
    // Ctrl-D typed at a terminal (with --json, or with output to a pipe)
    // is the user wanting out, not the end of a script.
    let typed = io::stdin().is_terminal();
    std::thread::Builder::new()
        .name("input".into())
        .spawn(move || {
            let mut stdin = io::stdin().lock();
            let mut buf = Vec::new();
            loop {
                buf.clear();
                let input = match stdin.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) if typed => Input::Interrupt,
                    Ok(0) | Err(_) => Input::Eof,
                    Ok(_) => {
                        if buf.last() == Some(&b'\n') {
                            buf.pop();
                        }
                        match String::from_utf8(std::mem::take(&mut buf)) {
                            Ok(line) => Input::Line(line),
                            Err(_) => Input::Garbled,
                        }
                    }
                };
                let last = matches!(input, Input::Eof | Input::Interrupt);
                if tx.send(input).is_err() || waker.wake().is_err() || last {
                    return;
                }
            }
        })?;
    Output::start(Sink::Plain)
}

/// The local wall-clock time as `HH:MM:SS`.
fn clock() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let secs = libc::time_t::try_from(now).unwrap_or(0);
    // SAFETY: localtime_r writes only into the struct we own.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    let ok = unsafe { !libc::localtime_r(&secs, &mut tm).is_null() };
    if ok {
        format!("{:02}:{:02}:{:02}", tm.tm_hour, tm.tm_min, tm.tm_sec)
    } else {
        let day = now % 86_400;
        format!("{:02}:{:02}:{:02}", day / 3600, day / 60 % 60, day % 60)
    }
}

fn names(peers: &[peerchat_core::protocol::PeerEntry]) -> String {
    if peers.is_empty() {
        return "nobody else is online".into();
    }
    let list: Vec<String> = peers
        .iter()
        .map(|p| format!("{} ({})", p.name, p.addr))
        .collect();
    format!("{} online: {}", peers.len(), list.join(", "))
}

/// The line a person reads for an event; `None` for the ones left quiet.
pub fn human(event: &Event) -> Option<String> {
    Some(match event {
        Event::Registered {
            name, addr, peers, ..
        } => {
            format!("* registered as {name} at {addr}; {}", names(peers))
        }
        Event::Joined { name, addr, .. } => format!("* {name} joined ({addr})"),
        Event::Left { name, reason } => format!("* {name} left ({reason})"),
        Event::Moved { name, addr } => format!("* {name} moved to {addr}"),
        Event::Peers { peers } => format!("* {}", names(peers)),
        Event::Message {
            from, text, direct, ..
        } => {
            let to_me = if *direct { " (to you)" } else { "" };
            format!("[{}] <{from}>{to_me} {text}", clock())
        }
        Event::Sent { to, .. } if to.is_empty() => {
            "! nobody else is online; the message went nowhere".into()
        }
        Event::Sent { .. } | Event::Delivered { .. } => return None,
        Event::Undelivered { id, to, reason } => {
            format!("! message {id} to {to} was not delivered ({reason})")
        }
        Event::RegistryLost { error, retry_in_ms } => {
            format!("! registry lost ({error}), retrying in {retry_in_ms} ms; chat goes on")
        }
        Event::Error { code, message } => format!("! {code}: {message}"),
        Event::Whois { name, key, pinned } => {
            let trust = if *pinned {
                "pinned in known_peers"
            } else {
                "not pinned yet"
            };
            format!("* {name}: key {key} ({trust})")
        }
    })
}

/// How a sent message is echoed back to its author.
pub fn echo(text: &str, me: &str, to: Option<&str>) -> String {
    match to {
        Some(to) => format!("[{}] <{me}> (to {to}) {text}", clock()),
        None => format!("[{}] <{me}> {text}", clock()),
    }
}
