//! Where a peer keeps its keys and what it trusts: its key file per name,
//! and `known_peers`, the keys it pinned on first use.
//!
//! `known_peers` is a text file, one pin per line, appended as keys are
//! first seen; blank lines and lines starting with `#` are ignored:
//!
//! ```text
//! peer alice 3q2+7wAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=
//! registry 127.0.0.1:7000 9l3f0AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=
//! ```
//!
//! Peer names are compared folded (as the registry compares them);
//! registries are named by the `--registry` text as given. To accept a new
//! key for someone, delete their line.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use peerchat_core::identity::PublicKey;
use peerchat_core::protocol::fold_name;
use peerchat_core::trusted_file;

/// The pins read from a `known_peers` file.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct KnownPeers {
    /// Folded peer name → key.
    pub peers: HashMap<String, PublicKey>,
    /// Registry (as named on the command line) → key.
    pub registries: HashMap<String, PublicKey>,
}

impl KnownPeers {
    /// Reads the file; a missing file is an empty one. A file that others
    /// could have written is refused: whoever writes the pins decides whom
    /// this peer trusts.
    pub fn load(path: &Path) -> Result<Self, String> {
        match trusted_file::read(path)? {
            Some(text) => KnownPeers::parse(&text).map_err(|e| format!("{}: {e}", path.display())),
            None => Ok(KnownPeers::default()),
        }
    }

    /// Parses the text of a file. A line that is not a pin is an error: a
    /// trust file that cannot be read as a whole is not trusted in part.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut known = KnownPeers::default();
        for (number, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |why: String| format!("line {}: {why}", number + 1);
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [kind, subject, key] = fields[..] else {
                return Err(bad(format!(
                    "expected `peer NAME KEY` or `registry ADDR KEY`, found {line:?}"
                )));
            };
            let key = PublicKey::parse(key).map_err(bad)?;
            // The first pin for a subject wins, as when it was written.
            match kind {
                "peer" => {
                    known.peers.entry(fold_name(subject)).or_insert(key);
                }
                "registry" => {
                    known.registries.entry(subject.to_string()).or_insert(key);
                }
                other => return Err(bad(format!("unknown kind {other:?}"))),
            }
        }
        Ok(known)
    }
}

/// One pin as a line of `known_peers`; `None` for a subject that would not
/// read back as one field.
pub fn pin_line(kind: &str, subject: &str, key: &PublicKey) -> Option<String> {
    let one_field =
        !subject.is_empty() && !subject.chars().any(|c| c.is_whitespace() || c.is_control());
    one_field.then(|| format!("{kind} {subject} {key}\n"))
}

/// Appends a line to `known_peers`, creating it (and its directory) if need
/// be. A file edited by hand may lack its last newline; the pin still
/// starts a line of its own.
pub fn append(path: &Path, line: &str) -> io::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        trusted_file::create_dir(dir)?;
    }
    let mut file = fs::OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)?;
    let len = file.metadata()?.len();
    let mut text = String::new();
    if len > 0 {
        let mut last = [0u8; 1];
        file.seek(io::SeekFrom::Start(len - 1))?;
        file.read_exact(&mut last)?;
        if last[0] != b'\n' {
            text.push('\n');
        }
    }
    text.push_str(line);
    file.write_all(text.as_bytes())
}

/// The key file for a name, inside `dir`: the folded name, with ASCII
/// other than letters, digits, `-` and `_` percent-encoded, so that any name
/// is a safe file name of at most 132 bytes and `Alice` and `alice` (one
/// name) share one key.
pub fn key_file(dir: &Path, name: &str) -> PathBuf {
    let mut file = String::new();
    for c in fold_name(name.trim()).chars() {
        if !c.is_ascii() || c.is_ascii_alphanumeric() || c == '-' || c == '_' {
            file.push(c);
        } else {
            let mut utf8 = [0u8; 4];
            for b in c.encode_utf8(&mut utf8).bytes() {
                file.push_str(&format!("%{b:02X}"));
            }
        }
    }
    dir.join(format!("{file}.key"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use peerchat_core::identity::Identity;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn pins_parse_fold_and_keep_the_first() {
        let (a, b) = (Identity::generate().public(), Identity::generate().public());
        let line = |kind, subject, key| pin_line(kind, subject, key).unwrap();
        let text = format!(
            "# pins\n\n{}{}{}",
            line("peer", "Alice", &a),
            line("peer", "alice", &b),
            line("registry", "127.0.0.1:7000", &b)
        );
        let known = KnownPeers::parse(&text).unwrap();
        assert_eq!(known.peers["alice"], a);
        assert_eq!(known.registries["127.0.0.1:7000"], b);
    }

    #[test]
    fn a_bad_line_is_an_error_with_its_number() {
        let err = KnownPeers::parse("peer alice\n").unwrap_err();
        assert!(err.starts_with("line 1:"), "{err}");
        let err = KnownPeers::parse("\npeer alice notakey\n").unwrap_err();
        assert!(err.starts_with("line 2:"), "{err}");
        let key = Identity::generate().public();
        let err = KnownPeers::parse(&pin_line("friend", "x", &key).unwrap()).unwrap_err();
        assert!(err.contains("unknown kind"), "{err}");
        assert_eq!(pin_line("peer", "a b", &key), None);
        assert_eq!(pin_line("peer", "a\nregistry", &key), None);
    }

    #[test]
    fn appended_pins_load_back() {
        let dir = std::env::temp_dir().join(format!("peerchat-trust-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let path = dir.join("sub/known_peers");
        assert_eq!(KnownPeers::load(&path).unwrap(), KnownPeers::default());
        let key = Identity::generate().public();
        append(&path, &pin_line("peer", "张伟", &key).unwrap()).unwrap();
        // A hand edit without a final newline.
        fs::write(&path, fs::read_to_string(&path).unwrap().trim_end()).unwrap();
        append(&path, &pin_line("registry", "[::1]:7000", &key).unwrap()).unwrap();
        let known = KnownPeers::load(&path).unwrap();
        assert_eq!(known.peers["张伟"], key);
        assert_eq!(known.registries["[::1]:7000"], key);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o666)).unwrap();
        let err = KnownPeers::load(&path).unwrap_err();
        assert!(err.contains("writable by nobody else"), "{err}");
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn key_files_are_safe_names_shared_by_case() {
        let dir = Path::new("/d");
        assert_eq!(key_file(dir, "Alice"), Path::new("/d/alice.key"));
        assert_eq!(key_file(dir, "张伟"), Path::new("/d/张伟.key"));
        let longest = "🎉".repeat(32);
        let file = key_file(dir, &longest);
        assert_eq!(file.file_name().unwrap().len(), 132, "{file:?}");
        assert_eq!(key_file(dir, "../x"), Path::new("/d/%2E%2E%2Fx.key"));
        assert_eq!(key_file(dir, "a.b"), Path::new("/d/a%2Eb.key"));
    }
}
