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
use std::time::Duration;

use peerchat_core::identity::PublicKey;
use peerchat_core::trusted_file;
use rusqlite::types::Type;
use rusqlite::{params, Connection, ErrorCode, OpenFlags, OptionalExtension, Row};

use crate::journal::{Entry, Outgoing, Party, Query, Record, Saved, TargetState, Transfer};

mod thread;
pub use thread::{Item, Reply, Screen, StoreThread, ThreadGone, PIECE};

/// `PRAGMA application_id` of a peerchat store: "pcht".
const APPLICATION_ID: i32 = 0x7063_6874;

/// The schema, one step per version: step `i` takes a store from version
/// `i` to `i + 1` (`PRAGMA user_version`). A release that changes the schema
/// appends a step; a published step never changes, or stores made with it
/// would differ from new ones.
/// Typed lines the store keeps: as many as the UI recalls.
const TYPED_KEPT: usize = crate::tui::HISTORY_KEPT;

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
    // v2. What the user typed in the full-screen UI, for Up and Down.
    "CREATE TABLE typed (id INTEGER PRIMARY KEY, line TEXT NOT NULL);",
    // v3. File transfers under way (`journal::Transfer`).
    "CREATE TABLE transfers (
         id INTEGER NOT NULL,
         outgoing INTEGER NOT NULL,
         pid INTEGER NOT NULL REFERENCES peers,
         path TEXT NOT NULL,
         name TEXT NOT NULL,
         size INTEGER NOT NULL,
         sha256 BLOB NOT NULL,
         PRIMARY KEY (pid, id, outgoing)
     ) WITHOUT ROWID;",
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

mod writer;
use writer::Writer;

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

    /// Lines the user typed, in one transaction; only the last
    /// `TYPED_KEPT` stay. Kept only with history on.
    pub fn remember(&mut self, lines: &[String]) -> Result<(), StoreError> {
        if !self.options.history || lines.is_empty() {
            return Ok(());
        }
        let written = (|| {
            let tx = self.conn.transaction()?;
            {
                let mut insert = tx.prepare_cached("INSERT INTO typed (line) VALUES (?1)")?;
                for line in lines {
                    insert.execute([line])?;
                }
            }
            tx.execute(
                "DELETE FROM typed WHERE id <= (SELECT max(id) FROM typed) - ?1",
                [sql_limit(TYPED_KEPT)],
            )?;
            tx.commit()
        })();
        written.map_err(|e| self.failed(e))
    }

    /// The last lines typed, oldest first.
    pub fn typed(&self) -> Result<Vec<String>, StoreError> {
        let read = (|| {
            let mut select = self
                .conn
                .prepare("SELECT line FROM typed ORDER BY id DESC LIMIT ?1")?;
            let mut lines = select
                .query_map([sql_limit(TYPED_KEPT)], |row| row.get(0))?
                .collect::<rusqlite::Result<Vec<String>>>()?;
            lines.reverse();
            Ok(lines)
        })();
        read.map_err(|e| self.failed(e))
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
            transfers: transfers(conn)?,
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
        let mut writer = Writer::new(&tx, &mut self.pids, self.options.history);
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
    if !trusted_file::writable_by_us_alone(&meta) {
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

fn transfers(conn: &Connection) -> rusqlite::Result<Vec<Transfer>> {
    conn.prepare(
        "SELECT t.id, t.outgoing, p.key, p.name, t.path, t.name, t.size, t.sha256
         FROM transfers AS t JOIN peers AS p ON p.pid = t.pid ORDER BY t.pid, t.id",
    )?
    .query_map([], |row| {
        let sha256: Vec<u8> = row.get(7)?;
        Ok(Transfer {
            id: uint(row.get(0)?),
            outgoing: row.get(1)?,
            peer: Party {
                key: key(row, 2)?,
                name: row.get(3)?,
            },
            path: row.get(4)?,
            name: row.get(5)?,
            size: uint(row.get(6)?),
            sha256: sha256.try_into().map_err(|_| {
                rusqlite::Error::FromSqlConversionFailure(
                    7,
                    rusqlite::types::Type::Blob,
                    "a SHA-256 is 32 bytes".into(),
                )
            })?,
        })
    })?
    .collect()
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

#[cfg(test)]
mod tests;
