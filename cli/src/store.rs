//! The peer's embedded database (SQLite): the history of messages, the
//! outbox that survives a restart, and what was already shown. It writes the
//! journal's [`Record`]s and answers its [`Query`]s; [`Store::spawn`] runs it
//! on a thread of its own so the event loop never waits on the disk.
//!
//! One process per store: the file is locked for as long as it is open. A
//! file that is not ours, not a store, damaged, newer than this build, or
//! another identity's is refused with a clear error, never replaced.
//!
//! SQLite integers are signed: every `u64` (ids, instances, times) is kept
//! bit for bit as an `i64`, and the few comparisons made in SQL compare them
//! unsigned (`umax!`), since a sender may choose any id.

use std::collections::hash_map::Entry as Slot;
use std::collections::HashMap;
use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, Sender};
use std::thread;
use std::time::Duration;

use peerchat_core::identity::PublicKey;
use peerchat_core::trusted_file;
use rusqlite::types::Type;
use rusqlite::{params, Connection, ErrorCode, OpenFlags, OptionalExtension, Row};

use crate::journal::{Entry, Incoming, Outgoing, Party, Query, Record, Saved, TargetState};

/// `PRAGMA application_id` of a peerchat store: "pcht".
const APPLICATION_ID: i32 = 0x7063_6874;

/// The schema, one step per version: step `i` takes a store from version
/// `i` to `i + 1` (`PRAGMA user_version`). A release that changes the schema
/// appends a step; a published step never changes, or stores made with it
/// would differ from new ones.
const MIGRATIONS: &[&str] = &[
    // v1. `targets` packs the pid of every target as a little-endian u32:
    // a message to everyone has ~1000, and one row per target would cost a
    // thousand inserts per message. Outcomes live on the peer
    // (`acked_through`) and in `failures`, never per target and message.
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;
     CREATE TABLE peers (
         pid INTEGER PRIMARY KEY,
         key BLOB UNIQUE NOT NULL,
         name TEXT NOT NULL,
         acked_through INTEGER NOT NULL DEFAULT 0,
         seen_instance INTEGER,
         seen_id INTEGER
     );
     CREATE TABLE messages (
         mid INTEGER PRIMARY KEY,
         id INTEGER NOT NULL,
         outgoing INTEGER NOT NULL,
         sender INTEGER REFERENCES peers,
         conversation INTEGER REFERENCES peers,
         text TEXT NOT NULL,
         direct INTEGER NOT NULL,
         sent_at INTEGER,
         received_at INTEGER NOT NULL,
         targets BLOB,
         pending INTEGER NOT NULL DEFAULT 0
     );
     -- An index ends with the rowid, so this one also orders a
     -- conversation's messages by arrival.
     CREATE INDEX messages_conversation ON messages (conversation);
     CREATE INDEX messages_pending ON messages (id) WHERE pending = 1;
     CREATE TABLE failures (
         id INTEGER NOT NULL,
         pid INTEGER NOT NULL REFERENCES peers,
         reason TEXT NOT NULL,
         at INTEGER NOT NULL,
         PRIMARY KEY (id, pid)
     ) WITHOUT ROWID;
     CREATE VIRTUAL TABLE messages_text USING fts5 (
         text, content = 'messages', content_rowid = 'mid'
     );
     -- Message text never changes: inserts and deletes keep the index in step.
     CREATE TRIGGER messages_text_insert AFTER INSERT ON messages BEGIN
         INSERT INTO messages_text (rowid, text) VALUES (new.mid, new.text);
     END;
     CREATE TRIGGER messages_text_delete AFTER DELETE ON messages BEGIN
         INSERT INTO messages_text (messages_text, rowid, text)
             VALUES ('delete', old.mid, old.text);
     END;",
];

/// The larger of two `u64`s stored as `i64`s, as SQL: a negative one is
/// above every positive one.
#[rustfmt::skip]
macro_rules! umax {
    ($a:literal, $b:literal) => {
        concat!(
            "(CASE WHEN (", $a, " < 0) = (", $b, " < 0) THEN max(", $a, ", ", $b, ") ",
            "WHEN ", $a, " < 0 THEN ", $a, " ELSE ", $b, " END)"
        )
    };
}

/// A query for entries: `$messages` selects the message rows (newest
/// first, bounded); the answer is in arrival order.
#[rustfmt::skip]
macro_rules! entries_of {
    ($messages:literal) => {
        concat!(
            "SELECT m.id, m.outgoing, s.name, c.name, m.text, m.sent_at, m.received_at, m.targets
             FROM (", $messages, ") AS m
             LEFT JOIN peers AS s ON s.pid = m.sender
             LEFT JOIN peers AS c ON c.pid = m.conversation
             ORDER BY m.mid"
        )
    };
}

/// The write-ahead log is started over once it holds this many pages
/// (SQLite's own default for its automatic checkpoints).
const CHECKPOINT_PAGES: i64 = 1000;

/// The store's thread checkpoints after this many commits.
const COMMITS_PER_CHECKPOINT: u32 = 64;

/// Once it holds a turn, the store's thread takes at most about this many
/// more records and lines before it acts, so that a flood is still written
/// (and confirmed) now and then.
const MAX_GROUP: usize = 16 * 1024;

/// The least and the most output the store's thread shows after one
/// commit: what any pipe takes in one write (`PIPE_BUF`), and Linux's
/// default pipe size. In between, what the screen has room for: a piece is
/// written whole, without waiting for a reader who lags.
pub const PIECE: usize = 4096;
const MAX_PIECE: usize = 64 * 1024;

#[derive(Debug, Clone)]
pub struct Options {
    pub path: PathBuf,
    /// The identity the store belongs to.
    pub owner: PublicKey,
    /// Our name, shown as the sender of our messages.
    pub name: String,
    /// Keep messages once they are settled or shown; without it the store
    /// keeps only the outbox and what was seen.
    pub history: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot {action} {}: {source}; check the path and its directory's permissions", .path.display())]
    Io {
        path: PathBuf,
        action: &'static str,
        source: io::Error,
    },
    #[error(
        "refusing {}: it must belong to you and be writable by nobody else (mode {mode:04o}, owner {owner}); \
         make it yours with mode 0600, or name another with --store",
        .path.display()
    )]
    NotPrivate {
        path: PathBuf,
        mode: u32,
        owner: u32,
    },
    #[error("{} is in use by another peer process (is {name} already running?)", .path.display())]
    InUse { path: PathBuf, name: String },
    #[error("{} is not a peerchat store or is damaged ({why}); move it away to start a new one", .path.display())]
    NotAStore { path: PathBuf, why: String },
    #[error(
        "{} was made by a newer peerchat (schema v{found}, this build knows up to v{known}); \
         run a newer peer, or name another store with --store",
        .path.display()
    )]
    Newer {
        path: PathBuf,
        found: usize,
        known: usize,
    },
    #[error("{} belongs to key {found}, not this identity's key {expected}; name another with --store", .path.display())]
    OtherOwner {
        path: PathBuf,
        found: PublicKey,
        expected: PublicKey,
    },
    #[error("cannot use {}: {why}", .path.display())]
    Unusable { path: PathBuf, why: String },
    #[error("the store {} failed: {source}; check that its disk is writable and has room", .path.display())]
    Sqlite {
        path: PathBuf,
        source: rusqlite::Error,
    },
}

pub struct Store {
    conn: Connection,
    options: Options,
    /// Key → (pid, name) of the peers written in this process, so that a
    /// message to a thousand known peers costs no statement per target.
    /// Cleared when a transaction fails, since its rows may be gone.
    pids: HashMap<PublicKey, (i64, String)>,
}

