//! The human front end: turns events into readable lines, and reads what
//! the user types. On a terminal, rustyline keeps the input line intact
//! while messages arrive (it redraws the prompt below each printed line);
//! from a pipe or a file, lines are read plainly.

use std::io::{self, BufRead, IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, PoisonError};

use mio::Waker;
use peerchat_peer::human::wrap;
use peerchat_peer::store::Screen;
use rustyline::error::ReadlineError;
use rustyline::ExternalPrinter;
use rustyline::{
    Cmd, ConditionalEventHandler, Event, EventContext, EventHandler, KeyEvent, RepeatCount,
};

/// One thing from the input thread.
pub enum Input {
    Line(String),
    /// A line the user typed in the full-screen UI, for the input history
    /// kept in the store.
    Remember(String),
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
    /// Lines go to stdout as they are, not above a line editor's prompt.
    plain: bool,
    lines: Option<Sender<String>>,
    writer: Option<std::thread::JoinHandle<()>>,
    /// The resume watcher, which holds a sender of `lines` too: closed
    /// first, or the writer would wait for it forever.
    resume: Option<signal_hook::iterator::Handle>,
}

enum Sink {
    /// Plain stdout: a pipe, a file, or `--json`.
    Plain,
    /// Above rustyline's prompt.
    Prompt(Box<dyn ExternalPrinter + Send>),
}

impl Output {
    fn start(mut sink: Sink) -> io::Result<Output> {
        let plain = matches!(sink, Sink::Plain);
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
                            let mut rows = wrap(&text, terminal_columns()).join("\n");
                            rows.push('\n');
                            printer.print(rows).map_err(io::Error::other)
                        }
                    };
                    // A reader that went away is no reason to stop chatting.
                    if written.is_err() {
                        tracing::debug!("output is gone; dropping what follows");
                    }
                }
            })?;
        Ok(Output {
            plain,
            lines: Some(tx),
            writer: Some(writer),
            resume: None,
        })
    }

    pub fn line(&mut self, text: &str) {
        if let Some(lines) = &self.lines {
            let _ = lines.send(text.to_string());
        }
    }

    /// Where the store's thread shows output: stdout itself, or this
    /// thread when the line editor owns the terminal.
    pub fn screen(&self) -> Printer {
        Printer {
            forward: (!self.plain).then(|| self.lines.clone()).flatten(),
        }
    }

    /// Writes out everything sent so far; the process is about to exit.
    /// Waits at most a second: the line editor takes printed lines only
    /// while it waits for a key, and a user in the middle of a history
    /// search (Ctrl-R) must not keep the process from exiting.
    pub fn finish(&mut self) {
        if let Some(resume) = self.resume.take() {
            resume.close();
        }
        self.lines = None;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
        if let Some(writer) = self.writer.take() {
            while !writer.is_finished() && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            if writer.is_finished() {
                let _ = writer.join();
            } else {
                tracing::warn!("output still waiting after 1 s at exit; leaving without it");
            }
        }
    }
}

/// Output from the store's thread (see `peerchat_peer::store::Screen`).
pub struct Printer {
    /// To the output thread, which prints above the line editor's prompt.
    forward: Option<Sender<String>>,
}

impl Screen for Printer {
    fn room(&mut self) -> usize {
        if self.forward.is_some() {
            return usize::MAX;
        }
        wait_writable(libc::STDOUT_FILENO);
        pipe_room(libc::STDOUT_FILENO).unwrap_or(usize::MAX)
    }

    fn show(&mut self, text: &str) {
        match &self.forward {
            Some(lines) => {
                for line in text.lines() {
                    let _ = lines.send(line.to_string());
                }
            }
            None => {
                // One write: what `room` allowed goes whole, or not at all.
                let mut out = io::stdout().lock();
                let written = out.write_all(text.as_bytes()).and_then(|()| out.flush());
                // A reader that went away is no reason to stop chatting.
                if written.is_err() {
                    tracing::debug!("output is gone; dropping what follows");
                }
            }
        }
    }
}

/// Waits until `fd` takes a write of `PIPE_BUF` bytes without blocking (at
/// once for a file or a terminal; for a pipe, once its reader made room).
/// An error (a reader gone) returns too: the write then fails and says so.
fn wait_writable(fd: libc::c_int) {
    let mut poll = libc::pollfd {
        fd,
        events: libc::POLLOUT,
        revents: 0,
    };
    loop {
        // SAFETY: one pollfd we own, for the duration of the call.
        let ready = unsafe { libc::poll(&mut poll, 1, -1) };
        if ready >= 0 || io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return;
        }
    }
}

