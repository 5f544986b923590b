//! Files on this machine's disk, for transfers between peers: a thread of
//! its own hashes, reads and writes them, so that the loop never waits
//! for the disk (hashing a large file takes seconds).
//!
//! The peer machine asks with [`DiskOp`]s, numbered by transfer, and hears
//! back with [`DiskReply`]s, in the order it asked. A received file is
//! written to a hidden partial file beside where it will be saved, hashed
//! as it is written, and saved under its name only once whole and
//! matching the SHA-256 it was offered with; a failed one is removed.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::thread;
use std::time::SystemTime;

use ring::digest::{Context, SHA256};

/// Why a transfer failed: the `code` of `file_cancel` on the wire and of
/// `file_failed` events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileCode {
    /// The receiver said no.
    Rejected,
    /// Not accepted, or no progress, within the offer's lifetime.
    Expired,
    /// One side's user cancelled it, or quit.
    Cancelled,
    /// Over the receiver's `--max-file-size`.
    TooLarge,
    /// The receiver holds as many offers as it takes.
    Busy,
    /// What arrived does not match the offered SHA-256.
    Corrupt,
    /// Reading or writing the file failed (the disk is full, a directory
    /// cannot be made, …).
    Io,
    /// The file being sent changed or disappeared.
    Changed,
    /// The other side does not know the transfer.
    Unknown,
    /// The other side broke the transfer rules.
    Protocol,
    /// The target is listed with another key than the one the offer was for.
    KeyChanged,
    /// No path to the target: nobody can dial it and the registry would
    /// not relay (ours alone: never sent, since there is no link to say it).
    Unreachable,
    /// The registry's relay is full (ours alone, like `Unreachable`).
    RelayFull,
}

impl FileCode {
    pub fn as_str(self) -> &'static str {
        match self {
            FileCode::Rejected => "rejected",
            FileCode::Expired => "expired",
            FileCode::Cancelled => "cancelled",
            FileCode::TooLarge => "too_large",
            FileCode::Busy => "busy",
            FileCode::Corrupt => "corrupt",
            FileCode::Io => "io",
            FileCode::Changed => "changed",
            FileCode::Unknown => "unknown",
            FileCode::Protocol => "protocol",
            FileCode::KeyChanged => "key_changed",
            FileCode::Unreachable => "unreachable",
            FileCode::RelayFull => "relay_full",
        }
    }

    /// A code the other side sent; the protocol lets later versions add
    /// codes, which read as `cancelled`.
    pub fn parse(code: &str) -> FileCode {
        [
            FileCode::Rejected,
            FileCode::Expired,
            FileCode::TooLarge,
            FileCode::Busy,
            FileCode::Corrupt,
            FileCode::Io,
            FileCode::Changed,
            FileCode::Unknown,
            FileCode::Protocol,
            FileCode::KeyChanged,
        ]
        .into_iter()
        .find(|c| c.as_str() == code)
        .unwrap_or(FileCode::Cancelled)
    }
}

/// What the peer machine asks of the disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskOp {
    /// Open a file to send, and hash it.
    Prepare { transfer: u64, path: PathBuf },
    /// Read `len` bytes at `offset` of a prepared file.
    Read {
        transfer: u64,
        /// Handed back with the data: the machine drops what it asked
        /// for over a link that has broken since.
        epoch: u32,
        offset: u64,
        len: usize,
    },
    /// Open the partial file of a file to receive into `dir`, or reopen it
    /// to resume: [`DiskReply::Opened`] says how much it holds.
    Receive {
        transfer: u64,
        dir: PathBuf,
        /// Already safe ([`peerchat_core::file_name::safe_file_name`]).
        name: String,
        /// The sender's id for the transfer: names the partial file.
        id: u64,
        size: u64,
        sha256: [u8; 32],
    },
    /// Write `data` at `offset`, which is where the partial file ends.
    Write {
        transfer: u64,
        offset: u64,
        data: Vec<u8>,
    },
    /// Done with the transfer; its partial file goes if `discard`.
    Close { transfer: u64, discard: bool },
    /// Removes the partial file a [`DiskOp::Receive`] with these would
    /// open: for a transfer kept from an earlier run that ends unopened.
    Discard { dir: PathBuf, name: String, id: u64 },
}