impl Store {
    /// Opens (creating if missing) and returns the state the peer starts from.
    pub fn open(options: Options) -> Result<(Store, Saved), StoreError> {
        let conn = connect(&options)?;
        let store = Store {
            conn,
            options,
            pids: HashMap::new(),
        };
        let saved = store.start().map_err(|e| store.open_error(e))?;
        Ok((store, saved))
    }

    /// All records in ONE transaction, in order.
    pub fn write(&mut self, records: &[Record]) -> Result<(), StoreError> {
        self.write_all(records.iter())
    }

    pub fn query(&mut self, query: &Query) -> Result<Vec<Entry>, StoreError> {
        self.answer(query).map_err(|e| self.failed(e))
    }

    /// Copies the write-ahead log into the database once it has grown past
    /// [`CHECKPOINT_PAGES`], so that it does not grow without end.
    fn checkpoint(&mut self) -> Result<(), StoreError> {
        let (_busy, log, _moved): (i64, i64, i64) = self
            .conn
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .map_err(|e| self.failed(e))?;
        if log > CHECKPOINT_PAGES {
            // Start the log over, instead of growing the file further.
            self.conn
                .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
                .map_err(|e| self.failed(e))?;
        }
        Ok(())
    }

    /// Moves the store to a thread of its own, which also shows the lines
    /// it is given on `screen`; `notify` is called (from that thread) after
    /// every reply is queued.
    pub fn spawn(self, screen: impl Screen, notify: impl Fn() + Send + 'static) -> StoreThread {
        let (requests, inbox) = mpsc::channel();
        let (outbox, replies) = mpsc::channel();
        // As `thread::spawn` does: a process that cannot start a thread
        // cannot run the peer either.
        let thread = thread::Builder::new()
            .name("store".into())
            .spawn(move || serve(self, &inbox, &outbox, screen, notify))
            .expect("cannot start the store's thread");
        StoreThread {
            requests,
            replies,
            thread,
        }
    }

    fn failed(&self, source: rusqlite::Error) -> StoreError {
        StoreError::Sqlite {
            path: self.options.path.clone(),
            source,
        }
    }

    /// Errors of opening, said as what they mean for the user.
    fn open_error(&self, error: OpenError) -> StoreError {
        match error {
            OpenError::Store(e) => e,
            OpenError::Sqlite(e) => classify(&self.options, e),
        }
    }

    /// Takes the lock, checks what the file is, brings its schema up to
    /// date and reads the saved state: all in one transaction, so a store
    /// is never left half made.
    fn start(&self) -> Result<Saved, OpenError> {
        let conn = &self.conn;
        let path = &self.options.path;
        let not_a_store = |why: String| {
            OpenError::Store(StoreError::NotAStore {
                path: path.clone(),
                why,
            })
        };
        // Locking mode EXCLUSIVE keeps the lock this takes until the
        // connection closes.
        conn.execute_batch("BEGIN IMMEDIATE")?;

        let problems = conn
            .prepare("PRAGMA quick_check(3)")?
            .query_map([], |row| row.get::<_, String>(0))?
            .collect::<Result<Vec<_>, _>>()?;
        if problems != ["ok"] {
            return Err(not_a_store(problems.join("; ")));
        }

        let application_id: i32 = conn.query_row("PRAGMA application_id", [], |r| r.get(0))?;
        let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if application_id != APPLICATION_ID {
            let objects: i64 =
                conn.query_row("SELECT count(*) FROM sqlite_schema", [], |r| r.get(0))?;
            if objects > 0 || version != 0 {
                return Err(not_a_store(format!(
                    "its application id is {application_id:#x}, not peerchat's {APPLICATION_ID:#x}"
                )));
            }
            conn.pragma_update(None, "application_id", APPLICATION_ID)?;
        }
        let version = usize::try_from(version)
            .map_err(|_| not_a_store(format!("schema version {version}")))?;
        if version > MIGRATIONS.len() {
            return Err(OpenError::Store(StoreError::Newer {
                path: path.clone(),
                found: version,
                known: MIGRATIONS.len(),
            }));
        }
        for step in &MIGRATIONS[version..] {
            conn.execute_batch(step)?;
        }
        conn.pragma_update(None, "user_version", MIGRATIONS.len() as i64)?;

        if version == 0 {
            let instance = random_instance().map_err(|why| {
                OpenError::Store(StoreError::Unusable {
                    path: path.clone(),
                    why,
                })
            })?;
            conn.execute(
                "INSERT INTO meta (key, value) VALUES ('owner', ?1), ('instance', ?2), ('next_id', 1)",
                params![self.options.owner.as_bytes().as_slice(), int(instance)],
            )?;
        }
        let owner: Option<Vec<u8>> = meta(conn, "owner")?;
        let owner = owner
            .as_deref()
            .and_then(PublicKey::from_slice)
            .ok_or_else(|| not_a_store("it names no owner key".into()))?;
        if owner != self.options.owner {
            return Err(OpenError::Store(StoreError::OtherOwner {
                path: path.clone(),
                found: owner,
                expected: self.options.owner,
            }));
        }
        let instance = meta::<i64>(conn, "instance")?
            .map(uint)
            .filter(|&i| i != 0)
            .ok_or_else(|| not_a_store("it has no instance".into()))?;
        let next_id = meta::<i64>(conn, "next_id")?.map_or(1, uint).max(1);

        let saved = Saved {
            instance,
            next_id,
            outbox: outbox(conn)?,
            seen: seen(conn)?,
        };
        conn.execute_batch("COMMIT")?;
        Ok(saved)
    }

    fn write_all<'a>(
        &mut self,
        records: impl Iterator<Item = &'a Record>,
    ) -> Result<(), StoreError> {
        let written = self.apply(records);
        if written.is_err() {
            self.pids.clear();
        }
        written.map_err(|e| self.failed(e))
    }

    fn apply<'a>(&mut self, records: impl Iterator<Item = &'a Record>) -> rusqlite::Result<()> {
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let mut writer = Writer {
            conn: &tx,
            pids: &mut self.pids,
            history: self.options.history,
            acked: HashMap::new(),
            next_id: None,
        };
        for record in records {
            writer.record(record)?;
        }
        writer.finish()?;
        tx.commit()
    }

    fn answer(&self, query: &Query) -> rusqlite::Result<Vec<Entry>> {
        let conn = &self.conn;
        let rows = match query {
            Query::History { with: None, limit } => conn
                .prepare_cached(entries_of!(
                    "SELECT * FROM messages WHERE conversation IS NULL ORDER BY mid DESC LIMIT ?1"
                ))?
                .query_map(params![sql_limit(*limit)], EntryRow::read)?
                .collect::<rusqlite::Result<Vec<_>>>()?,
            Query::History {
                with: Some(party),
                limit,
            } => conn
                .prepare_cached(entries_of!(
                    "SELECT * FROM messages
                     WHERE conversation = (SELECT pid FROM peers WHERE key = ?2)
                     ORDER BY mid DESC LIMIT ?1"
                ))?
                .query_map(
                    params![sql_limit(*limit), party.key.as_bytes().as_slice()],
                    EntryRow::read,
                )?
                .collect::<rusqlite::Result<Vec<_>>>()?,
            Query::Search { text, limit } => {
                let Some(matching) = fts_words(text) else {
                    return Ok(Vec::new());
                };
                conn.prepare_cached(entries_of!(
                    "SELECT * FROM messages WHERE mid IN (
                         SELECT rowid FROM messages_text WHERE messages_text MATCH ?2
                         ORDER BY rowid DESC LIMIT ?1)"
                ))?
                .query_map(params![sql_limit(*limit), matching], EntryRow::read)?
                .collect::<rusqlite::Result<Vec<_>>>()?
            }
        };
        let mut peers = HashMap::new();
        rows.into_iter()
            .map(|row| row.entry(conn, &self.options.name, &mut peers))
            .collect()
    }
}

