//! The `peer` binary: command line, the front ends (human or `--json`), and
//! the host around the sans-IO [`Peer`], which core's driver runs on the
//! event loop.

mod screen;
mod terminal;

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::io::IsTerminal;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::mpsc;
use std::time::{Duration, SystemTime};

use clap::CommandFactory;
use peerchat_core::identity::{self, Identity, PublicKey};
use peerchat_core::machine::{Driver, Host, HostCtx};
use peerchat_core::protocol::{self, normalize_name};
use peerchat_core::secure::NoiseConfig;
use peerchat_core::{EventLoop, LoopConfig};
use peerchat_peer::args::Args;
use peerchat_peer::command::{self, Command};
use peerchat_peer::disk::DiskThread;
use peerchat_peer::human::View;
use peerchat_peer::journal::{Query, Saved};
use peerchat_peer::peer::{
    Config, Event, FilesConfig, HostOutput, Peer, Pin, RegistryTrust, Trust,
};
use peerchat_peer::store::{self, Item, Reply, Store, StoreThread};
use peerchat_peer::trust::{self, KnownPeers};
use peerchat_peer::tui::{App, Update};
use screen::Ui;
use terminal::{Input, Output, TerminalGuard};

/// Where what the peer says goes.
enum Front {
    /// `--json`: one object per line.
    Json(Output),
    /// Lines of text: `--plain`, or not on a terminal.
    Lines(Output, View),
    /// The full-screen UI.
    Tui(Ui),
}

/// What the binary adds around the peer machine: the input thread's lines,
/// the front end, the pins file and the exit status.
struct PeerHost {
    front: Front,
    input: mpsc::Receiver<Input>,
    /// Input taken off the channel before the peer took input.
    held: VecDeque<Input>,
    /// The peer has taken input since the first registration attempt ended.
    input_open: bool,
    /// What the user typed, by the id the peer gave it: echoed with its
    /// `sent`.
    echo: HashMap<u64, (String, Option<String>)>,
    /// The store's thread; `None` with `--no-store`.
    store: Option<StoreThread>,
    /// The thread that reads and writes the files of transfers; taken at
    /// exit.
    disk: Option<DiskThread>,
    /// Queries asked of the store, by tag, to show their answers as.
    queries: HashMap<u64, Query>,
    next_query: u64,
    /// With a store: this turn's records and lines, and its batch, handed
    /// to the store's thread together when the turn ends.
    turn: Vec<Item>,
    turn_batch: Option<u64>,
    turn_ending: bool,
    exit: Option<i32>,
    /// The last error the full-screen UI showed: printed on stderr once
    /// it has given the terminal back, if the peer exits with an error.
    farewell: Option<String>,
    known_peers: PathBuf,
    /// The registry as named on the command line: its pin's subject.
    registry_name: String,
}

impl PeerHost {
    fn show(&mut self, event: Event) {
        let lines = match &mut self.front {
            Front::Json(_) => match serde_json::to_string(&event) {
                Ok(line) => vec![line],
                Err(e) => {
                    tracing::error!(error = %e, "cannot encode an event");
                    return;
                }
            },
            Front::Lines(_, view) => {
                let now = SystemTime::now();
                let mut lines = Vec::new();
                if let Event::Sent { id, to } = &event {
                    if let Some((text, direct_to)) = self.echo.remove(id) {
                        if !to.is_empty() {
                            lines.extend(view.echo(&text, direct_to.as_deref(), now));
                        }
                    }
                }
                lines.extend(view.event(&event, now));
                lines
            }
            Front::Tui(_) => {
                if let Event::Error { code, message } = &event {
                    self.farewell = Some(format!("{code}: {message}"));
                }
                let update = match event {
                    Event::Sent { id, to } => match self.echo.remove(&id) {
                        Some((text, direct_to)) => Update::Own {
                            id,
                            text,
                            to: direct_to,
                            targets: to,
                        },
                        None => return,
                    },
                    event => Update::Event(event),
                };
                self.update(update);
                return;
            }
        };
        for line in lines {
            self.line(line);
        }
    }

