//! The registry's record of who owns which name, kept across restarts in a
//! text file next to its key (`--names`):
//!
//! ```text
//! alice 3q2+7wAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA= online
//! bob 9l3f0AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA= 1796000000
//! ```
//!
//! One owner per line: the name as registered, its key, and `online` or the
//! Unix time (seconds) its reservation ends. Blank lines and lines starting
//! with `#` are ignored. The registry rewrites the file whole, from a thread
//! of its own, at most once a second while names change, and once more when
//! it stops; a crash loses at most the last second.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use peerchat_core::identity::PublicKey;
use peerchat_core::protocol::normalize_name;
use peerchat_core::trusted_file;

use crate::Owner;

const HEADER: &str = "# peerchat registry: name owners (NAME KEY online|UNIX-SECONDS)\n";

/// The owners saved in the file at `path`, as of `wall_now`; a missing file
/// has none. Reservations already over are left out.
pub fn load(path: &Path, wall_now: SystemTime) -> Result<Vec<Owner>, String> {
    match trusted_file::read(path)? {
        Some(text) => parse(&text, wall_now).map_err(|e| format!("{}: {e}", path.display())),
        None => Ok(Vec::new()),
    }
}

/// A line that is not an owner is an error: a registry that cannot read
/// its record whole would hand names to strangers.
pub fn parse(text: &str, wall_now: SystemTime) -> Result<Vec<Owner>, String> {
    let now = unix_secs(wall_now);
    let mut owners = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = |why: String| format!("line {}: {why}", number + 1);
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [name, key, state] = fields[..] else {
            return Err(bad(format!(
                "expected `NAME KEY online` or `NAME KEY UNIX-SECONDS`, found {line:?}"
            )));
        };
        match normalize_name(name) {
            Ok(normal) if normal == name => {}
            Ok(_) => return Err(bad(format!("{name:?} is not a name as registered"))),
            Err(why) => return Err(bad(why)),
        }
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
        owners.push(Owner {
            name: name.to_string(),
            key,
            reserved_for,
        });
    }
    Ok(owners)
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
        text.push_str(&format!("{} {} {state}\n", owner.name, owner.key));
    }
    text
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Writes the file from a thread of its own, so that the loop never waits
/// for a disk.
pub struct Saver {
    tx: Option<SyncSender<(Vec<Owner>, SystemTime)>>,
    thread: Option<JoinHandle<()>>,
}

impl Saver {
    pub fn start(path: PathBuf) -> std::io::Result<Saver> {
        // One save waiting at most: a newer one replaces it (see `offer`).
        let (tx, rx) = mpsc::sync_channel::<(Vec<Owner>, SystemTime)>(1);
        let thread = std::thread::Builder::new()
            .name("names".into())
            .spawn(move || {
                let mut failing = false;
                for (owners, wall_now) in rx {
                    match trusted_file::replace(&path, &render(&owners, wall_now)) {
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
            })?;
        Ok(Saver {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    /// Hands over a save unless one is still waiting; false if it was not
    /// taken (try again later).
    pub fn offer(&self, owners: Vec<Owner>, wall_now: SystemTime) -> bool {
        match &self.tx {
            Some(tx) => match tx.try_send((owners, wall_now)) {
                Ok(()) => true,
                Err(TrySendError::Full(_)) => false,
                Err(TrySendError::Disconnected(_)) => true,
            },
            None => true,
        }
    }

    /// Saves these owners after anything still waiting, and returns once
    /// they are on disk.
    pub fn finish(mut self, owners: Vec<Owner>, wall_now: SystemTime) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send((owners, wall_now));
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
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
        ];
        let text = render(&owners, at(1_000));
        assert!(text.starts_with('#'));
        assert!(text.contains(&format!("Alice {} online\n", key(1))));
        assert!(text.contains(&format!("émile {} 1060\n", key(2))));
        let back = parse(&text, at(1_010)).unwrap();
        assert_eq!(back[0], owners[0]);
        assert_eq!(back[1].reserved_for, Some(Duration::from_secs(50)));
        assert_eq!(parse(&text, at(1_060)).unwrap().len(), 1, "over");
    }

    #[test]
    fn a_bad_line_is_an_error_with_its_number() {
        let good = format!("alice {} online\n", key(1));
        for (line, why) in [
            (format!("alice {}", key(1)), "expected"),
            ("alice notakey online".to_string(), "line 2"),
            (format!("alice {} soon", key(1)), "Unix time"),
            (format!("{} {} online", "x".repeat(40), key(1)), "line 2"),
            (format!("bad\u{7}name {} online", key(1)), "line 2"),
        ] {
            let err = parse(&format!("{good}{line}\n"), at(0)).unwrap_err();
            assert!(err.contains("line 2") && err.contains(why), "{line}: {err}");
        }
    }

    #[test]
    fn the_saver_writes_the_last_state_before_finish_returns() {
        let dir = std::env::temp_dir().join(format!("peerchat-names-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("names");
        let saver = Saver::start(path.clone()).unwrap();
        let alice = Owner {
            name: "alice".into(),
            key: key(1),
            reserved_for: None,
        };
        let _ = saver.offer(vec![alice.clone()], at(0));
        saver.finish(Vec::new(), at(0));
        assert_eq!(load(&path, at(0)).unwrap(), Vec::new(), "the final state");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
