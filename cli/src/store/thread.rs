//! The store's own thread: it writes what the loop hands it, turn by
//! turn, shows the output that goes with it, and answers queries, so that
//! the loop never waits for the disk.

use std::io;
use std::sync::mpsc::{self, Receiver, Sender};
use std::thread;

use super::Store;
use crate::journal::{Entry, Query, Record};

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

impl Store {
    /// Moves the store to a thread of its own, which also shows the lines
    /// it is given on `screen`; `notify` is called (from that thread) after
    /// every reply is queued.
    pub fn spawn(
        self,
        screen: impl Screen,
        notify: impl Fn() + Send + 'static,
    ) -> io::Result<StoreThread> {
        let (requests, inbox) = mpsc::channel();
        let (outbox, replies) = mpsc::channel();
        let thread = thread::Builder::new()
            .name("store".into())
            .spawn(move || serve(self, &inbox, &outbox, screen, notify))?;
        Ok(StoreThread {
            requests,
            replies,
            thread,
        })
    }
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

impl Screen for Box<dyn Screen> {
    fn room(&mut self) -> usize {
        (**self).room()
    }

    fn show(&mut self, text: &str) {
        (**self).show(text);
    }
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
    /// A line the user typed, for the input history: written with the
    /// turn, and nothing waits on it.
    Typed(String),
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
        let mut typed: Vec<String> = Vec::new();
        for item in items {
            match item {
                Item::Record(record) => after.push(record),
                Item::Typed(line) => typed.push(line),
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
        if let Err(e) = store.remember(&typed) {
            self.fail(e.to_string(), reply);
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