    /// An update for the UI, shown once the records before it are written.
    fn update(&mut self, update: Update) {
        let Front::Tui(ui) = &mut self.front else {
            return;
        };
        let seq = ui.update(update);
        match &self.store {
            // The store's thread shows it by its number (`screen::UiScreen`).
            Some(_) => self.turn.push(Item::Line(seq.to_string())),
            None => ui.shown(seq),
        }
    }

    /// Through the store's thread when there is one, so that a line follows
    /// the records of its turn (see `store`).
    fn line(&mut self, line: String) {
        match (&self.store, &mut self.front) {
            (Some(_), _) => self.turn.push(Item::Line(line)),
            (None, Front::Json(out) | Front::Lines(out, _)) => out.line(&line),
            (None, Front::Tui(_)) => {}
        }
    }

    /// Lines shown without the store's thread: it is gone.
    fn show_now(&mut self, items: Vec<Item>) {
        for item in items {
            match (item, &mut self.front) {
                (Item::Line(line), Front::Json(out) | Front::Lines(out, _)) => out.line(&line),
                (Item::Line(seq), Front::Tui(ui)) => {
                    if let Ok(seq) = seq.parse() {
                        ui.shown(seq);
                    }
                }
                _ => {}
            }
        }
    }

    /// Hands the turn to the store's thread. One that is gone gives it back:
    /// its lines are shown all the same, and the peer stops.
    fn end_store_turn(&mut self, ctx: &mut HostCtx<Peer, Self>) {
        let Some(store) = &self.store else {
            return;
        };
        let batch = self.turn_batch.take();
        if self.turn.is_empty() && batch.is_none() {
            return;
        }
        if let Err(items) = store.turn(std::mem::take(&mut self.turn), batch) {
            self.show_now(items);
            self.store_failed(ctx, "the store's thread stopped".into());
        }
    }

    fn save_pin(&mut self, pin: &Pin) {
        let line = match pin {
            Pin::Peer { name, key } => trust::pin_line("peer", name, key),
            Pin::Registry(key) => trust::pin_line("registry", &self.registry_name, key),
        };
        let saved = match line {
            Some(line) => trust::append(&self.known_peers, &line),
            None => Err(std::io::Error::other("the name does not fit on one line")),
        };
        if let Err(e) = saved {
            self.show(Event::Error {
                code: "io".into(),
                message: format!(
                    "cannot pin a key in {}: {e}; it is trusted for this run only",
                    self.known_peers.display()
                ),
            });
        }
    }

    fn on_line(&mut self, peer: &mut Peer, line: &str, now: std::time::Instant) {
        match command::parse(line) {
            Ok(None) => {}
            Ok(Some(cmd)) => {
                let echo = match &cmd {
                    Command::Broadcast(text) => Some((text.clone(), None)),
                    Command::Direct { to, text } => Some((text.clone(), Some(to.clone()))),
                    _ => None,
                };
                let id = peer.command(cmd, now, SystemTime::now());
                if let (Some(id), Some(echo)) = (id, echo) {
                    self.echo.insert(id, echo);
                }
            }
            Err(err) => self.show(Event::Error {
                code: err.code.into(),
                message: err.message,
            }),
        }
    }

    /// Ends the run with `code` (the first one given stands).
    fn stop(&mut self, ctx: &mut HostCtx<Peer, Self>, code: i32) {
        self.exit.get_or_insert(code);
        // Long enough to flush a leave message, no longer.
        ctx.stop(Duration::from_millis(500));
    }

