//! The `peer` command line, here rather than in the binary so that the
//! packaging can make the manual page and shell completions from it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use peerchat_core::args::{parse_duration, parse_size};
use peerchat_core::identity::PublicKey;

/// The peerchat peer: chat directly with the peers a registry lists.
///
/// It registers with a registry, then chats directly with the other peers
/// over encrypted links. On a terminal it opens a full-screen UI (/help
/// lists its commands and keys); --plain gives lines of text, --json one
/// JSON object per line. Type text to send it to everyone, `/msg NAME TEXT`
/// for one peer, `/peers` to list who is online, `/whois NAME` for a peer's
/// key fingerprint, `/history` and `/search` for what was said, `/send
/// NAME PATH` to offer a file (`/accept N` or `/reject N` to answer an
/// offer), `/quit` to leave.
#[derive(Debug, Parser)]
#[command(name = "peer", version)]
pub struct Args {
    /// Your name: 1-32 characters, no spaces; unique (ignoring case) among
    /// the peers online.
    // Takes `-dash` as a value, so that the name rules can say what is
    // wrong with it instead of clap calling it an unknown flag.
    #[arg(long, allow_hyphen_values = true)]
    pub name: String,
    /// The registry's address, e.g. 127.0.0.1:7000 or chat.example:7000.
    /// Give it several times (or a host name with several addresses) for
    /// the registries of one cluster: when one fails, the peer moves to
    /// the next and keeps its name. They must all prove the key pinned
    /// for the list.
    #[arg(long, value_name = "ADDR", required = true)]
    pub registry: Vec<String>,
    /// Where to accept links from other peers; its port is what the
    /// registry hands out.
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:0")]
    pub listen: SocketAddr,
    /// Print one JSON object per line on stdout instead of text.
    #[arg(long)]
    pub json: bool,
    /// Lines of text instead of the full-screen UI on a terminal (the
    /// default when stdin or stdout is not a terminal).
    #[arg(long, conflicts_with = "json")]
    pub plain: bool,
    /// Your key file, created (mode 0600) if missing. Default: NAME.key in
    /// $XDG_DATA_HOME/peerchat/, else ~/.local/share/peerchat/.
    #[arg(long, value_name = "PATH")]
    pub identity: Option<PathBuf>,
    /// The registry's key (base64, as the registry prints it at start),
    /// pinned once the registry proves it. Without it, the first key the
    /// registry proves is pinned.
    #[arg(long, value_name = "KEY", value_parser = PublicKey::parse)]
    pub registry_key: Option<PublicKey>,
    /// The file of pinned keys. Default: known_peers next to the default
    /// key files.
    #[arg(long, value_name = "PATH")]
    pub known_peers: Option<PathBuf>,
    /// The database of history and of messages waiting for delivery,
    /// created (mode 0600) if missing. Default: beside the key file, named
    /// like it with `.db`.
    #[arg(long, value_name = "PATH")]
    pub store: Option<PathBuf>,
    /// Record no history: the store keeps only what waits for delivery,
    /// and what was shown (so that nothing is shown twice).
    #[arg(long)]
    pub no_history: bool,
    /// Keep nothing on disk: no history, and what waits for delivery is
    /// reported undelivered at exit instead of kept for the next run.
    #[arg(long, conflicts_with_all = ["store", "no_history"])]
    pub no_store: bool,
    /// How long a message waits for its target (online or not) before it
    /// is given up as undelivered (`expired`).
    #[arg(long, value_name = "DUR", default_value = "7days", value_parser = parse_duration)]
    pub outbox_ttl: Duration,
    /// Where received files are saved (`/accept N DIR` picks another
    /// place). Default: a peerchat folder in the XDG download directory,
    /// else in ~/Downloads.
    #[arg(long, value_name = "DIR")]
    pub downloads: Option<PathBuf>,
    /// Offers of larger files are refused, e.g. 4GiB or 500MB.
    #[arg(long, value_name = "SIZE", default_value = "4GiB", value_parser = parse_size)]
    pub max_file_size: u64,
    /// Take the files these peers offer at once, without /accept
    /// (comma-separated names; for bots and scripts). Only from the key
    /// pinned for the name.
    #[arg(long, value_name = "NAME,...", value_delimiter = ',')]
    pub accept_files_from: Vec<String>,
}
