//! The full-screen UI's threads: one owns the terminal and draws the
//! [`App`], one reads keys. The loop only sends them updates over a
//! channel, so that heartbeats, acknowledgements and links never wait for
//! the screen, slow or suspended as it may be; frames are drawn at most
//! once per [`FRAME`], however many updates come.

use std::io::{self, Write};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use mio::Waker;
use peerchat_peer::store::Screen;
use peerchat_peer::tui::{render, App, Effect, Update};
use ratatui::backend::CrosstermBackend;
use ratatui::crossterm::event::{
    self, DisableBracketedPaste, DisableMouseCapture, EnableBracketedPaste, EnableMouseCapture,
    Event as TermEvent,
};
use ratatui::crossterm::execute;
use ratatui::crossterm::terminal::{
    disable_raw_mode, enable_raw_mode, EnterAlternateScreen, LeaveAlternateScreen,
};
use ratatui::layout::Rect;
use ratatui::Terminal;

use crate::terminal::{self, Input};

/// The shortest time between two frames.
const FRAME: Duration = Duration::from_millis(16);

/// Updates taken in one go before a frame is considered: a flood is drawn
/// now and then, not only once it ends.
const UPDATES_PER_FRAME: usize = 4096;

enum Msg {
    /// An update, shown once `Shown` reaches its number.
    Update(u64, Update),
    Shown(u64),
    Term(TermEvent),
    /// The process was continued after a stop from outside.
    Resumed,
    Close,
}

/// The loop's handle on the UI.
pub struct Ui {
    tx: Sender<Msg>,
    seq: u64,
    thread: Option<JoinHandle<()>>,
    resume: Option<signal_hook::iterator::Handle>,
}

impl Ui {
    /// Takes over the terminal: raw mode, the alternate screen, bracketed
    /// paste and the mouse. What the user enters goes to `input`.
    pub fn start(app: App, input: Sender<Input>, waker: Arc<Waker>) -> io::Result<Ui> {
        let (tx, rx) = mpsc::channel();
        enter()?;
        terminal::full_screen_on();
        let backend = CrosstermBackend::new(io::stdout());
        let terminal = Terminal::new(backend)?;
        let keys = tx.clone();
        std::thread::Builder::new()
            .name("keys".into())
            .spawn(move || {
                while let Ok(event) = event::read() {
                    if keys.send(Msg::Term(event)).is_err() {
                        return;
                    }
                }
            })?;
        let mut signals = signal_hook::iterator::Signals::new([libc::SIGCONT])?;
        let resume = signals.handle();
        let resumed = tx.clone();
        std::thread::Builder::new()
            .name("resume".into())
            .spawn(move || {
                for _ in signals.forever() {
                    if resumed.send(Msg::Resumed).is_err() {
                        return;
                    }
                }
            })?;
        let thread = std::thread::Builder::new()
            .name("ui".into())
            .spawn(move || {
                let _quit = QuitOnExit(input.clone(), waker.clone());
                run(app, terminal, &rx, &input, &waker);
            })?;
        Ok(Ui {
            tx,
            seq: 0,
            thread: Some(thread),
            resume: Some(resume),
        })
    }

    /// Sends an update; it shows once [`Ui::shown`] reaches the number
    /// returned.
    pub fn update(&mut self, update: Update) -> u64 {
        self.seq += 1;
        let _ = self.tx.send(Msg::Update(self.seq, update));
        self.seq
    }

    pub fn shown(&self, seq: u64) {
        let _ = self.tx.send(Msg::Shown(seq));
    }

    /// Where the store's thread says what it committed: the numbers of
    /// the updates it holds lines for (see `PeerHost::shown`).
    pub fn screen(&self) -> UiScreen {
        UiScreen(self.tx.clone())
    }

    /// Gives the terminal back as it was; waits at most a second for it.
    pub fn finish(&mut self) {
        if let Some(resume) = self.resume.take() {
            resume.close();
        }
        let _ = self.tx.send(Msg::Close);
        let deadline = Instant::now() + Duration::from_secs(1);
        if let Some(thread) = self.thread.take() {
            while !thread.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if thread.is_finished() {
                let _ = thread.join();
            }
        }
        // If the thread is stuck, the terminal is still restored.
        let _ = leave();
    }
}

/// Whichever way the UI's thread ends (a panic included), the peer leaves
/// too: without its screen nobody would see it, or be able to stop it.
struct QuitOnExit(Sender<Input>, Arc<Waker>);

impl Drop for QuitOnExit {
    fn drop(&mut self) {
        if self.0.send(Input::Interrupt).is_ok() {
            let _ = self.1.wake();
        }
    }
}