    fn take_replies(&mut self, ctx: &mut HostCtx<Peer, Self>, peer: &mut Peer) {
        while let Some(reply) = self.store.as_ref().and_then(StoreThread::try_reply) {
            match reply {
                Reply::Committed(batch) => peer.committed(batch, ctx.now()),
                Reply::Answer { tag, result } => {
                    let Some(query) = self.queries.remove(&tag) else {
                        continue;
                    };
                    let event = match (result, query) {
                        (Ok(messages), Query::History { with, .. }) => Event::History {
                            with: with.map(|p| p.name),
                            messages,
                        },
                        (Ok(messages), Query::Search { text, .. }) => {
                            Event::Search { text, messages }
                        }
                        (Err(message), _) => Event::Error {
                            code: "store".into(),
                            message,
                        },
                    };
                    self.show(event);
                }
                Reply::Failed(message) => self.store_failed(ctx, message),
            }
        }
    }

    /// Nothing more can be recorded, so nothing more may be shown or sent:
    /// the peer exits, and what was recorded is kept for its next run.
    fn store_failed(&mut self, ctx: &mut HostCtx<Peer, Self>, message: String) {
        tracing::error!(%message, "the store failed; exiting");
        // Straight out: the store's thread shows nothing more.
        let store = self.store.take();
        self.show(Event::Error {
            code: "store".into(),
            message: format!("{message}; exiting"),
        });
        self.store = store;
        self.stop(ctx, 2);
    }
}

impl Host<Peer> for PeerHost {
    type Timer = Infallible;

    fn host_output(&mut self, ctx: &mut HostCtx<Peer, Self>, peer: &mut Peer, output: HostOutput) {
        match output {
            HostOutput::Show(event) => self.show(event),
            HostOutput::Pin(pin) => {
                self.save_pin(&pin);
                if let Pin::Peer { name, key } = pin {
                    self.update(Update::Pinned { name, key });
                }
            }
            HostOutput::Exit(code) => self.stop(ctx, code),
            HostOutput::Record(record) => match &self.store {
                Some(_) => self.turn.push(Item::Record(record)),
                None => tracing::error!("a record without a store: it is dropped"),
            },
            HostOutput::Batch(batch) => match &self.store {
                Some(_) => self.turn_batch = Some(batch),
                None => peer.committed(batch, ctx.now()),
            },
            HostOutput::Query(query) => match &self.store {
                Some(store) => {
                    self.next_query += 1;
                    match store.query(self.next_query, query.clone()) {
                        Ok(()) => {
                            self.queries.insert(self.next_query, query);
                        }
                        Err(e) => self.store_failed(ctx, e.to_string()),
                    }
                }
                None => self.show(Event::Error {
                    code: "no_store".into(),
                    message: "this peer keeps no history (it runs with --no-store)".into(),
                }),
            },
            HostOutput::Disk(op) => {
                if self
                    .disk
                    .as_ref()
                    .is_none_or(|disk| disk.request(op).is_err())
                {
                    tracing::error!("the disk thread stopped; exiting");
                    self.show(Event::Error {
                        code: "io".into(),
                        message: "the thread that reads and writes files stopped; exiting".into(),
                    });
                    self.stop(ctx, 2);
                }
            }
        }
    }

    fn on_signal(&mut self, ctx: &mut HostCtx<Peer, Self>, peer: &mut Peer, _signal: i32) {
        peer.quit(ctx.now());
    }

    /// Takes what the store answered, then a few lines a wake-up, so that
    /// sockets get their turn within a long paste or pipe.
    fn on_wake(&mut self, ctx: &mut HostCtx<Peer, Self>, peer: &mut Peer) {
        self.take_replies(ctx, peer);
        while let Some(reply) = self.disk.as_ref().and_then(DiskThread::try_reply) {
            peer.disk(reply, ctx.now());
        }
        // Until the peer takes input, what comes waits here in order; only
        // Ctrl-C or Ctrl-D at a terminal acts at once. `settled` wakes the
        // loop again when input opens.
        while !peer.takes_input() {
            match self.input.try_recv() {
                Ok(Input::Interrupt) => {
                    peer.quit(ctx.now());
                    wake(ctx);
                    return;
                }
                Ok(input) => self.held.push_back(input),
                Err(_) => return,
            }
        }
        let now = ctx.now();
        for _ in 0..LINES_PER_WAKE {
            let Some(input) = self.held.pop_front().or_else(|| self.input.try_recv().ok()) else {
                return;
            };
            match input {
                Input::Line(line) => self.on_line(peer, &line, now),
                Input::Remember(line) => {
                    if self.store.is_some() {
                        self.turn.push(Item::Typed(line));
                    }
                }
                Input::Garbled => self.show(Event::Error {
                    code: "bad_input".into(),
                    message: "that line was not UTF-8 text; it was ignored".into(),
                }),
                Input::Eof | Input::Interrupt => {
                    peer.quit(now);
                    break;
                }
            }
        }
        wake(ctx);
    }