/// What the disk answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskReply {
    Prepared {
        transfer: u64,
        /// The file's name, as offered.
        name: String,
        size: u64,
        sha256: [u8; 32],
    },
    Read {
        transfer: u64,
        epoch: u32,
        offset: u64,
        data: Vec<u8>,
    },
    Opened {
        transfer: u64,
        have: u64,
    },
    /// Every byte before `through` is written.
    Written {
        transfer: u64,
        through: u64,
    },
    /// The last byte is written, the whole file matched, and it is saved at
    /// `path`.
    Saved {
        transfer: u64,
        path: PathBuf,
    },
    /// The transfer cannot go on; a partial file is removed.
    Failed {
        transfer: u64,
        code: FileCode,
        message: String,
    },
}

/// The hidden file a transfer is written to until it is whole: named by
/// the transfer's id, so that a resume finds it.
fn partial_path(dir: &Path, name: &str, id: u64) -> PathBuf {
    dir.join(format!(".{name}.{id:016x}.peerchat-part"))
}

/// `name`, or `name (1).ext`, `name (2).ext`, …: the `n`th choice.
fn numbered(name: &str, n: u32) -> String {
    if n == 0 {
        return name.to_string();
    }
    match name.find('.') {
        Some(dot) => format!("{} ({n}){}", &name[..dot], &name[dot..]),
        None => format!("{name} ({n})"),
    }
}