/// An error while opening: already said for the user, or SQLite's, which
/// [`classify`] says.
enum OpenError {
    Store(StoreError),
    Sqlite(rusqlite::Error),
}

impl From<rusqlite::Error> for OpenError {
    fn from(e: rusqlite::Error) -> Self {
        OpenError::Sqlite(e)
    }
}

/// Checks (or creates) the file, then opens and configures the connection.
fn connect(options: &Options) -> Result<Connection, StoreError> {
    prepare_file(&options.path)?;
    let fail = |e| classify(options, e);
    // Without CREATE: the file was checked or made above, and SQLite must
    // not make one anywhere else.
    let conn = Connection::open_with_flags(
        &options.path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(fail)?;
    // Another process holding the store is an answer, not something to wait for.
    conn.busy_timeout(Duration::ZERO).map_err(fail)?;
    // EXCLUSIVE before WAL: a WAL store locked this way needs no shared
    // memory file, and nobody else may open it. WAL with synchronous=NORMAL
    // loses nothing committed when the process dies, only (at worst) the
    // last commits when the machine does.
    // No automatic checkpoints: SQLite would run one inside a commit, after
    // the commit is durable and before it returns, so that the store's
    // thread would show a turn's lines milliseconds after its records are
    // safe (a crash in between loses the lines for good). The thread
    // checkpoints after showing instead (`Store::checkpoint`).
    conn.execute_batch(
        "PRAGMA locking_mode = EXCLUSIVE; PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON;
         PRAGMA wal_autocheckpoint = 0;",
    )
    .map_err(fail)?;
    conn.set_prepared_statement_cache_capacity(32);
    let mode: String = conn
        .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
        .map_err(fail)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::Unusable {
            path: options.path.clone(),
            why: format!("SQLite would not put it in WAL mode (it is in {mode} mode)"),
        });
    }
    Ok(conn)
}

/// Refuses a file others could write, as `trusted_file::read` does, and
/// makes a missing one private from the start. The check is on the path,
/// not on a descriptor of ours: SQLite opens the path itself, so one would
/// check nothing more, and closing it would drop every POSIX lock this
/// process holds on the file, SQLite's included.
fn prepare_file(path: &Path) -> Result<(), StoreError> {
    let io_error = |action, source| StoreError::Io {
        path: path.to_owned(),
        action,
        source,
    };
    let meta = match fs::metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                trusted_file::create_dir(dir)
                    .map_err(|e| io_error("create the directory of", e))?;
            }
            // Made here before SQLite opens it, so it is never readable by
            // others, not even for a moment.
            return match fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
            {
                Ok(_) => Ok(()),
                Err(e) => Err(io_error("create", e)),
            };
        }
        Err(e) => return Err(io_error("open", e)),
    };
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me || meta.mode() & 0o022 != 0 {
        return Err(StoreError::NotPrivate {
            path: path.to_owned(),
            mode: meta.mode() & 0o777,
            owner: meta.uid(),
        });
    }
    if !meta.is_file() {
        return Err(StoreError::Unusable {
            path: path.to_owned(),
            why: "it is not a regular file".into(),
        });
    }
    Ok(())
}

fn classify(options: &Options, error: rusqlite::Error) -> StoreError {
    let path = options.path.clone();
    match error.sqlite_error_code() {
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => StoreError::InUse {
            path,
            name: options.name.clone(),
        },
        Some(ErrorCode::NotADatabase | ErrorCode::DatabaseCorrupt) => StoreError::NotAStore {
            path,
            why: error.to_string(),
        },
        _ => StoreError::Sqlite {
            path,
            source: error,
        },
    }
}

/// A new store's instance: random, so that receivers tell its ids from an
/// earlier store's under the same name, and never 0.
fn random_instance() -> Result<u64, String> {
    loop {
        let mut bytes = [0; 8];
        getrandom::fill(&mut bytes)
            .map_err(|e| format!("the OS random number generator failed: {e}"))?;
        let instance = u64::from_le_bytes(bytes);
        if instance != 0 {
            return Ok(instance);
        }
    }
}

fn meta<T: rusqlite::types::FromSql>(conn: &Connection, key: &str) -> rusqlite::Result<Option<T>> {
    conn.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
        .optional()
}