    fn end_turn(&mut self, _ctx: &mut HostCtx<Peer, Self>, _peer: &mut Peer) {
        self.turn_ending = true;
    }

    fn settled(&mut self, ctx: &mut HostCtx<Peer, Self>, peer: &mut Peer) {
        // The machine's batch for the turn came in the outputs just acted
        // on: the turn is complete for the store's thread.
        if std::mem::take(&mut self.turn_ending) {
            self.end_store_turn(ctx);
        }
        if !self.input_open && peer.takes_input() {
            self.input_open = true;
            wake(ctx);
        }
    }
}

/// Input lines taken in one wake-up of the loop: a paste costs a loop turn
/// per this many lines, not per line, and a long one still lets the
/// sockets in between.
const LINES_PER_WAKE: usize = 64;

/// Makes the loop call `on_wake` again: to take input that waited.
fn wake(ctx: &HostCtx<Peer, PeerHost>) {
    if let Err(e) = ctx.waker().wake() {
        tracing::error!(error = %e, "cannot wake the event loop; input may wait");
    }
}

fn usage_error(message: String) -> ! {
    Args::command()
        .error(clap::error::ErrorKind::InvalidValue, message)
        .exit()
}

/// Every address of every `--registry`, each once, in the order given.
fn resolve_all(registries: &[String]) -> Vec<SocketAddr> {
    let mut all: Vec<SocketAddr> = Vec::new();
    for registry in registries {
        let addrs = match registry.to_socket_addrs() {
            Ok(addrs) => addrs.collect::<Vec<_>>(),
            Err(e) => usage_error(format!(
                "--registry {registry}: {e} (write it as HOST:PORT, e.g. 127.0.0.1:7000)"
            )),
        };
        if addrs.is_empty() {
            usage_error(format!("--registry {registry}: no address found"));
        }
        for addr in addrs {
            if !all.contains(&addr) {
                all.push(addr);
            }
        }
    }
    all
}

/// Others dial us at the IP the registry sees plus our port. With an IPv6
/// registry that IP is IPv6, which an IPv4 wildcard socket cannot accept:
/// listen on the IPv6 wildcard instead (which takes IPv4 too on Linux).
fn listen_addr(listen: SocketAddr, registry: SocketAddr) -> SocketAddr {
    if listen.ip() == IpAddr::V4(Ipv4Addr::UNSPECIFIED) && registry.is_ipv6() {
        SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), listen.port())
    } else {
        listen
    }
}

/// Sets up logging to stderr through a writer thread (a stalled stderr
/// drops log lines instead of stopping the loop). Keep the guard until exit.
fn init_logs() -> tracing_appender::non_blocking::WorkerGuard {
    // On a terminal, log lines would tear through what the user is reading
    // and typing: stay quiet unless RUST_LOG asks (then redirect stderr).
    let default = if std::io::stderr().is_terminal() {
        "off"
    } else {
        "warn"
    };
    let (writer, guard) = tracing_appender::non_blocking(std::io::stderr());
    tracing_subscriber::fmt()
        .with_writer(writer)
        .with_ansi(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default)),
        )
        .init();
    guard
}

fn seed() -> u64 {
    let mut bytes = [0u8; 8];
    if getrandom::fill(&mut bytes).is_err() {
        // Jitter and instance ids only need to differ between processes.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        return u64::from(std::process::id()) << 32 | u64::from(nanos);
    }
    u64::from_le_bytes(bytes)
}