/// The free room of `fd` if it is a pipe: its size less what waits in it.
/// `None` for anything else, which takes any write without waiting long.
fn pipe_room(fd: libc::c_int) -> Option<usize> {
    // SAFETY: fstat fills the struct we own; fcntl and ioctl read `fd` and
    // write one int we own.
    unsafe {
        let mut stat: libc::stat = std::mem::zeroed();
        if libc::fstat(fd, &mut stat) != 0 || stat.st_mode & libc::S_IFMT != libc::S_IFIFO {
            return None;
        }
        let size = libc::fcntl(fd, libc::F_GETPIPE_SZ);
        let mut waiting: libc::c_int = 0;
        if size < 0 || libc::ioctl(fd, libc::FIONREAD, &mut waiting) != 0 {
            return None;
        }
        usize::try_from(size - waiting).ok()
    }
}

/// The width of the terminal on stdout; 0 if unknown.
fn terminal_columns() -> usize {
    // SAFETY: TIOCGWINSZ fills the struct we own; fd 1 is stdout.
    let mut size: libc::winsize = unsafe { std::mem::zeroed() };
    if unsafe { libc::ioctl(1, libc::TIOCGWINSZ, &mut size) } == 0 {
        usize::from(size.ws_col)
    } else {
        0
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
        let suspended = Arc::new(Mutex::new(None));
        let editing = Arc::new(AtomicBool::new(false));
        let editing_now = editing.clone();
        editor.bind_sequence(
            KeyEvent::ctrl('Z'),
            EventHandler::Conditional(Box::new(SuspendKey(suspended.clone()))),
        );
        std::thread::Builder::new()
            .name("input".into())
            .spawn(move || {
                let mut draft = (String::new(), String::new());
                loop {
                    editing_now.store(true, Ordering::SeqCst);
                    let read = editor.readline_with_initial("> ", (&draft.0, &draft.1));
                    editing_now.store(false, Ordering::SeqCst);
                    draft = Default::default();
                    let inputs = match read {
                        // A bracketed paste arrives as one "line" holding
                        // newlines: each line of it counts as typed.
                        Ok(block) => block
                            .split(['\n', '\r'])
                            .filter(|line| !line.trim().is_empty())
                            .map(|line| {
                                let _ = editor.add_history_entry(line);
                                Input::Line(line.to_string())
                            })
                            .collect(),
                        Err(ReadlineError::Interrupted) => match take(&suspended) {
                            Some(kept) => {
                                draft = kept;
                                suspend();
                                continue;
                            }
                            // Ctrl-C leaves, as /quit does.
                            None => vec![Input::Interrupt],
                        },
                        // So does Ctrl-D.
                        Err(ReadlineError::Eof) => vec![Input::Interrupt],
                        Err(e) => {
                            tracing::warn!(error = %e, "reading the terminal failed");
                            vec![Input::Interrupt]
                        }
                    };
                    let last = matches!(inputs.last(), Some(Input::Interrupt));
                    for input in inputs {
                        if tx.send(input).is_err() {
                            return;
                        }
                    }
                    if waker.wake().is_err() || last {
                        return;
                    }
                }
            })?;
        let mut out = Output::start(Sink::Prompt(Box::new(printer)))?;
        if let Some(lines) = &out.lines {
            out.resume = Some(watch_resume(editing, lines.clone())?);
        }
        return Ok(out);
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

/// The line being edited when Ctrl-Z was pressed, split at the cursor.
type Draft = (String, String);

/// Ctrl-Z, taken from the line editor: it would stop the process from
/// inside its raw mode and, once resumed, leave the terminal as the shell
/// set it (cooked, echoing) until the next Enter. Instead the editor ends
/// its line (restoring the terminal), the process stops, and on `fg` the
/// editor starts again with the draft intact.
struct SuspendKey(Arc<Mutex<Option<Draft>>>);

impl ConditionalEventHandler for SuspendKey {
    fn handle(&self, _: &Event, _: RepeatCount, _: bool, ctx: &EventContext) -> Option<Cmd> {
        let (left, right) = ctx.line().split_at(ctx.pos());
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) =
            Some((left.to_string(), right.to_string()));
        Some(Cmd::Interrupt)
    }
}

fn take(suspended: &Mutex<Option<Draft>>) -> Option<Draft> {
    suspended
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .take()
}

/// Stops the process as the terminal's suspend key would, once the editor
/// has handed the terminal back; returns when the shell continues it.
fn suspend() {
    let mut out = io::stdout().lock();
    // The prompt line is left blank for the shell's "Stopped" line.
    let _ = out.write_all(b"\r\x1b[K").and_then(|()| out.flush());
    drop(out);
    // SAFETY: raising a signal whose default action stops the process.
    unsafe {
        libc::raise(libc::SIGTSTP);
    }
}

/// A stop from outside (`kill -TSTP`, or the shell's `kill %1`) catches
/// the line editor in raw mode; the shell then resets the terminal, and on
/// `fg` the editor would read a cooked, echoing terminal. When the process
/// is continued while the editor is reading, this thread puts the editor's
/// raw mode back and has it redraw its line (an empty line printed above
/// the prompt).
fn watch_resume(
    editing: Arc<AtomicBool>,
    redraw: Sender<String>,
) -> io::Result<signal_hook::iterator::Handle> {
    let mut signals = signal_hook::iterator::Signals::new([libc::SIGCONT])?;
    let handle = signals.handle();
    std::thread::Builder::new()
        .name("resume".into())
        .spawn(move || {
            for _ in signals.forever() {
                if editing.load(Ordering::SeqCst) && set_editor_mode() {
                    let _ = redraw.send(String::new());
                }
            }
        })?;
    Ok(handle)
}

/// Puts the terminal in the line editor's raw mode: the settings saved at
/// start with the changes rustyline makes when it begins a line (we cannot
/// ask it to redo them). Whether it worked.
fn set_editor_mode() -> bool {
    let Some(saved) = SAVED.get() else {
        return false;
    };
    let mut raw = *saved;
    raw.c_iflag &= !(libc::BRKINT | libc::ICRNL | libc::INPCK | libc::ISTRIP | libc::IXON);
    raw.c_cflag |= libc::CS8;
    raw.c_lflag &= !(libc::ECHO | libc::ICANON | libc::IEXTEN | libc::ISIG);
    raw.c_cc[libc::VMIN] = 1;
    raw.c_cc[libc::VTIME] = 0;
    // SAFETY: sets stdin's terminal from a struct we own.
    unsafe { libc::tcsetattr(0, libc::TCSADRAIN, &raw) == 0 }
}

/// The terminal's settings at start, put back on every way out: a normal
/// exit, an error, a panic. The line editor's thread may still be inside
/// `readline` (in raw mode) when the process ends.
pub struct TerminalGuard;

/// The settings read at start, for the panic hook (which has no other way
/// to reach them).
static SAVED: std::sync::OnceLock<libc::termios> = std::sync::OnceLock::new();

/// The full-screen UI took the terminal: restoring also leaves its
/// alternate screen and gives the mouse back.
static FULL_SCREEN: AtomicBool = AtomicBool::new(false);

pub fn full_screen_on() {
    FULL_SCREEN.store(true, Ordering::SeqCst);
}

impl TerminalGuard {
    /// Saves the settings of the terminal on stdin, if it is one, and makes
    /// a panic restore them before its message is printed.
    pub fn save() -> TerminalGuard {
        if io::stdin().is_terminal() {
            // SAFETY: tcgetattr fills the struct we own; fd 0 is stdin.
            let mut termios: libc::termios = unsafe { std::mem::zeroed() };
            if unsafe { libc::tcgetattr(0, &mut termios) } == 0 && SAVED.set(termios).is_ok() {
                let report = std::panic::take_hook();
                std::panic::set_hook(Box::new(move |info| {
                    restore();
                    report(info);
                }));
            }
        }
        TerminalGuard
    }
}

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        restore();
    }
}

/// Puts the saved settings back and clears the prompt left on the last line.
fn restore() {
    let Some(termios) = SAVED.get() else { return };
    // SAFETY: hands back the settings read at start.
    unsafe {
        libc::tcsetattr(0, libc::TCSANOW, termios);
    }
    if io::stdout().is_terminal() {
        // Also ends bracketed paste and synchronized output, which the
        // line editor turns on for each line it reads.
        let mut out = io::stdout().lock();
        if FULL_SCREEN.load(Ordering::SeqCst) {
            // Mouse reports off (every mode a terminal may have been put
            // in), the main screen back, the cursor shown.
            let _ = out.write_all(
                b"\x1b[?1000l\x1b[?1002l\x1b[?1003l\x1b[?1006l\x1b[?1015l\x1b[?1049l\x1b[?25h",
            );
        }
        let _ = out
            .write_all(b"\x1b[?2004l\x1b[?2026l\r\x1b[K")
            .and_then(|()| out.flush());
    }
}