/// Our messages still pending, by id, with the targets they still wait on.
fn outbox(conn: &Connection) -> rusqlite::Result<Vec<Outgoing>> {
    let pending = conn
        .prepare(
            "SELECT id, text, direct, sent_at, targets FROM messages WHERE pending = 1 ORDER BY id",
        )?
        .query_map([], |row| {
            Ok((
                uint(row.get(0)?),
                row.get::<_, String>(1)?,
                row.get::<_, bool>(2)?,
                row.get::<_, Option<i64>>(3)?.map_or(0, uint),
                row.get::<_, Option<Vec<u8>>>(4)?.unwrap_or_default(),
            ))
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let mut peers = HashMap::new();
    let mut outbox = Vec::with_capacity(pending.len());
    for (id, text, direct, sent_at, blob) in pending {
        let failed = failures(conn, id)?;
        let mut targets = Vec::new();
        for pid in unpack(&blob) {
            let peer = peer(conn, &mut peers, pid)?;
            if outcome(id, peer, failed.get(&pid)).0 == "queued" {
                targets.push(Party {
                    key: peer.key,
                    name: peer.name.clone(),
                });
            }
        }
        if !targets.is_empty() {
            outbox.push(Outgoing {
                id,
                text,
                direct,
                sent_at,
                targets,
            });
        }
    }
    Ok(outbox)
}

fn seen(conn: &Connection) -> rusqlite::Result<HashMap<PublicKey, (u64, u64)>> {
    conn.prepare("SELECT key, seen_instance, seen_id FROM peers WHERE seen_instance IS NOT NULL")?
        .query_map([], |row| {
            Ok((
                key(row, 0)?,
                (
                    uint(row.get(1)?),
                    row.get::<_, Option<i64>>(2)?.map_or(0, uint),
                ),
            ))
        })?
        .collect()
}

/// What a write needs across its records.
struct Writer<'a> {
    conn: &'a Connection,
    pids: &'a mut HashMap<PublicKey, (i64, String)>,
    history: bool,
    /// The highest acknowledgement per target, written once at the end:
    /// acknowledgements come one per target and message, and nothing in a
    /// write reads them.
    acked: HashMap<PublicKey, u64>,
    /// Likewise the next id: above every id sent.
    next_id: Option<u64>,
}

impl Writer<'_> {
    fn record(&mut self, record: &Record) -> rusqlite::Result<()> {
        match record {
            Record::Sent(outgoing) => self.sent(outgoing),
            Record::Acked { target, through } => {
                let highest = self.acked.entry(*target).or_insert(*through);
                *highest = (*highest).max(*through);
                Ok(())
            }
            Record::Failed {
                id,
                target,
                reason,
                at,
            } => {
                self.conn
                    .prepare_cached(
                        "INSERT OR IGNORE INTO failures (id, pid, reason, at)
                         SELECT ?1, pid, ?3, ?4 FROM peers WHERE key = ?2",
                    )?
                    .execute(params![
                        int(*id),
                        target.as_bytes().as_slice(),
                        reason,
                        int(*at)
                    ])?;
                Ok(())
            }
            Record::Settled { id } => {
                if self.history {
                    self.conn
                        .prepare_cached(
                            "UPDATE messages SET pending = 0 WHERE pending = 1 AND id = ?1",
                        )?
                        .execute([int(*id)])?;
                } else {
                    self.conn
                        .prepare_cached("DELETE FROM messages WHERE pending = 1 AND id = ?1")?
                        .execute([int(*id)])?;
                    self.conn
                        .prepare_cached("DELETE FROM failures WHERE id = ?1")?
                        .execute([int(*id)])?;
                }
                Ok(())
            }
            Record::Received(incoming) => self.received(incoming),
        }
    }

    fn sent(&mut self, outgoing: &Outgoing) -> rusqlite::Result<()> {
        let mut targets = Vec::with_capacity(outgoing.targets.len() * 4);
        let mut conversation = None;
        for party in &outgoing.targets {
            let pid = self.pid(party)?;
            let packed = u32::try_from(pid).map_err(|_| {
                rusqlite::Error::ToSqlConversionFailure(
                    format!("peer number {pid} is too large for a list of targets").into(),
                )
            })?;
            targets.extend_from_slice(&packed.to_le_bytes());
            conversation = Some(pid);
        }
        if !outgoing.direct || outgoing.targets.len() != 1 {
            conversation = None;
        }
        self.conn
            .prepare_cached(
                "INSERT INTO messages
                     (id, outgoing, conversation, text, direct, sent_at, received_at, targets, pending)
                 VALUES (?1, 1, ?2, ?3, ?4, ?5, ?5, ?6, 1)",
            )?
            .execute(params![
                int(outgoing.id),
                conversation,
                outgoing.text,
                outgoing.direct,
                int(outgoing.sent_at),
                targets,
            ])?;
        let next = outgoing.id.saturating_add(1);
        self.next_id = Some(self.next_id.map_or(next, |n| n.max(next)));
        Ok(())
    }

    fn received(&mut self, incoming: &Incoming) -> rusqlite::Result<()> {
        let from = &incoming.from;
        // The id shown counts within the sender's instance: a new instance
        // starts over.
        let pid: i64 = self
            .conn
            .prepare_cached(concat!(
                "INSERT INTO peers (key, name, seen_instance, seen_id) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (key) DO UPDATE SET
                     name = excluded.name,
                     seen_id = CASE WHEN seen_instance IS excluded.seen_instance
                         THEN ",
                umax!("seen_id", "excluded.seen_id"),
                " ELSE excluded.seen_id END,
                     seen_instance = excluded.seen_instance
                 RETURNING pid"
            ))?
            .query_row(
                params![
                    from.key.as_bytes().as_slice(),
                    from.name,
                    int(incoming.instance),
                    int(incoming.id)
                ],
                |row| row.get(0),
            )?;
        self.pids.insert(from.key, (pid, from.name.clone()));
        if self.history {
            self.conn
                .prepare_cached(
                    "INSERT INTO messages
                         (id, outgoing, sender, conversation, text, direct, sent_at, received_at)
                     VALUES (?1, 0, ?2, ?3, ?4, ?5, ?6, ?7)",
                )?
                .execute(params![
                    int(incoming.id),
                    pid,
                    incoming.direct.then_some(pid),
                    incoming.text,
                    incoming.direct,
                    incoming.sent_at.map(int),
                    int(incoming.received_at),
                ])?;
        }
        Ok(())
    }

    /// The party's pid, its row made or renamed if needed.
    fn pid(&mut self, party: &Party) -> rusqlite::Result<i64> {
        if let Some((pid, name)) = self.pids.get(&party.key) {
            if *name == party.name {
                return Ok(*pid);
            }
        }
        let pid = self
            .conn
            .prepare_cached(
                "INSERT INTO peers (key, name) VALUES (?1, ?2)
                 ON CONFLICT (key) DO UPDATE SET name = excluded.name
                 RETURNING pid",
            )?
            .query_row(
                params![party.key.as_bytes().as_slice(), party.name],
                |row| row.get(0),
            )?;
        self.pids.insert(party.key, (pid, party.name.clone()));
        Ok(pid)
    }

    fn finish(self) -> rusqlite::Result<()> {
        let mut ack = self.conn.prepare_cached(concat!(
            "UPDATE peers SET acked_through = ",
            umax!("acked_through", "?2"),
            " WHERE key = ?1"
        ))?;
        for (key, through) in &self.acked {
            ack.execute(params![key.as_bytes().as_slice(), int(*through)])?;
        }
        if let Some(next) = self.next_id {
            self.conn
                .prepare_cached(concat!(
                    "UPDATE meta SET value = ",
                    umax!("value", "?1"),
                    " WHERE key = 'next_id'"
                ))?
                .execute([int(next)])?;
        }
        Ok(())
    }
}

/// A message row of an answer, before its targets are looked up.
struct EntryRow {
    id: u64,
    outgoing: bool,
    sender: Option<String>,
    with: Option<String>,
    text: String,
    sent_at: Option<u64>,
    received_at: u64,
    targets: Option<Vec<u8>>,
}

impl EntryRow {
    fn read(row: &Row) -> rusqlite::Result<EntryRow> {
        Ok(EntryRow {
            id: uint(row.get(0)?),
            outgoing: row.get(1)?,
            sender: row.get(2)?,
            with: row.get(3)?,
            text: row.get(4)?,
            sent_at: row.get::<_, Option<i64>>(5)?.map(uint),
            received_at: uint(row.get(6)?),
            targets: row.get(7)?,
        })
    }

    fn entry(
        self,
        conn: &Connection,
        our_name: &str,
        peers: &mut HashMap<i64, PeerRow>,
    ) -> rusqlite::Result<Entry> {
        let mut targets = Vec::new();
        if self.outgoing {
            let failed = failures(conn, self.id)?;
            for pid in unpack(self.targets.as_deref().unwrap_or_default()) {
                let peer = peer(conn, peers, pid)?;
                let (state, reason) = outcome(self.id, peer, failed.get(&pid));
                targets.push(TargetState {
                    to: peer.name.clone(),
                    state,
                    reason,
                });
            }
        }
        Ok(Entry {
            id: self.id,
            from: if self.outgoing {
                our_name.to_owned()
            } else {
                self.sender.unwrap_or_default()
            },
            outgoing: self.outgoing,
            with: self.with,
            text: self.text,
            sent_at: self.sent_at,
            received_at: self.received_at,
            targets,
        })
    }
}

struct PeerRow {
    key: PublicKey,
    name: String,
    acked_through: u64,
}

/// The peer of `pid`, looked up once per answer.
fn peer<'a>(
    conn: &Connection,
    peers: &'a mut HashMap<i64, PeerRow>,
    pid: i64,
) -> rusqlite::Result<&'a PeerRow> {
    Ok(match peers.entry(pid) {
        Slot::Occupied(known) => known.into_mut(),
        Slot::Vacant(slot) => slot.insert(
            conn.prepare_cached("SELECT key, name, acked_through FROM peers WHERE pid = ?1")?
                .query_row([pid], |row| {
                    Ok(PeerRow {
                        key: key(row, 0)?,
                        name: row.get(1)?,
                        acked_through: uint(row.get(2)?),
                    })
                })?,
        ),
    })
}

