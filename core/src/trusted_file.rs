//! Small text files that decide whom a program trusts (a peer's pinned
//! keys, a registry's name owners): read only if nobody else could have
//! written them, and replaced whole, so that a crash leaves the old file or
//! the new one, never half of each.

use std::fs;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// The file's text, or `None` if there is no file. A file that is not ours,
/// or that group or others may write, is refused with the reason: whoever
/// can write it decides what we trust. The checks are made on the open
/// file, so what is checked is what is read.
pub fn read(path: &Path) -> Result<Option<String>, String> {
    let mut file = match fs::File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let meta = file
        .metadata()
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if !writable_by_us_alone(&meta) {
        return Err(format!(
            "refusing {}: it must belong to you and be writable by nobody else (mode {:04o}, owner {})",
            path.display(),
            meta.mode() & 0o777,
            meta.uid()
        ));
    }
    let mut text = String::new();
    file.read_to_string(&mut text)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    Ok(Some(text))
}

/// Whether the file belongs to us and nobody else may write it: the rule
/// for any file whose content decides what we trust.
pub fn writable_by_us_alone(meta: &fs::Metadata) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    meta.uid() == me && meta.mode() & 0o022 == 0
}

/// Makes `dir` (and its parents) if missing, private to us.
pub fn create_dir(dir: &Path) -> io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// Replaces the file with `text`: written to `PATH.tmp` (mode 0600),
/// synced, renamed over the old one, and the rename synced. One writer at
/// a time: callers hold the file's [`Lock`]. A temporary file left by a
/// crash is replaced by the next write.
pub fn replace(path: &Path, text: &str) -> io::Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    if let Some(dir) = dir {
        create_dir(dir)?;
    }
    let mut temp = path.as_os_str().to_owned();
    temp.push(".tmp");
    let temp = PathBuf::from(temp);
    let written = (|| {
        match fs::remove_file(&temp) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temp)?;
        file.write_all(text.as_bytes())?;
        file.sync_all()?;
        fs::rename(&temp, path)
    })();
    if written.is_err() {
        let _ = fs::remove_file(&temp);
    }
    written?;
    match dir {
        Some(dir) => fs::File::open(dir)?.sync_all(),
        None => Ok(()),
    }
}

/// An exclusive hold on `path` for as long as the value lives: for a file
/// that one process at a time may own. The lock is on a companion file,
/// `PATH.lock`, since `replace` puts a new file under the name itself.
pub struct Lock {
    _file: fs::File,
}

impl Lock {
    /// Fails with `WouldBlock` while another process holds it.
    pub fn take(path: &Path) -> io::Result<Lock> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            create_dir(dir)?;
        }
        let mut name = path.as_os_str().to_owned();
        name.push(".lock");
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(PathBuf::from(name))?;
        // SAFETY: flock only acts on the descriptor we own; the kernel
        // releases the lock when the file is closed, even in a crash.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Lock { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn replaced_files_read_back_and_are_private() {
        let dir = crate::fresh_test_dir("trusted-replace");
        let path = dir.join("sub/state");
        assert_eq!(read(&path), Ok(None));
        replace(&path, "one\n").unwrap();
        replace(&path, "two\n").unwrap();
        assert_eq!(read(&path), Ok(Some("two\n".into())));
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(&dir.join("sub")), 0o700);
        assert!(!dir.join("sub/state.tmp").exists(), "no leftovers");
        // One left by a crash is no obstacle.
        fs::write(dir.join("sub/state.tmp"), "half").unwrap();
        replace(&path, "three\n").unwrap();
        assert_eq!(read(&path), Ok(Some("three\n".into())));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn one_holder_of_a_lock_at_a_time() {
        let dir = crate::fresh_test_dir("trusted-lock");
        let path = dir.join("state");
        let held = Lock::take(&path).unwrap();
        let second = Lock::take(&path).map(|_| ()).unwrap_err();
        assert_eq!(second.kind(), io::ErrorKind::WouldBlock);
        drop(held);
        Lock::take(&path).unwrap();
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn files_others_may_write_are_refused() {
        let dir = crate::fresh_test_dir("trusted-modes");
        replace(&dir.join("state"), "x\n").unwrap();
        let path = dir.join("state");
        for (mode, ok) in [(0o600, true), (0o644, true), (0o620, false), (0o602, false)] {
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
            let read = read(&path);
            assert_eq!(read.is_ok(), ok, "mode {mode:o}: {read:?}");
            if let Err(why) = read {
                assert!(why.contains("writable by nobody else"), "{why}");
            }
        }
        fs::remove_dir_all(&dir).unwrap();
    }
}