/// Gives the partial file its name in `dir`, never over a file there:
/// a hard link fails if the name is taken, where a rename would replace it.
fn save(partial: &Path, dir: &Path, name: &str) -> io::Result<PathBuf> {
    for n in 0..10_000 {
        let path = dir.join(numbered(name, n));
        match fs::hard_link(partial, &path) {
            Ok(()) => {
                fs::remove_file(partial)?;
                return Ok(path);
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            // A file system without hard links: check, then rename (a
            // file made in between would be replaced).
            Err(e)
                if e.kind() == io::ErrorKind::PermissionDenied
                    || e.raw_os_error() == Some(libc::EXDEV) =>
            {
                if path.symlink_metadata().is_ok() {
                    continue;
                }
                fs::rename(partial, &path)?;
                return Ok(path);
            }
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::other(format!(
        "{name} and 10,000 numbered names are taken"
    )))
}

/// `~/…` from the user's home, as a shell would read it.
fn expand_home(path: &Path) -> PathBuf {
    match (path.strip_prefix("~"), std::env::var_os("HOME")) {
        (Ok(rest), Some(home)) => PathBuf::from(home).join(rest),
        _ => path.to_path_buf(),
    }
}

/// A file being sent, as it was when hashed.
struct Source {
    file: File,
    size: u64,
    modified: Option<SystemTime>,
}

/// A file being received.
struct Sink {
    file: File,
    partial: PathBuf,
    dir: PathBuf,
    name: String,
    size: u64,
    sha256: [u8; 32],
    hasher: Context,
    have: u64,
}

#[derive(Default)]
struct Worker {
    sending: HashMap<u64, Source>,
    receiving: HashMap<u64, Sink>,
    /// Set when the peer exits: a file being hashed is given up, so that
    /// quitting does not wait seconds for a large one.
    stopping: Arc<AtomicBool>,
}

impl Worker {
    fn handle(&mut self, op: DiskOp) -> Option<DiskReply> {
        Some(match op {
            DiskOp::Prepare { transfer, path } => match self.prepare(transfer, &path) {
                Ok(reply) => reply,
                Err(e) => failed(transfer, FileCode::Io, format!("{}: {e}", path.display())),
            },
            DiskOp::Read {
                transfer,
                epoch,
                offset,
                len,
            } => match self.read(transfer, offset, len) {
                Ok(data) => DiskReply::Read {
                    transfer,
                    epoch,
                    offset,
                    data,
                },
                Err(message) => {
                    self.sending.remove(&transfer);
                    failed(transfer, FileCode::Changed, message)
                }
            },
            DiskOp::Receive {
                transfer,
                dir,
                name,
                id,
                size,
                sha256,
            } => self
                .open(transfer, dir, name, id, size, sha256)
                .unwrap_or_else(|e| failed(transfer, FileCode::Io, e.to_string())),
            DiskOp::Write {
                transfer,
                offset,
                data,
            } => {
                let sink = self.receiving.get_mut(&transfer)?;
                match write(sink, offset, &data) {
                    Ok(false) => DiskReply::Written {
                        transfer,
                        through: sink.have,
                    },
                    Ok(true) => {
                        let sink = self.receiving.remove(&transfer)?;
                        match finish(sink) {
                            Ok(path) => DiskReply::Saved { transfer, path },
                            Err((code, message)) => failed(transfer, code, message),
                        }
                    }
                    Err((code, message)) => {
                        if let Some(sink) = self.receiving.remove(&transfer) {
                            let _ = fs::remove_file(&sink.partial);
                        }
                        failed(transfer, code, message)
                    }
                }
            }
            DiskOp::Discard { dir, name, id } => {
                let partial = partial_path(&expand_home(&dir), &name, id);
                match fs::remove_file(&partial) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => {
                        tracing::warn!(path = %partial.display(), error = %e, "cannot remove a partial file");
                    }
                }
                return None;
            }
            DiskOp::Close { transfer, discard } => {
                self.sending.remove(&transfer);
                if let Some(sink) = self.receiving.remove(&transfer) {
                    if discard {
                        if let Err(e) = fs::remove_file(&sink.partial) {
                            tracing::warn!(path = %sink.partial.display(), error = %e, "cannot remove a partial file");
                        }
                    }
                }
                return None;
            }
        })
    }

    fn prepare(&mut self, transfer: u64, path: &Path) -> io::Result<DiskReply> {
        let path = expand_home(path);
        // Checked before opening: opening a FIFO for reading would wait
        // for a writer.
        if !fs::metadata(&path)?.is_file() {
            return Err(io::Error::other("not a regular file"));
        }
        let mut file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&path)?;
        let meta = file.metadata()?;
        let (size, modified) = (meta.len(), meta.modified().ok());
        let (hasher, hashed) = self.hash(&mut file, u64::MAX)?;
        if hashed != size || unchanged(&file, size, modified).is_err() {
            return Err(io::Error::other("the file changed while it was hashed"));
        }
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .ok_or_else(|| io::Error::other("the path names no file"))?;
        self.sending.insert(
            transfer,
            Source {
                file,
                size,
                modified,
            },
        );
        Ok(DiskReply::Prepared {
            transfer,
            name,
            size,
            sha256: digest(hasher),
        })
    }

    /// Hashes `file` from where it is read up to `limit` bytes or its end;
    /// says how many bytes that was.
    fn hash(&self, file: &mut File, limit: u64) -> io::Result<(Context, u64)> {
        let mut hasher = Context::new(&SHA256);
        let mut buf = vec![0; 256 * 1024];
        let mut hashed = 0u64;
        while hashed < limit {
            if self.stopping.load(Ordering::Relaxed) {
                return Err(io::Error::other("the peer is stopping"));
            }
            let n = file.read(&mut buf)?;
            if n == 0 {
                break;
            }
            let n = n.min(usize::try_from(limit - hashed).unwrap_or(usize::MAX));
            hasher.update(&buf[..n]);
            hashed += n as u64;
        }
        Ok((hasher, hashed))
    }

    fn read(&mut self, transfer: u64, offset: u64, len: usize) -> Result<Vec<u8>, String> {
        let source = self
            .sending
            .get(&transfer)
            .ok_or("the file is no longer open")?;
        unchanged(&source.file, source.size, source.modified)?;
        let mut data = vec![0; len];
        source
            .file
            .read_exact_at(&mut data, offset)
            .map_err(|e| format!("cannot read the file: {e}"))?;
        Ok(data)
    }

    fn open(
        &mut self,
        transfer: u64,
        dir: PathBuf,
        name: String,
        id: u64,
        size: u64,
        sha256: [u8; 32],
    ) -> io::Result<DiskReply> {
        let dir = expand_home(&dir);
        fs::create_dir_all(&dir)
            .map_err(|e| io::Error::new(e.kind(), format!("cannot make {}: {e}", dir.display())))?;
        let partial = partial_path(&dir, &name, id);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&partial)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", partial.display())))?;
        let mut have = file.metadata()?.len();
        if have > size {
            file.set_len(0)?;
            have = 0;
        }
        // Resuming: what is held goes into the hash as if it had just
        // arrived.
        let (hasher, hashed) = self.hash(&mut file, have)?;
        let sink = Sink {
            file,
            partial,
            dir,
            name,
            size,
            sha256,
            hasher,
            have: hashed,
        };
        if sink.have == size {
            // An empty file, or one whole before a restart but not saved.
            return Ok(match finish(sink) {
                Ok(path) => DiskReply::Saved { transfer, path },
                Err((code, message)) => failed(transfer, code, message),
            });
        }
        let have = sink.have;
        self.receiving.insert(transfer, sink);
        Ok(DiskReply::Opened { transfer, have })
    }
}

/// Fails if the file being sent is not as it was hashed.
fn unchanged(file: &File, size: u64, modified: Option<SystemTime>) -> Result<(), String> {
    let meta = file
        .metadata()
        .map_err(|e| format!("cannot read the file's metadata: {e}"))?;
    if meta.len() != size || meta.modified().ok() != modified {
        return Err("the file changed after it was offered".into());
    }
    Ok(())
}