/// The failures of our message `id`: pid → reason.
fn failures(conn: &Connection, id: u64) -> rusqlite::Result<HashMap<i64, String>> {
    conn.prepare_cached("SELECT pid, reason FROM failures WHERE id = ?1")?
        .query_map([int(id)], |row| Ok((row.get(0)?, row.get(1)?)))?
        .collect()
}

/// Where our message `id` stands with `peer`: a failure is final, an
/// acknowledgement covers every earlier message, and the rest wait.
fn outcome(id: u64, peer: &PeerRow, failure: Option<&String>) -> (&'static str, Option<String>) {
    match failure {
        Some(reason) => ("undelivered", Some(reason.clone())),
        None if id <= peer.acked_through => ("delivered", None),
        None => ("queued", None),
    }
}

fn unpack(targets: &[u8]) -> impl Iterator<Item = i64> + '_ {
    targets
        .chunks_exact(4)
        .map(|b| i64::from(u32::from_le_bytes([b[0], b[1], b[2], b[3]])))
}

fn key(row: &Row, index: usize) -> rusqlite::Result<PublicKey> {
    let bytes: Vec<u8> = row.get(index)?;
    PublicKey::from_slice(&bytes).ok_or_else(|| {
        rusqlite::Error::FromSqlConversionFailure(
            index,
            Type::Blob,
            format!("a key of {} bytes", bytes.len()).into(),
        )
    })
}

/// The user's words as an FTS5 query that matches them all, whatever they
/// contain: each word quoted, so none is read as an operator. `None` if
/// there are no words.
fn fts_words(text: &str) -> Option<String> {
    let words: Vec<String> = text
        .split_whitespace()
        .map(|word| format!("\"{}\"", word.replace('"', "\"\"")))
        .collect();
    (!words.is_empty()).then(|| words.join(" "))
}

fn sql_limit(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

fn int(value: u64) -> i64 {
    value as i64
}

fn uint(value: i64) -> u64 {
    value as u64
}

/// Where the store's thread shows output.
pub trait Screen: Send + 'static {
    /// Waits until the screen takes at least [`PIECE`] bytes at once, then
    /// says how many it takes now without waiting (a pipe's free room).
    fn room(&mut self) -> usize;
    /// Shows whole lines, each ending in a newline: at most what `room`
    /// said last, unless one line alone is longer.
    fn show(&mut self, text: &str);
}

/// The store on its own thread; see [`Store::spawn`].
pub struct StoreThread {
    requests: Sender<Request>,
    replies: Receiver<Reply>,
    thread: thread::JoinHandle<Result<(), String>>,
}

/// The store's thread stopped taking requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the store's thread stopped")]
pub struct ThreadGone;

#[derive(Debug)]
pub enum Reply {
    /// Every write up to this batch is committed.
    Committed(u64),
    Answer {
        tag: u64,
        result: Result<Vec<Entry>, String>,
    },
    /// A write failed: nothing after the last batch committed is written,
    /// and no more will be.
    Failed(String),
}

enum Request {
    /// A turn of the loop: its records and lines in order, and the batch of
    /// its records if it has one.
    Turn(Vec<Item>, Option<u64>),
    Query(u64, Query),
    Close,
}

impl StoreThread {
    /// A turn's records and lines, in order: each line is shown once the
    /// records before it are written, then `batch` is confirmed. A thread
    /// that is gone (it panicked) hands them back, and `close` says why.
    pub fn turn(&self, items: Vec<Item>, batch: Option<u64>) -> Result<(), Vec<Item>> {
        match self.requests.send(Request::Turn(items, batch)) {
            Ok(()) => Ok(()),
            Err(mpsc::SendError(Request::Turn(items, _))) => Err(items),
            Err(_) => Err(Vec::new()),
        }
    }

    /// Fails only if the thread is gone.
    pub fn query(&self, tag: u64, query: Query) -> Result<(), ThreadGone> {
        self.requests
            .send(Request::Query(tag, query))
            .map_err(|_| ThreadGone)
    }

    pub fn try_reply(&self) -> Option<Reply> {
        self.replies.try_recv().ok()
    }

    /// Finishes every write already asked for, then stops the thread.
    pub fn close(self) -> Result<(), String> {
        let _ = self.requests.send(Request::Close);
        self.thread
            .join()
            .map_err(|_| "the store's thread panicked".to_owned())?
    }
}

/// The store's thread: takes requests in order until closed (or until
/// nobody can ask any more).
///
/// Lines are shown here, not by the loop, a piece at a time, each right
/// after the records it is about are committed. Between the two there is
/// nothing but the write: a process killed there loses that piece's lines
/// (the records say they were shown, so a resend is a duplicate), which a
/// round trip through the loop would make likely, and showing first would
/// make a kill right after a line was read (which is when a watcher kills)
/// show it again. A piece is at most what the screen has room for (see
/// [`Screen::room`]), so a reader who lags holds up the next piece before
/// its commit, not after. Writes are confirmed (`Committed`)
/// once a turn is written and shown, so that the peer acknowledges and
/// sends nothing before that.
fn serve(
    mut store: Store,
    requests: &Receiver<Request>,
    replies: &Sender<Reply>,
    mut screen: impl Screen,
    notify: impl Fn(),
) -> Result<(), String> {
    let mut stream = Stream::default();
    let reply = |reply: Reply| {
        if replies.send(reply).is_ok() {
            notify();
        }
    };
    loop {
        // After the end of a turn, whatever else is waiting joins it, within
        // limits so that a steady flow still gets written now and then.
        let request = if stream.ended.is_none() {
            match requests.recv() {
                Ok(request) => request,
                Err(_) => break,
            }
        } else if stream.since_end < MAX_GROUP {
            match requests.try_recv() {
                Ok(request) => request,
                Err(_) => {
                    stream.act(&mut store, &mut screen, &reply);
                    continue;
                }
            }
        } else {
            stream.act(&mut store, &mut screen, &reply);
            continue;
        };
        match request {
            Request::Turn(items, batch) => {
                stream.since_end += items.len();
                stream.items.extend(items);
                stream.end_turn(batch);
            }
            Request::Query(tag, query) => {
                // It sees every turn that ended before it.
                stream.act(&mut store, &mut screen, &reply);
                let result = store.query(&query).map_err(|e| e.to_string());
                reply(Reply::Answer { tag, result });
            }
            Request::Close => {
                stream.end_turn(None);
                stream.act(&mut store, &mut screen, &reply);
                break;
            }
        }
    }
    stream.failure.map_or(Ok(()), Err)
}

/// What a turn hands the store's thread: a record, or a line of output
/// about the records before it.
#[derive(Debug)]
pub enum Item {
    Record(Record),
    Line(String),
}

/// What the store's thread holds between acts.
#[derive(Default)]
struct Stream {
    /// Whole turns: the host hands over a turn once it ended, so that its
    /// batch is confirmed whole.
    items: Vec<Item>,
    /// Some once a turn is held, with the highest batch among them.
    ended: Option<Option<u64>>,
    /// Records and lines taken since the first turn held.
    since_end: usize,
    /// Commits since the last checkpoint.
    commits: u32,
    /// After a failed write nothing is written or shown again: the peer
    /// exits, and what it still asks for is dropped, never written past the
    /// hole.
    failure: Option<String>,
}

impl Stream {
    fn end_turn(&mut self, batch: Option<u64>) {
        let highest = self.ended.flatten().max(batch);
        self.ended = Some(highest);
    }