fn fail(json: bool, code: &str, message: String) -> ExitCode {
    if json {
        let event = Event::Error {
            code: code.into(),
            message: message.clone(),
        };
        if let Ok(line) = serde_json::to_string(&event) {
            println!("{line}");
        }
    }
    eprintln!("peer: {message}");
    ExitCode::from(2)
}

/// The key file and `known_peers` paths, defaults filled in.
fn trust_paths(args: &Args) -> Result<(PathBuf, PathBuf), String> {
    let data = || {
        identity::data_home().map(|d| d.join("peerchat")).ok_or_else(|| {
            "neither XDG_DATA_HOME nor HOME is set; name files with --identity and --known-peers"
                .to_string()
        })
    };
    let key_file = match &args.identity {
        Some(path) => path.clone(),
        None => trust::key_file(&data()?, &args.name),
    };
    let known_peers = match &args.known_peers {
        Some(path) => path.clone(),
        None => data()?.join("known_peers"),
    };
    Ok((key_file, known_peers))
}

/// What `--downloads`, `--max-file-size` and `--accept-files-from` say,
/// defaults filled in.
fn files_config(args: &Args) -> Result<FilesConfig, String> {
    let downloads = match &args.downloads {
        Some(dir) => dir.clone(),
        None => dirs::download_dir()
            .or_else(|| dirs::home_dir().map(|home| home.join("Downloads")))
            .map(|dir| dir.join("peerchat"))
            .ok_or("HOME is not set; name a directory for received files with --downloads")?,
    };
    let mut accept_from = std::collections::HashSet::new();
    for name in &args.accept_files_from {
        let name =
            normalize_name(name).map_err(|why| format!("--accept-files-from {name:?}: {why}"))?;
        accept_from.insert(protocol::fold_name(&name));
    }
    Ok(FilesConfig {
        downloads,
        max_file_size: args.max_file_size,
        accept_from,
        ..FilesConfig::default()
    })
}