/// The store's thread's screen in UI mode: each "line" it shows is the
/// number of an update, which may show now that its records are written.
pub struct UiScreen(Sender<Msg>);

impl Screen for UiScreen {
    fn room(&mut self) -> usize {
        usize::MAX
    }

    fn show(&mut self, text: &str) {
        if let Some(seq) = text.lines().filter_map(|l| l.parse().ok()).max() {
            let _ = self.0.send(Msg::Shown(seq));
        }
    }
}

fn run(
    mut app: App,
    mut terminal: Terminal<CrosstermBackend<io::Stdout>>,
    rx: &Receiver<Msg>,
    input: &Sender<Input>,
    waker: &Waker,
) {
    let mut last_frame: Option<Instant> = None;
    let mut open = true;
    while open {
        let wait = match last_frame {
            Some(at) if app.dirty => FRAME.saturating_sub(at.elapsed()),
            None => Duration::ZERO,
            // A countdown in the status bar moves every second.
            Some(_) => Duration::from_secs(1),
        };
        let first = match rx.recv_timeout(wait) {
            Ok(msg) => Some(msg),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => break,
        };
        if app.counting_down() {
            app.dirty = true;
        }
        let mut effects = Vec::new();
        for msg in first
            .into_iter()
            .chain(std::iter::from_fn(|| rx.try_recv().ok()).take(UPDATES_PER_FRAME))
        {
            let (now, wall) = (Instant::now(), SystemTime::now());
            match msg {
                Msg::Update(seq, update) => app.hold(seq, update, now, wall),
                Msg::Shown(seq) => app.shown(seq, now, wall),
                Msg::Term(event) => effects.extend(app.input(event, wall)),
                Msg::Resumed => effects.push(Effect::Redraw),
                Msg::Close => {
                    open = false;
                    break;
                }
            }
        }
        effects.extend(app.backlog_wanted());
        let mut for_the_loop = false;
        for effect in effects {
            for_the_loop |= !matches!(effect, Effect::Suspend | Effect::Redraw);
            let sent = match effect {
                Effect::Send(line) => input.send(Input::Line(line)),
                Effect::Remember(line) => input.send(Input::Remember(line)),
                Effect::Quit => input.send(Input::Interrupt),
                Effect::Suspend => {
                    suspend();
                    redraw(&mut terminal);
                    Ok(())
                }
                Effect::Redraw => {
                    redraw(&mut terminal);
                    Ok(())
                }
            };
            if sent.is_err() {
                open = false;
            }
            app.dirty = true;
        }
        if for_the_loop && waker.wake().is_err() {
            tracing::error!("cannot wake the event loop; input may wait");
        }
        let due = last_frame.is_none_or(|at| at.elapsed() >= FRAME);
        if open && app.dirty && due {
            let now = Instant::now();
            if let Err(e) = terminal.draw(|frame| render::draw(frame, &mut app, now)) {
                tracing::warn!(error = %e, "cannot draw the screen");
            }
            last_frame = Some(now);
            if std::mem::take(&mut app.bell) {
                let mut out = io::stdout().lock();
                let _ = out.write_all(b"\x07").and_then(|()| out.flush());
            }
        }
    }
    let _ = leave();
}

/// Puts the UI's modes back (after a stop from outside the shell may have
/// reset them) and draws everything again.
fn redraw(terminal: &mut Terminal<CrosstermBackend<io::Stdout>>) {
    // Not `Terminal::clear`: it asks the terminal where the cursor is, and
    // the answer would go to the key thread, which holds crossterm's
    // reader. A resize to the same size clears and redraws everything.
    let full = |terminal: &mut Terminal<_>| {
        let size = terminal.size()?;
        terminal.resize(Rect::new(0, 0, size.width, size.height))
    };
    if let Err(e) = enter().and_then(|()| full(terminal)) {
        tracing::warn!(error = %e, "cannot take the terminal back");
    }
}

fn enter() -> io::Result<()> {
    enable_raw_mode()?;
    execute!(
        io::stdout(),
        EnterAlternateScreen,
        EnableBracketedPaste,
        EnableMouseCapture
    )
}

fn leave() -> io::Result<()> {
    execute!(
        io::stdout(),
        DisableMouseCapture,
        DisableBracketedPaste,
        LeaveAlternateScreen,
        ratatui::crossterm::cursor::Show
    )?;
    disable_raw_mode()
}

/// Ctrl-Z: the terminal as the shell left it, then the stop the key would
/// have made outside raw mode; returns once continued (`fg`).
fn suspend() {
    let _ = leave();
    // SAFETY: raising a signal whose default action stops the process.
    unsafe {
        libc::raise(libc::SIGTSTP);
    }
}
