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
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use peerchat_core::identity::PublicKey;
use peerchat_core::protocol::fold_name;

/// The pins read from a `known_peers` file.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct KnownPeers {
    /// Folded peer name → key.
    pub peers: HashMap<String, PublicKey>,
    /// Registry (as named on the command line) → key.
    pub registries: HashMap<String, PublicKey>,
}

impl KnownPeers {
    /// Reads the file; a missing file is an empty one.
    pub fn load(path: &Path) -> Result<Self, String> {
        match fs::read_to_string(path) {
            Ok(text) => KnownPeers::parse(&text).map_err(|e| format!("{}: {e}", path.display())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(KnownPeers::default()),
            Err(e) => Err(format!("cannot read {}: {e}", path.display())),
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

/// One pin as a line of `known_peers`.
pub fn pin_line(kind: &str, subject: &str, key: &PublicKey) -> String {
    format!("{kind} {subject} {key}\n")
}

/// Appends a line to `known_peers`, creating it (and its directory) if need be.
pub fn append(path: &Path, line: &str) -> io::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    let mut file = fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(line.as_bytes())
}

/// The key file for a name, inside `dir`: the folded name, with anything
/// but letters, digits, `-` and `_` percent-encoded, so that any name is a
/// safe file name and `Alice` and `alice` (one name) share one key.
pub fn key_file(dir: &Path, name: &str) -> PathBuf {
    let mut file = String::new();
    for c in fold_name(name.trim()).chars() {
        if c.is_alphanumeric() || c == '-' || c == '_' {
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

    #[test]
    fn pins_parse_fold_and_keep_the_first() {
        let (a, b) = (Identity::generate().public(), Identity::generate().public());
        let text = format!(
            "# pins\n\n{}{}{}",
            pin_line("peer", "Alice", &a),
            pin_line("peer", "alice", &b),
            pin_line("registry", "127.0.0.1:7000", &b)
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
        let err = KnownPeers::parse(&pin_line("friend", "x", &key)).unwrap_err();
        assert!(err.contains("unknown kind"), "{err}");
    }

    #[test]
    fn appended_pins_load_back() {
        let dir = std::env::temp_dir().join(format!("peerchat-trust-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let path = dir.join("sub/known_peers");
        assert_eq!(KnownPeers::load(&path).unwrap(), KnownPeers::default());
        let key = Identity::generate().public();
        append(&path, &pin_line("peer", "张伟", &key)).unwrap();
        append(&path, &pin_line("registry", "[::1]:7000", &key)).unwrap();
        let known = KnownPeers::load(&path).unwrap();
        assert_eq!(known.peers["张伟"], key);
        assert_eq!(known.registries["[::1]:7000"], key);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn key_files_are_safe_names_shared_by_case() {
        let dir = Path::new("/d");
        assert_eq!(key_file(dir, "Alice"), Path::new("/d/alice.key"));
        assert_eq!(key_file(dir, "张伟"), Path::new("/d/张伟.key"));
        assert_eq!(key_file(dir, "../x"), Path::new("/d/%2E%2E%2Fx.key"));
        assert_eq!(key_file(dir, "a.b"), Path::new("/d/a%2Eb.key"));
    }
}