/// Writes a chunk; true once the file is whole.
fn write(sink: &mut Sink, offset: u64, data: &[u8]) -> Result<bool, (FileCode, String)> {
    let io_error = |e: io::Error| (FileCode::Io, format!("{}: {e}", sink.partial.display()));
    if offset != sink.have || sink.have + data.len() as u64 > sink.size {
        return Err((
            FileCode::Protocol,
            format!(
                "a write at {offset} of {} bytes does not continue the {} held",
                data.len(),
                sink.have
            ),
        ));
    }
    sink.file.write_all_at(data, offset).map_err(io_error)?;
    sink.hasher.update(data);
    let before = sink.have;
    sink.have += data.len() as u64;
    if before / WRITEBACK_EVERY != sink.have / WRITEBACK_EVERY {
        start_writeback(&sink.file, sink.have);
    }
    Ok(sink.have == sink.size)
}

/// A received file is handed to the disk in steps of this many bytes.
const WRITEBACK_EVERY: u64 = 8 << 20;

/// Starts writing out what the file holds before `through`, without
/// waiting. Left to the kernel, gigabytes of a large file stay dirty in
/// memory and go out in a burst, and every fsync meanwhile waits for them
/// (ext4 orders a file's data before the journal): the store's commits,
/// and with them the chat shown during the transfer, stalled for a
/// quarter of a second. Only a hint: an error here shows in the final sync.
fn start_writeback(file: &File, through: u64) {
    use std::os::fd::AsRawFd;
    let from = through.saturating_sub(WRITEBACK_EVERY) as libc::off64_t;
    // SAFETY: a plain system call on a descriptor we own.
    unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            from,
            WRITEBACK_EVERY as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}

/// Verifies a whole file and saves it; one that does not match is removed.
fn finish(sink: Sink) -> Result<PathBuf, (FileCode, String)> {
    let io_error = |e: io::Error| (FileCode::Io, format!("{}: {e}", sink.partial.display()));
    let outcome = if digest(sink.hasher.clone()) != sink.sha256 {
        Err((
            FileCode::Corrupt,
            "the file that arrived does not match the SHA-256 it was offered with; it was removed"
                .into(),
        ))
    } else {
        sink.file
            .sync_all()
            .and_then(|()| save(&sink.partial, &sink.dir, &sink.name))
            .map_err(io_error)
    };
    if outcome.is_err() {
        let _ = fs::remove_file(&sink.partial);
    }
    outcome
}

fn digest(hasher: Context) -> [u8; 32] {
    let mut out = [0; 32];
    out.copy_from_slice(hasher.finish().as_ref());
    out
}

fn failed(transfer: u64, code: FileCode, message: String) -> DiskReply {
    DiskReply::Failed {
        transfer,
        code,
        message,
    }
}

/// The disk's thread.
pub struct DiskThread {
    requests: Sender<DiskOp>,
    replies: Receiver<DiskReply>,
    thread: thread::JoinHandle<()>,
    stopping: Arc<AtomicBool>,
}

/// The disk's thread is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the disk thread stopped")]
pub struct DiskGone;

impl DiskThread {
    /// Starts the thread; `notify` is called (from it) after every reply.
    pub fn spawn(notify: impl Fn() + Send + 'static) -> io::Result<DiskThread> {
        let (requests, inbox) = mpsc::channel::<DiskOp>();
        let (outbox, replies) = mpsc::channel();
        let stopping = Arc::new(AtomicBool::new(false));
        let mut worker = Worker {
            stopping: stopping.clone(),
            ..Worker::default()
        };
        let thread = thread::Builder::new().name("disk".into()).spawn(move || {
            for op in inbox {
                if let Some(reply) = worker.handle(op) {
                    if outbox.send(reply).is_err() {
                        return;
                    }
                    notify();
                }
            }
        })?;
        Ok(DiskThread {
            requests,
            replies,
            thread,
            stopping,
        })
    }

    pub fn request(&self, op: DiskOp) -> Result<(), DiskGone> {
        self.requests.send(op).map_err(|_| DiskGone)
    }

    pub fn try_reply(&self) -> Option<DiskReply> {
        self.replies.try_recv().ok()
    }

    /// Waits for what was asked (partial files removed) to be done; a file
    /// being hashed is given up.
    pub fn close(self) {
        self.stopping.store(true, Ordering::Relaxed);
        drop(self.requests);
        let _ = self.thread.join();
    }
}

#[cfg(test)]
mod tests;
