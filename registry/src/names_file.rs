//! The registry's record of who owns which name, kept across restarts in
//! the text file given with `--names`:
//!
//! ```text
//! 3q2+7wAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA= online alice
//! 9l3f0AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA= 1796000000 #general
//! ```
//!
//! One owner per line: its key, `online` or the Unix time (seconds) its
//! reservation ends, and the name as registered. The name comes last, so
//! that no name (not even one starting with `#`) reads as a comment; blank
//! lines and lines starting with `#` are ignored. The registry rewrites the
//! file whole, from a thread of its own, at most once a second while names
//! change, and once more when it stops; a crash loses at most the last
//! second.

use std::collections::HashSet;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use peerchat_core::identity::PublicKey;
use peerchat_core::protocol::{fold_name, normalize_name};
use peerchat_core::trusted_file;

use crate::Owner;

const HEADER: &str = "# peerchat registry: name owners (KEY online|UNIX-SECONDS NAME)\n";

/// What a names file held.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Loaded {
    pub owners: Vec<Owner>,
    /// Lines left out, and why: names the rules no longer allow (nobody
    /// could register them) and second lines for one name.
    pub skipped: Vec<String>,
}

/// The owners saved in the file at `path`, as of `wall_now`; a missing file
/// has none. Reservations already over are left out.
pub fn load(path: &Path, wall_now: SystemTime) -> Result<Loaded, String> {
    match trusted_file::read(path)? {
        Some(text) => parse(&text, wall_now).map_err(|e| format!("{}: {e}", path.display())),
        None => Ok(Loaded::default()),
    }
}

/// A line that is not an owner is an error: a registry that cannot read
/// its record whole would hand names to strangers.
pub fn parse(text: &str, wall_now: SystemTime) -> Result<Loaded, String> {
    let now = unix_secs(wall_now);
    let mut loaded = Loaded::default();
    let mut seen = HashSet::new();
    for (number, line) in text.lines().enumerate() {
        let number = number + 1;
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = |why: String| format!("line {number}: {why}");
        let mut fields = line.splitn(3, ' ');
        let (Some(key), Some(state), Some(name)) = (fields.next(), fields.next(), fields.next())
        else {
            return Err(bad(format!(
                "expected `KEY online NAME` or `KEY UNIX-SECONDS NAME`, found {line:?}"
            )));
        };
        let key = PublicKey::parse(key).map_err(bad)?;
        let reserved_for = match state {
            "online" => None,
            until => {
                let until: u64 = until.parse().map_err(|_| {
                    bad(format!(
                        "expected `online` or a Unix time in seconds, found {until:?}"
                    ))
                })?;
                match until.checked_sub(now) {
                    Some(left) if left > 0 => Some(Duration::from_secs(left)),
                    _ => continue,
                }
            }
        };
        match normalize_name(name) {
            Ok(normal) if normal == name => {}
            Ok(_) | Err(_) => {
                loaded.skipped.push(format!(
                    "line {number}: {name:?} is not a name the rules allow"
                ));
                continue;
            }
        }
        if !seen.insert(fold_name(name)) {
            loaded.skipped.push(format!(
                "line {number}: {name:?} is the same name as an earlier line"
            ));
            continue;
        }
        loaded.owners.push(Owner {
            name: name.to_string(),
            key,
            reserved_for,
        });
    }
    Ok(loaded)
}