    /// Writes and shows the turns that ended, a piece at a time: the
    /// records before a piece's last line, then its lines; then confirms
    /// their batch.
    fn act(&mut self, store: &mut Store, screen: &mut impl Screen, reply: &impl Fn(Reply)) {
        let Some(batch) = self.ended.take() else {
            return;
        };
        self.since_end = 0;
        let items = std::mem::take(&mut self.items);
        if self.failure.is_some() {
            return;
        }
        let mut text = String::new();
        let mut room = 0;
        let mut before: Vec<Record> = Vec::new();
        let mut after: Vec<Record> = Vec::new();
        for item in items {
            match item {
                Item::Record(record) => after.push(record),
                Item::Line(line) => {
                    let full = !text.is_empty() && text.len() + line.len() >= room;
                    if full && !self.piece(store, screen, &mut text, &mut before, reply) {
                        return;
                    }
                    if text.is_empty() {
                        // Measured before the commit, not between it and
                        // the write: a reader who lags would stretch that
                        // moment, in which a crash loses the piece. The room
                        // only grows meanwhile.
                        room = screen.room().clamp(PIECE, MAX_PIECE);
                    }
                    before.append(&mut after);
                    text.push_str(&line);
                    text.push('\n');
                }
            }
        }
        before.append(&mut after);
        if !self.piece(store, screen, &mut text, &mut before, reply) {
            return;
        }
        if let Some(batch) = batch {
            reply(Reply::Committed(batch));
        }
        if self.commits >= COMMITS_PER_CHECKPOINT {
            self.commits = 0;
            if let Err(e) = store.checkpoint() {
                self.fail(e.to_string(), reply);
            }
        }
    }

    /// Commits `records`, then shows `text`; false once a commit failed.
    fn piece(
        &mut self,
        store: &mut Store,
        screen: &mut impl Screen,
        text: &mut String,
        records: &mut Vec<Record>,
        reply: &impl Fn(Reply),
    ) -> bool {
        if !records.is_empty() {
            let written = store.write_all(records.iter());
            records.clear();
            if let Err(e) = written {
                self.fail(e.to_string(), reply);
                return false;
            }
            self.commits += 1;
        }
        if !text.is_empty() {
            screen.show(text);
            text.clear();
        }
        true
    }