fn main() -> ExitCode {
    let args: Args = peerchat_core::args::parse_args();
    let logs = init_logs();
    if let Err(why) = normalize_name(&args.name) {
        return fail(
            args.json,
            why.code().as_str(),
            format!("--name {:?}: {why}", args.name),
        );
    }
    let registries = resolve_all(&args.registry);
    let registry = registries[0];
    let (key_file, known_peers_path) = match trust_paths(&args) {
        Ok(paths) => paths,
        Err(e) => return fail(args.json, "identity", e),
    };
    let files = match files_config(&args) {
        Ok(files) => files,
        Err(e) => usage_error(e),
    };
    let identity = match Identity::load_or_create(&key_file) {
        Ok((identity, created)) => {
            if created {
                eprintln!("peer: created a new key in {}", key_file.display());
            }
            identity
        }
        Err(e) => return fail(args.json, "identity", e.to_string()),
    };
    let known = match KnownPeers::load(&known_peers_path) {
        Ok(known) => known,
        Err(e) => return fail(args.json, "known_peers", e),
    };
    let opened = if args.no_store {
        None
    } else {
        let options = store::Options {
            path: args
                .store
                .clone()
                .unwrap_or_else(|| key_file.with_extension("db")),
            owner: identity.public(),
            name: args.name.trim().to_string(),
            history: !args.no_history,
        };
        match Store::open(options) {
            Ok(opened) => Some(opened),
            Err(e) => return fail(args.json, "store", e.to_string()),
        }
    };
    // The pin's subject: the registries as given, so that one cluster
    // (whose registries share a key) has one pin.
    let registry_name = args
        .registry
        .iter()
        .map(|r| r.trim())
        .collect::<Vec<_>>()
        .join(",");
    // Adding a registry to the list keeps the pin of the one before.
    let pinned_registry = known
        .registries
        .get(&registry_name)
        .or_else(|| {
            args.registry
                .iter()
                .find_map(|r| known.registries.get(r.trim()))
        })
        .copied();
    if let (Some(given), Some(pinned)) = (args.registry_key, pinned_registry) {
        if given != pinned {
            return fail(
                args.json,
                "key_mismatch",
                format!(
                    "--registry-key {given} differs from the key pinned for {registry_name} in {} ({pinned}); remove that line if the registry's key really changed",
                    known_peers_path.display()
                ),
            );
        }
    }
    if args.json {
        // Human mode shows it as the first line of its output instead.
        eprintln!("peer: your key fingerprint is {}", identity.public());
    }

    let loop_config = LoopConfig {
        handle_signals: true,
        noise: Some(NoiseConfig::new(
            identity.clone(),
            protocol::noise_prologue(),
        )),
        ..LoopConfig::default()
    };
    let mut event_loop = match EventLoop::new(loop_config) {
        Ok(l) => l,
        Err(e) => return fail(args.json, "io", format!("cannot start the event loop: {e}")),
    };
    // Any registry on IPv6 lists us at an IPv6 address.
    let v6 = registries.iter().copied().find(SocketAddr::is_ipv6);
    let local = match event_loop.listen(listen_addr(args.listen, v6.unwrap_or(registry))) {
        Ok(addr) => addr,
        Err(e) => {
            return fail(
                args.json,
                "io",
                format!("cannot listen on {}: {e}", args.listen),
            )
        }
    };
    tracing::info!(%local, "accepting links");

    let (tx, rx) = mpsc::channel();
    let terminal_guard = TerminalGuard::save();
    let full_screen = !args.json
        && !args.plain
        && std::io::stdin().is_terminal()
        && std::io::stdout().is_terminal();
    let mut config = Config::new(
        args.name.trim().to_string(),
        registry,
        local.port(),
        identity.public(),
    );
    config.fallbacks = registries[1..].to_vec();
    let pins: HashMap<String, PublicKey> = known.peers.clone();
    let trust = Trust {
        registry: match (pinned_registry, args.registry_key) {
            (Some(pinned), _) => RegistryTrust::Pinned(pinned),
            (None, Some(given)) => RegistryTrust::Given(given),
            (None, None) => RegistryTrust::FirstUse,
        },
        peers: known.peers,
    };
    config.registry_name = registry_name.clone();
    config.known_peers = known_peers_path.display().to_string();
    config.outbox_ttl = args.outbox_ttl;
    config.persistent = opened.is_some();
    config.files = files;
    let front = if full_screen {
        let typed = match &opened {
            Some((store, _)) => match store.typed() {
                Ok(typed) => typed,
                Err(e) => return fail(false, "store", e.to_string()),
            },
            None => Vec::new(),
        };
        let mut app = App::new(&config.name, identity.public(), pins, typed);
        if opened.is_none() {
            app.without_store();
        }
        match Ui::start(app, tx, event_loop.waker()) {
            Ok(ui) => Front::Tui(ui),
            Err(e) => return fail(false, "io", format!("cannot start the terminal UI: {e}")),
        }
    } else {
        let out = match terminal::spawn_input(tx, event_loop.waker(), args.json) {
            Ok(out) => out,
            Err(e) => return fail(args.json, "io", format!("cannot read input: {e}")),
        };
        if args.json {
            Front::Json(out)
        } else {
            Front::Lines(
                out,
                View::new(&config.name, &registry_name, config.backoff_max),
            )
        }
    };
    let (store, saved) = match opened {
        Some((store, saved)) => {
            let waker = event_loop.waker();
            let notify = move || {
                if let Err(e) = waker.wake() {
                    tracing::error!(error = %e, "cannot wake the event loop for the store");
                }
            };
            let screen: Box<dyn store::Screen> = match &front {
                Front::Json(out) | Front::Lines(out, _) => Box::new(out.screen()),
                Front::Tui(ui) => Box::new(ui.screen()),
            };
            match store.spawn(screen, notify) {
                Ok(thread) => (Some(thread), saved),
                Err(e) => {
                    return fail(
                        args.json,
                        "store",
                        format!("cannot start the store's thread: {e}"),
                    )
                }
            }
        }
        None => (None, Saved::default()),
    };
    let disk = {
        let waker = event_loop.waker();
        let notify = move || {
            if let Err(e) = waker.wake() {
                tracing::error!(error = %e, "cannot wake the event loop for the disk");
            }
        };
        match DiskThread::spawn(notify) {
            Ok(disk) => disk,
            Err(e) => {
                return fail(
                    args.json,
                    "io",
                    format!("cannot start the disk thread: {e}"),
                )
            }
        }
    };
    let peer = Peer::new(
        config,
        trust,
        saved,
        seed(),
        event_loop.ctx().now(),
        SystemTime::now(),
    );
    let mut host = PeerHost {
        front,
        input: rx,
        held: VecDeque::new(),
        input_open: false,
        echo: HashMap::new(),
        store,
        disk: Some(disk),
        queries: HashMap::new(),
        next_query: 0,
        turn: Vec::new(),
        turn_batch: None,
        turn_ending: false,
        exit: None,
        farewell: None,
        known_peers: known_peers_path,
        registry_name,
    };
    let waiting = match peer.outbox_len() {
        0 => None,
        n => Some(format!(
            "{n} messages from an earlier run wait for delivery (/outbox lists them)"
        )),
    };
    match &mut host.front {
        Front::Json(_) => {}
        Front::Lines(_, view) => {
            let mut notes = vec![format!("your key fingerprint: {}", identity.public())];
            notes.extend(waiting);
            let lines: Vec<String> = notes
                .iter()
                .flat_map(|note| view.note(note, SystemTime::now()))
                .collect();
            for line in lines {
                host.line(line);
            }
        }
        Front::Tui(_) => {
            if let Some(note) = waiting {
                host.update(Update::Note(note));
            }
        }
    }
    let mut app = Driver::new(peer, host);
    let ctx = event_loop.ctx();
    app.machine.start(ctx.now());
    // The driver acts on the peer's outputs (the registry dial) when the
    // loop first calls it: at once, for this wake-up.
    wake(ctx);
    let result = event_loop.run(&mut app);
    let host = &mut app.host;
    // Partial files of the transfers that ended with the run go now.
    if let Some(disk) = host.disk.take() {
        disk.close();
    }
    let closed = host.store.take().map(|store| {
        // What the last turn left, if the loop stopped before handing it over.
        let _ = store.turn(std::mem::take(&mut host.turn), host.turn_batch.take());
        store.close()
    });
    match &mut app.host.front {
        Front::Json(out) | Front::Lines(out, _) => out.finish(),
        Front::Tui(ui) => ui.finish(),
    }
    // Then the guard, which blanks the line the cursor is on.
    drop(terminal_guard);
    if let (Some(farewell), Some(1..)) = (&app.host.farewell, app.host.exit) {
        eprintln!("peer: {farewell}");
    }
    if let Err(e) = result {
        return fail(args.json, "io", format!("the event loop failed: {e}"));
    }
    if let Some(Err(e)) = closed {
        return fail(args.json, "store", e);
    }
    drop(logs);
    // The input thread may still be blocked reading; leave without it.
    std::process::exit(app.host.exit.unwrap_or(0));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_is_consistent() {
        Args::command().debug_assert();
    }

    #[test]
    fn an_ipv6_registry_gets_an_ipv6_wildcard_listener() {
        let any4: SocketAddr = "0.0.0.0:0".parse().unwrap();
        let v4: SocketAddr = "127.0.0.1:7000".parse().unwrap();
        let v6: SocketAddr = "[::1]:7000".parse().unwrap();
        assert_eq!(listen_addr(any4, v4), any4);
        assert_eq!(listen_addr(any4, v6), "[::]:0".parse().unwrap());
        let chosen: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        assert_eq!(
            listen_addr(chosen, v6),
            chosen,
            "an explicit address is kept"
        );
    }
}