/// The file's text for these owners, as of `wall_now`.
pub fn render(owners: &[Owner], wall_now: SystemTime) -> String {
    let now = unix_secs(wall_now);
    let mut text = String::with_capacity(HEADER.len() + owners.len() * 72);
    text.push_str(HEADER);
    for owner in owners {
        let state = match owner.reserved_for {
            None => "online".to_string(),
            // Rounded up: a reservation is never cut short by the file.
            Some(left) => (now + left.as_secs() + u64::from(left.subsec_nanos() > 0)).to_string(),
        };
        text.push_str(&format!("{} {state} {}\n", owner.key, owner.name));
    }
    text
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Writes the file from a thread of its own, so that the loop never waits
/// for a disk.
pub struct Saver {
    tx: Option<SyncSender<Save>>,
    thread: Option<JoinHandle<io::Result<()>>>,
    /// A save failed: the owners must be offered again even if they do not
    /// change, or the file would stay behind.
    failed: Arc<AtomicBool>,
}

struct Save {
    owners: Vec<Owner>,
    wall_now: SystemTime,
    last: bool,
}

impl Saver {
    pub fn start(path: PathBuf) -> io::Result<Saver> {
        // At most one save waits; `offer` says when the thread is behind.
        let (tx, rx) = mpsc::sync_channel::<Save>(1);
        let failed = Arc::new(AtomicBool::new(false));
        let failed_here = failed.clone();
        let thread = std::thread::Builder::new()
            .name("names".into())
            .spawn(move || {
                let mut failing = false;
                for save in rx {
                    let saved = trusted_file::replace(&path, &render(&save.owners, save.wall_now));
                    if save.last {
                        return saved;
                    }
                    failed_here.store(saved.is_err(), Ordering::Relaxed);
                    match saved {
                        Ok(()) if failing => {
                            failing = false;
                            tracing::info!(path = %path.display(), "name owners saved again");
                        }
                        Ok(()) => {}
                        // Said once per spell of failures, not once a second.
                        Err(e) if !failing => {
                            failing = true;
                            tracing::warn!(path = %path.display(), error = %e, "cannot save the name owners; a restart would forget recent ones");
                        }
                        Err(_) => {}
                    }
                }
                Ok(())
            })?;
        Ok(Saver {
            tx: Some(tx),
            thread: Some(thread),
            failed,
        })
    }

    /// Whether the last save failed (once per failure): offer the owners
    /// again.
    pub fn take_failed(&self) -> bool {
        self.failed.swap(false, Ordering::Relaxed)
    }

    /// Hands over a save unless the thread is still busy with the one
    /// before; false if it was not taken (offer it again later).
    pub fn offer(&self, owners: Vec<Owner>, wall_now: SystemTime) -> bool {
        let save = Save {
            owners,
            wall_now,
            last: false,
        };
        match &self.tx {
            Some(tx) => match tx.try_send(save) {
                Ok(()) => true,
                Err(TrySendError::Full(_)) => false,
                Err(TrySendError::Disconnected(_)) => true,
            },
            None => true,
        }
    }

    /// Saves these owners after anything still waiting, and returns once
    /// they are on disk (or why they are not).
    pub fn finish(mut self, owners: Vec<Owner>, wall_now: SystemTime) -> io::Result<()> {
        let save = Save {
            owners,
            wall_now,
            last: true,
        };
        if let Some(tx) = self.tx.take() {
            tx.send(save)
                .map_err(|_| io::Error::other("the saving thread is gone"))?;
        }
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(saved)) => saved,
            Some(Err(_)) => Err(io::Error::other("the saving thread panicked")),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(byte: u8) -> PublicKey {
        PublicKey::from_slice(&[byte; 32]).unwrap()
    }

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn owners_round_trip_through_the_text() {
        let owners = vec![
            Owner {
                name: "Alice".into(),
                key: key(1),
                reserved_for: None,
            },
            Owner {
                name: "émile".into(),
                key: key(2),
                reserved_for: Some(Duration::from_millis(59_500)),
            },
            Owner {
                name: "#general".into(),
                key: key(3),
                reserved_for: None,
            },
        ];
        let text = render(&owners, at(1_000));
        assert!(text.starts_with('#'));
        assert!(text.contains(&format!("{} online Alice\n", key(1))));
        assert!(text.contains(&format!("{} 1060 émile\n", key(2))));
        let back = parse(&text, at(1_010)).unwrap();
        assert!(back.skipped.is_empty(), "{:?}", back.skipped);
        assert_eq!(back.owners[0], owners[0]);
        assert_eq!(back.owners[1].reserved_for, Some(Duration::from_secs(50)));
        assert_eq!(back.owners[2], owners[2], "a name is never a comment");
        assert_eq!(parse(&text, at(1_060)).unwrap().owners.len(), 2, "over");
    }

    #[test]
    fn a_bad_line_is_an_error_with_its_number() {
        let good = format!("{} online alice\n", key(1));
        for (line, why) in [
            (format!("{} alice", key(1)), "expected"),
            ("notakey online alice".to_string(), "line 2"),
            (format!("{} soon alice", key(1)), "Unix time"),
        ] {
            let err = parse(&format!("{good}{line}\n"), at(0)).unwrap_err();
            assert!(err.contains("line 2") && err.contains(why), "{line}: {err}");
        }
    }

    #[test]
    fn names_nobody_could_register_and_repeats_are_skipped_with_a_reason() {
        let text = format!(
            "{k} online alice\n{k} online {long}\n{k} online {hidden}\n{k} online ALICE\n",
            k = key(1),
            long = "x".repeat(40),
            hidden = "bad\u{202E}name"
        );
        let loaded = parse(&text, at(0)).unwrap();
        assert_eq!(loaded.owners.len(), 1);
        assert_eq!(loaded.skipped.len(), 3, "{:?}", loaded.skipped);
        assert!(loaded.skipped[0].starts_with("line 2:"));
        assert!(loaded.skipped[2].contains("same name"));
    }

    #[test]
    fn the_saver_writes_the_last_state_before_finish_returns() {
        let dir = std::env::temp_dir().join(format!("peerchat-names-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("names");
        let saver = Saver::start(path.clone()).unwrap();
        let owner = |name: &str| Owner {
            name: name.into(),
            key: key(1),
            reserved_for: None,
        };
        let _ = saver.offer(vec![owner("early")], at(0));
        saver.finish(vec![owner("last")], at(0)).unwrap();
        let loaded = load(&path, at(0)).unwrap();
        assert_eq!(loaded.owners, vec![owner("last")], "the final state");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A names path where a directory stands, so that no save can replace
    /// it; and the directory to remove afterwards.
    fn unwritable(label: &str) -> (PathBuf, PathBuf) {
        let dir =
            std::env::temp_dir().join(format!("peerchat-names-{label}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("names");
        std::fs::create_dir_all(&path).unwrap();
        (dir, path)
    }

    #[test]
    fn a_failed_save_asks_to_be_offered_again() {
        let (dir, path) = unwritable("retry");
        let saver = Saver::start(path.clone()).unwrap();
        assert!(saver.offer(Vec::new(), at(0)));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !saver.take_failed() {
            assert!(std::time::Instant::now() < deadline, "never reported");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(!saver.take_failed(), "once per failure");
        std::fs::remove_dir(&path).unwrap();
        saver.finish(Vec::new(), at(0)).unwrap();
        assert!(path.is_file(), "and a later save gets through");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_final_save_that_fails_says_so() {
        let (dir, path) = unwritable("final");
        let saver = Saver::start(path).unwrap();
        assert!(saver.finish(Vec::new(), at(0)).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