    fn fail(&mut self, message: String, reply: &impl Fn(Reply)) {
        self.failure = Some(message.clone());
        self.items.clear();
        reply(Reply::Failed(message));
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;
    use std::sync::{Arc, Mutex};

    use super::*;

    /// A directory of this test's own, empty.
    fn fresh_dir(label: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("peerchat-store-{label}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    fn key(n: u8) -> PublicKey {
        PublicKey::from_slice(&[n; 32]).unwrap()
    }

    fn party(n: u8, name: &str) -> Party {
        Party {
            key: key(n),
            name: name.into(),
        }
    }

    fn options(dir: &Path, history: bool) -> Options {
        Options {
            path: dir.join("sub/store.db"),
            owner: key(0),
            name: "me".into(),
            history,
        }
    }

    fn open(options: &Options) -> (Store, Saved) {
        Store::open(options.clone()).unwrap()
    }

    fn refusal(options: &Options) -> StoreError {
        match Store::open(options.clone()) {
            Ok(_) => panic!("{} was opened", options.path.display()),
            Err(e) => e,
        }
    }

    fn acked(target: &Party, through: u64) -> Record {
        Record::Acked {
            target: target.key,
            through,
        }
    }

    fn failed(id: u64, target: &Party, reason: &str, at: u64) -> Record {
        Record::Failed {
            id,
            target: target.key,
            reason: reason.into(),
            at,
        }
    }

    fn sent(id: u64, text: &str, direct: bool, targets: &[&Party]) -> Record {
        Record::Sent(Outgoing {
            id,
            text: text.into(),
            direct,
            sent_at: 1000 + id,
            targets: targets.iter().map(|&p| p.clone()).collect(),
        })
    }

    fn received(from: &Party, instance: u64, id: u64, text: &str, direct: bool) -> Record {
        Record::Received(Incoming {
            from: from.clone(),
            instance,
            id,
            text: text.into(),
            direct,
            sent_at: Some(500 + id),
            received_at: 2000 + id,
        })
    }

    fn outbox_of(options: &Options) -> Vec<(u64, Vec<String>)> {
        open(options)
            .1
            .outbox
            .into_iter()
            .map(|o| (o.id, o.targets.into_iter().map(|t| t.name).collect()))
            .collect()
    }

    fn history(store: &mut Store, with: Option<Party>, limit: usize) -> Vec<Entry> {
        store.query(&Query::History { with, limit }).unwrap()
    }

    fn search(store: &mut Store, text: &str, limit: usize) -> Vec<u64> {
        store
            .query(&Query::Search {
                text: text.into(),
                limit,
            })
            .unwrap()
            .into_iter()
            .map(|e| e.id)
            .collect()
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn a_new_store_is_private_and_keeps_its_instance_and_next_id() {
        let dir = fresh_dir("new");
        let options = options(&dir, true);
        let (mut store, saved) = open(&options);
        assert_ne!(saved.instance, 0);
        assert_eq!(saved.next_id, 1);
        assert!(saved.outbox.is_empty() && saved.seen.is_empty());
        assert_eq!(mode(&options.path), 0o600);
        assert_eq!(mode(&dir.join("sub")), 0o700);
        store
            .write(&[sent(7, "seven", false, &[&party(1, "a")])])
            .unwrap();
        let mut wal = options.path.clone().into_os_string();
        wal.push("-wal");
        assert_eq!(mode(Path::new(&wal)), 0o600);
        drop(store);

        let (mut store, again) = open(&options);
        assert_eq!(again.instance, saved.instance);
        assert_eq!(again.next_id, 8);
        // A lower id never lowers it.
        store
            .write(&[sent(3, "three", false, &[&party(1, "a")])])
            .unwrap();
        drop(store);
        assert_eq!(open(&options).1.next_id, 8);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_outbox_keeps_what_still_waits_on_someone() {
        let dir = fresh_dir("outbox");
        let options = options(&dir, true);
        let (a, b, c) = (party(1, "alice"), party(2, "bob"), party(3, "carol"));
        let (mut store, _) = open(&options);
        store
            .write(&[
                sent(1, "to all", false, &[&a, &b, &c]),
                sent(2, "to bob", true, &[&b]),
            ])
            .unwrap();
        drop(store);
        let (mut store, saved) = open(&options);
        assert_eq!(
            saved.outbox,
            [
                Outgoing {
                    id: 1,
                    text: "to all".into(),
                    direct: false,
                    sent_at: 1001,
                    targets: vec![a.clone(), b.clone(), c.clone()],
                },
                Outgoing {
                    id: 2,
                    text: "to bob".into(),
                    direct: true,
                    sent_at: 1002,
                    targets: vec![b.clone()],
                },
            ]
        );

        store
            .write(&[
                acked(&a, 1),
                failed(1, &b, "expired", 5),
                // Again: no harm.
                failed(1, &b, "expired", 6),
                // Nobody we know: ignored.
                Record::Acked {
                    target: key(9),
                    through: 5,
                },
                received(&party(3, "carol2"), 1, 1, "renamed", false),
            ])
            .unwrap();
        drop(store);
        assert_eq!(
            outbox_of(&options),
            [(1, vec!["carol2".into()]), (2, vec!["bob".into()])]
        );

        let (mut store, _) = open(&options);
        // Bob's acknowledgement delivers message 2; message 1 failed him already.
        store.write(&[acked(&b, 2)]).unwrap();
        drop(store);
        assert_eq!(outbox_of(&options), [(1, vec!["carol2".into()])]);

        let (mut store, _) = open(&options);
        store.write(&[Record::Settled { id: 1 }]).unwrap();
        drop(store);
        assert_eq!(outbox_of(&options), []);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn without_history_settled_messages_and_received_text_are_not_kept() {
        let dir = fresh_dir("nohistory");
        let options = options(&dir, false);
        let a = party(1, "alice");
        let (mut store, _) = open(&options);
        store
            .write(&[
                sent(1, "mine", false, &[&a]),
                received(&a, 40, 8, "secret", false),
                failed(1, &a, "expired", 5),
            ])
            .unwrap();
        // The outbox keeps its text until it settles.
        let everyone = history(&mut store, None, 10);
        assert_eq!(everyone.iter().map(|e| e.id).collect::<Vec<_>>(), [1]);
        assert_eq!(search(&mut store, "mine", 10), [1]);
        assert_eq!(search(&mut store, "secret", 10), Vec::<u64>::new());
        store.write(&[Record::Settled { id: 1 }]).unwrap();
        assert_eq!(history(&mut store, None, 10), []);
        assert_eq!(search(&mut store, "mine", 10), Vec::<u64>::new());
        let rows: i64 = store
            .conn
            .query_row(
                "SELECT (SELECT count(*) FROM messages) + (SELECT count(*) FROM failures)",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(rows, 0);
        drop(store);
        let saved = open(&options).1;
        assert_eq!(saved.seen, HashMap::from([(a.key, (40, 8))]));
        assert_eq!(saved.next_id, 2);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn seen_counts_within_the_sender_s_instance() {
        let dir = fresh_dir("seen");
        let options = options(&dir, true);
        let (a, b) = (party(1, "alice"), party(2, "bob"));
        let high = (1 << 63) + 5;
        let (mut store, _) = open(&options);
        store
            .write(&[
                received(&a, 10, 5, "five", false),
                received(&a, 10, 3, "three", false),
                received(&b, u64::MAX, 2, "two", false),
            ])
            .unwrap();
        store
            .write(&[
                received(&b, u64::MAX, high, "high", false),
                // Above 2^63 is still above.
                received(&b, u64::MAX, 4, "four", false),
            ])
            .unwrap();
        drop(store);
        let (mut store, saved) = open(&options);
        assert_eq!(
            saved.seen,
            HashMap::from([(a.key, (10, 5)), (b.key, (u64::MAX, high))])
        );
        // A new instance starts over, even lower.
        store.write(&[received(&a, 11, 2, "again", false)]).unwrap();
        drop(store);
        assert_eq!(open(&options).1.seen[&a.key], (11, 2));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn history_and_search_answer_with_each_target_s_outcome() {
        let dir = fresh_dir("history");
        let options = options(&dir, true);
        let (a, b) = (party(1, "alice"), party(2, "bob"));
        let (mut store, _) = open(&options);
        store
            .write(&[
                sent(1, "hello everyone", false, &[&a, &b]),
                received(&a, 1, 9, "hi me, privately", true),
                sent(2, "reply to alice", true, &[&a]),
                received(&b, 1, 4, r#"bob says "quoted" AND NEAR(x) col:umn*"#, false),
                acked(&a, 1),
                failed(1, &b, "expired", 5),
            ])
            .unwrap();

        let everyone = history(&mut store, None, 10);
        assert_eq!(
            everyone,
            [
                Entry {
                    id: 1,
                    from: "me".into(),
                    outgoing: true,
                    with: None,
                    text: "hello everyone".into(),
                    sent_at: Some(1001),
                    received_at: 1001,
                    targets: vec![
                        TargetState {
                            to: "alice".into(),
                            state: "delivered",
                            reason: None
                        },
                        TargetState {
                            to: "bob".into(),
                            state: "undelivered",
                            reason: Some("expired".into())
                        },
                    ],
                },
                Entry {
                    id: 4,
                    from: "bob".into(),
                    outgoing: false,
                    with: None,
                    text: r#"bob says "quoted" AND NEAR(x) col:umn*"#.into(),
                    sent_at: Some(504),
                    received_at: 2004,
                    targets: vec![],
                },
            ]
        );
        assert_eq!(history(&mut store, None, 1), everyone[1..]);
        assert_eq!(history(&mut store, None, 0), []);

        let with_alice = history(&mut store, Some(a.clone()), 10);
        assert_eq!(
            with_alice
                .iter()
                .map(|e| (e.id, e.from.as_str(), e.with.as_deref()))
                .collect::<Vec<_>>(),
            [(9, "alice", Some("alice")), (2, "me", Some("alice"))]
        );
        assert_eq!(with_alice[0].sent_at, Some(509));
        assert_eq!(
            with_alice[1].targets,
            [TargetState {
                to: "alice".into(),
                state: "queued",
                reason: None
            }]
        );
        assert_eq!(history(&mut store, Some(b.clone()), 10), []);
        assert_eq!(history(&mut store, Some(party(7, "nobody")), 10), []);

        let none = Vec::<u64>::new();
        assert_eq!(search(&mut store, "hello", 10), [1]);
        assert_eq!(search(&mut store, "HELLO  Everyone ", 10), [1]);
        assert_eq!(search(&mut store, "hello bob", 10), none);
        assert_eq!(search(&mut store, "alice", 10), [2]);
        assert_eq!(search(&mut store, r#""quoted""#, 10), [4]);
        assert_eq!(search(&mut store, "AND", 10), [4]);
        assert_eq!(search(&mut store, "NEAR(x)", 10), [4]);
        assert_eq!(search(&mut store, "col:umn*", 10), [4]);
        assert_eq!(search(&mut store, "OR", 10), none);
        assert_eq!(search(&mut store, r#"" ( ) * - ^ :"#, 10), none);
        assert_eq!(search(&mut store, "", 10), none);
        assert_eq!(search(&mut store, "  ", 10), none);
        // The last matches, oldest first.
        assert_eq!(search(&mut store, "e", 10), none);
        store
            .write(&[
                received(&b, 1, 5, "again and again", false),
                received(&b, 1, 6, "again", false),
            ])
            .unwrap();
        assert_eq!(search(&mut store, "again", 10), [5, 6]);
        assert_eq!(search(&mut store, "again", 1), [6]);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn garbage_is_not_a_store_and_is_left_alone() {
        let dir = fresh_dir("garbage");
        let options = options(&dir, true);
        fs::create_dir_all(options.path.parent().unwrap()).unwrap();
        let garbage: Vec<u8> = (0..8192u32).map(|i| (i * 7 + 3) as u8).collect();
        fs::write(&options.path, &garbage).unwrap();
        fs::set_permissions(&options.path, fs::Permissions::from_mode(0o600)).unwrap();
        let e = refusal(&options);
        assert!(matches!(e, StoreError::NotAStore { .. }), "{e:?}");
        assert!(e.to_string().contains("move it away"), "{e}");
        assert_eq!(fs::read(&options.path).unwrap(), garbage);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_store_others_may_write_is_refused() {
        let dir = fresh_dir("modes");
        let options = options(&dir, true);
        drop(open(&options));
        fs::set_permissions(&options.path, fs::Permissions::from_mode(0o666)).unwrap();
        let e = refusal(&options);
        assert!(
            matches!(e, StoreError::NotPrivate { mode: 0o666, .. }),
            "{e:?}"
        );
        assert!(e.to_string().contains("writable by nobody else"), "{e}");
        fs::set_permissions(&options.path, fs::Permissions::from_mode(0o644)).unwrap();
        drop(open(&options));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_store_in_use_is_refused() {
        let dir = fresh_dir("inuse");
        let options = options(&dir, true);
        let first = open(&options);
        let e = refusal(&options);
        assert!(matches!(e, StoreError::InUse { .. }), "{e:?}");
        assert!(e.to_string().contains("is me already running?"), "{e}");
        drop(first);
        drop(open(&options));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn another_identity_s_store_is_refused() {
        let dir = fresh_dir("owner");
        let options = options(&dir, true);
        drop(open(&options));
        let other = Options {
            owner: key(42),
            ..options.clone()
        };
        let e = refusal(&other);
        assert!(matches!(e, StoreError::OtherOwner { .. }), "{e:?}");
        let message = e.to_string();
        assert!(
            message.contains(&format!("belongs to key {}", key(0))),
            "{message}"
        );
        assert!(message.contains(&key(42).to_string()), "{message}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = fresh_dir("newer");
        let options = options(&dir, true);
        drop(open(&options));
        let conn = Connection::open(&options.path).unwrap();
        conn.pragma_update(None, "user_version", 99).unwrap();
        drop(conn);
        let e = refusal(&options);
        assert!(
            matches!(
                e,
                StoreError::Newer {
                    found: 99,
                    known: 1,
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(
            e.to_string()
                .contains("schema v99, this build knows up to v1"),
            "{e}"
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn another_application_s_database_is_refused() {
        let dir = fresh_dir("appid");
        let options = options(&dir, true);
        fs::create_dir_all(options.path.parent().unwrap()).unwrap();
        let conn = Connection::open(&options.path).unwrap();
        conn.execute_batch("CREATE TABLE t (x); PRAGMA application_id = 42;")
            .unwrap();
        drop(conn);
        let e = refusal(&options);
        assert!(matches!(e, StoreError::NotAStore { .. }), "{e:?}");
        assert!(e.to_string().contains("0x2a"), "{e}");
        // Nor is a database with tables but no application id.
        Connection::open(&options.path)
            .unwrap()
            .pragma_update(None, "application_id", 0)
            .unwrap();
        assert!(matches!(refusal(&options), StoreError::NotAStore { .. }));
        fs::remove_dir_all(&dir).unwrap();
    }

    /// What the thread showed, piece by piece.
    type Shown = Arc<Mutex<Vec<String>>>;

    struct Recorder(Shown);

    impl Screen for Recorder {
        fn room(&mut self) -> usize {
            PIECE
        }

        fn show(&mut self, text: &str) {
            self.0.lock().unwrap().push(text.to_string());
        }
    }

    fn line(text: &str) -> Item {
        Item::Line(text.into())
    }

    fn record(record: Record) -> Item {
        Item::Record(record)
    }

    #[test]
    fn the_thread_shows_lines_after_their_records_and_confirms_a_turn_after_both() {
        let dir = fresh_dir("thread");
        let options = options(&dir, true);
        let a = party(1, "alice");
        let (store, _) = open(&options);
        let shown = Shown::default();
        let (notify, notified) = mpsc::channel();
        let thread = store.spawn(Recorder(shown.clone()), move || {
            let _ = notify.send(());
        });
        let first = vec![
            record(sent(1, "one", false, &[&a])),
            line("sent 1"),
            record(sent(2, "two", false, &[&a])),
            line("sent 2"),
        ];
        thread.turn(first, Some(1)).unwrap();
        let history = Query::History {
            with: None,
            limit: 10,
        };
        thread.query(7, history).unwrap();
        for _ in 0..2 {
            notified.recv().unwrap();
        }
        let replies: Vec<Reply> = std::iter::from_fn(|| thread.try_reply()).collect();
        let [Reply::Committed(1), Reply::Answer {
            tag: 7,
            result: Ok(answer),
        }] = &replies[..]
        else {
            panic!("{replies:?}")
        };
        assert_eq!(answer.iter().map(|e| e.id).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(*shown.lock().unwrap(), ["sent 1\nsent 2\n"]);

        let second = vec![record(sent(3, "three", false, &[&a])), line("sent 3")];
        thread.turn(second, Some(2)).unwrap();
        notified.recv().unwrap();
        assert!(matches!(thread.try_reply(), Some(Reply::Committed(2))));
        assert_eq!(shown.lock().unwrap()[1..], ["sent 3\n"]);

        let last = vec![record(sent(4, "four", false, &[&a])), line("sent 4")];
        thread.turn(last, Some(3)).unwrap();
        thread.close().unwrap();
        assert_eq!(shown.lock().unwrap()[2..], ["sent 4\n"], "close finishes");
        let saved = open(&options).1;
        assert_eq!(
            saved.outbox.iter().map(|o| o.id).collect::<Vec<_>>(),
            [1, 2, 3, 4]
        );
        assert_eq!(saved.next_id, 5);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn output_is_shown_in_pieces_that_fit_the_room() {
        let dir = fresh_dir("pieces");
        let options = options(&dir, true);
        let a = party(1, "alice");
        let (store, _) = open(&options);
        let shown = Shown::default();
        let thread = store.spawn(Recorder(shown.clone()), || {});
        let lines: Vec<String> = (0..100).map(|i| format!("{i:0>99}")).collect();
        let mut items = Vec::new();
        for (i, text) in lines.iter().enumerate() {
            let id = i as u64 + 1;
            items.push(record(sent(id, text, false, &[&a])));
            items.push(line(text));
        }
        thread.turn(items, Some(1)).unwrap();
        thread.close().unwrap();
        let shown = shown.lock().unwrap();
        assert!(shown.len() > 1, "10 KB of lines in one piece");
        assert!(shown.iter().all(|piece| piece.len() <= PIECE), "{shown:?}");
        assert_eq!(shown.concat(), lines.join("\n") + "\n");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_failed_write_stops_the_thread_and_close_says_why() {
        let dir = fresh_dir("failed");
        let options = options(&dir, true);
        let a = party(1, "alice");
        let (store, _) = open(&options);
        store.conn.execute_batch("DROP TABLE failures").unwrap();
        let (notify, notified) = mpsc::channel();
        let shown = Shown::default();
        let thread = store.spawn(Recorder(shown.clone()), move || {
            let _ = notify.send(());
        });
        let turn = vec![
            record(sent(1, "lost", false, &[&a])),
            record(failed(1, &a, "expired", 5)),
            line("undelivered"),
        ];
        thread.turn(turn, Some(1)).unwrap();
        notified.recv().unwrap();
        let reply = thread.try_reply();
        assert!(
            matches!(&reply, Some(Reply::Failed(why)) if why.contains("no such table")),
            "{reply:?}"
        );
        assert!(
            shown.lock().unwrap().is_empty(),
            "nothing unrecorded is shown"
        );
        let later = vec![record(sent(2, "dropped", false, &[&a])), line("never")];
        thread.turn(later, Some(2)).unwrap();
        let why = thread.close().unwrap_err();
        assert!(why.contains("no such table"), "{why}");
        assert!(shown.lock().unwrap().is_empty(), "nor anything after it");
        let saved = open(&options).1;
        assert_eq!(saved.outbox, []);
        assert_eq!(saved.next_id, 1);
        fs::remove_dir_all(&dir).unwrap();
    }
}
