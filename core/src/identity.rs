//! Long-term identities: an X25519 static key pair per peer name and one per
//! registry, kept in a key file that only its owner may read.
//!
//! A key file holds the 32-byte private key in standard base64 and a newline.
//! It is created with mode 0600 inside directories created with mode 0700.
//! Loading refuses a file that is unreadable, malformed, not owned by us or
//! readable by anyone else: each of those is a clear error, never a silent
//! new identity, because a new key would cost the user their name.
//!
//! Public keys travel as 32-byte CBOR byte strings and are shown to people
//! as base64 (44 characters, like WireGuard's): that text is the key's
//! fingerprint, the same form `--registry-key` and `known_peers` take.

use std::fmt;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use curve25519_dalek::MontgomeryPoint;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use zeroize::{Zeroize, Zeroizing};

/// Bytes of an X25519 key, private or public.
pub const KEY_LEN: usize = 32;

/// A static public key: who is at the other end of a Noise session.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey([u8; KEY_LEN]);

impl PublicKey {
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        bytes.try_into().ok().map(PublicKey)
    }

    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// Parses the base64 form that [`fmt::Display`] prints.
    pub fn parse(text: &str) -> Result<Self, String> {
        let bytes = BASE64
            .decode(text.trim())
            .map_err(|e| format!("not a base64 key: {e}"))?;
        PublicKey::from_slice(&bytes).ok_or_else(|| {
            format!(
                "a key is {KEY_LEN} bytes (44 base64 characters); this one is {} bytes",
                bytes.len()
            )
        })
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&BASE64.encode(self.0))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

/// A byte string on the wire (CBOR), base64 text where people read it (JSON).
impl Serialize for PublicKey {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if serializer.is_human_readable() {
            serializer.collect_str(self)
        } else {
            serializer.serialize_bytes(&self.0)
        }
    }
}

impl<'de> Deserialize<'de> for PublicKey {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl serde::de::Visitor<'_> for KeyVisitor {
            type Value = PublicKey;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "a byte string of {KEY_LEN} bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<PublicKey, E> {
                PublicKey::from_slice(v).ok_or_else(|| E::invalid_length(v.len(), &self))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<PublicKey, E> {
                PublicKey::parse(v).map_err(E::custom)
            }
        }
        if deserializer.is_human_readable() {
            deserializer.deserialize_str(KeyVisitor)
        } else {
            deserializer.deserialize_bytes(KeyVisitor)
        }
    }
}

/// A static key pair. The private half never leaves this type except to
/// start a Noise handshake, and is wiped from memory when it is dropped.
/// (snow copies it into each handshake's state and does not wipe those
/// copies; that is beyond this type.)
#[derive(Clone)]
pub struct Identity {
    private: [u8; KEY_LEN],
    public: PublicKey,
}

impl Drop for Identity {
    fn drop(&mut self) {
        self.private.zeroize();
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Identity({})", self.public)
    }
}

impl Identity {
    /// A fresh random key pair.
    pub fn generate() -> Self {
        let mut private = Zeroizing::new([0u8; KEY_LEN]);
        // Without an OS random source there is no safe key to make.
        getrandom::fill(private.as_mut_slice()).expect("the OS random number generator failed");
        Identity::from_private(&private)
    }

    pub fn from_private(private: &[u8; KEY_LEN]) -> Self {
        // X25519's public key, as snow derives it, without one more copy of
        // the private key in a DH object that nobody wipes.
        let public = PublicKey(MontgomeryPoint::mul_base_clamped(*private).to_bytes());
        Identity {
            private: *private,
            public,
        }
    }

    pub fn public(&self) -> PublicKey {
        self.public
    }

    pub(crate) fn private(&self) -> &[u8; KEY_LEN] {
        &self.private
    }

    /// Loads the key file at `path`, or creates it (and its directories)
    /// with a new key if there is none. The flag tells whether it was made.
    pub fn load_or_create(path: &Path) -> Result<(Self, bool), KeyFileError> {
        match Identity::load(path) {
            Err(KeyFileError::Missing { .. }) => {}
            other => return other.map(|id| (id, false)),
        }
        let fail = |reason: String| KeyFileError::Create {
            path: path.to_path_buf(),
            reason,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| fail(format!("cannot create {}: {e}", dir.display())))?;
        }
        // Written whole to a private temporary file, then linked into
        // place: the key file either does not exist or is complete, even
        // when two processes start at once or the machine stops midway.
        let identity = Identity::generate();
        // The new public key is random, so it names the temporary file
        // apart from any other process's (or thread's) attempt.
        let mut unique = [0u8; 8];
        unique.copy_from_slice(&identity.public.0[..8]);
        let mut temp_name = path.as_os_str().to_owned();
        temp_name.push(format!(".{}.tmp", u64::from_le_bytes(unique)));
        let temp = PathBuf::from(temp_name);
        // Sized up front: a buffer that grew would leave its old copy behind.
        let mut text = Zeroizing::new(String::with_capacity(64));
        BASE64.encode_string(identity.private, &mut text);
        text.push('\n');
        write_private(&temp, &text).map_err(|e| {
            let _ = fs::remove_file(&temp);
            fail(format!("cannot write {}: {e}", temp.display()))
        })?;
        let linked = fs::hard_link(&temp, path);
        // The temporary name goes whatever happened; the key, if linked,
        // stays under its real name.
        let _ = fs::remove_file(&temp);
        match linked {
            Ok(()) => {}
            // Another process made it first: theirs is the identity.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Identity::load(path).map(|id| (id, false))
            }
            Err(e) => return Err(fail(e.to_string())),
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            // Make the new name itself durable.
            fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| fail(format!("cannot sync {}: {e}", dir.display())))?;
        }
        Ok((identity, true))
    }

    /// Loads an existing key file, checking its owner and permissions first
    /// (on the open file, so that what is checked is what is read).
    pub fn load(path: &Path) -> Result<Self, KeyFileError> {
        let path_buf = || path.to_path_buf();
        let unreadable = |reason: String| KeyFileError::Unreadable {
            path: path_buf(),
            reason,
        };
        let insecure = |reason: String| KeyFileError::Insecure {
            path: path_buf(),
            reason,
        };
        let malformed = |reason: String| KeyFileError::Malformed {
            path: path_buf(),
            reason,
        };
        let mut file = match fs::File::open(path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(KeyFileError::Missing { path: path_buf() })
            }
            Err(e) => return Err(unreadable(e.to_string())),
        };
        let meta = file.metadata().map_err(|e| unreadable(e.to_string()))?;
        if !meta.is_file() {
            return Err(unreadable("not a regular file".into()));
        }
        // SAFETY: geteuid has no preconditions and cannot fail.
        let me = unsafe { libc::geteuid() };
        if meta.uid() != me {
            return Err(insecure(format!(
                "it belongs to user id {}, not to us ({me})",
                meta.uid()
            )));
        }
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(insecure(format!(
                "its mode is {mode:04o}; group or others have access to it (chmod 600 fixes that)"
            )));
        }
        let mut text = Zeroizing::new(String::new());
        file.read_to_string(&mut text)
            .map_err(|e| unreadable(e.to_string()))?;
        let bytes = Zeroizing::new(
            BASE64
                .decode(text.trim())
                .map_err(|e| malformed(format!("not base64: {e}")))?,
        );
        let private: &[u8; KEY_LEN] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| malformed(format!("holds {} bytes; a key is {KEY_LEN}", bytes.len())))?;
        Ok(Identity::from_private(private))
    }
}

/// Creates `path` (which must not exist) with mode 0600 and `text` in it,
/// synced to disk.
fn write_private(path: &Path, text: &str) -> io::Result<()> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(text.as_bytes())?;
    file.sync_all()
}

/// Why a key file could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyFileError {
    #[error("key file {path} does not exist")]
    Missing { path: PathBuf },
    #[error("cannot read key file {path}: {reason}")]
    Unreadable { path: PathBuf, reason: String },
    #[error("key file {path} is not a peerchat key: {reason}")]
    Malformed { path: PathBuf, reason: String },
    #[error("refusing key file {path}: {reason}")]
    Insecure { path: PathBuf, reason: String },
    #[error("cannot create key file {path}: {reason}")]
    Create { path: PathBuf, reason: String },
}

/// The user's data directory: `$XDG_DATA_HOME`, else `~/.local/share`.
pub fn data_home() -> Option<PathBuf> {
    let from_env = |var| {
        std::env::var_os(var)
            .map(PathBuf::from)
            .filter(|p| p.is_absolute())
    };
    from_env("XDG_DATA_HOME").or_else(|| from_env("HOME").map(|home| home.join(".local/share")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_then_loaded_with_private_modes() {
        let dir = crate::fresh_test_dir("id-create");
        let path = dir.join("a/b/alice.key");
        let (made, created) = Identity::load_or_create(&path).unwrap();
        assert!(created);
        let (again, created) = Identity::load_or_create(&path).unwrap();
        assert!(!created);
        assert_eq!(made.public(), again.public());
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(&dir.join("a/b")), 0o700);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn processes_starting_at_once_share_one_complete_key() {
        let dir = crate::fresh_test_dir("id-race");
        let path = dir.join("k");
        let keys: Vec<PublicKey> = (0..8)
            .map(|_| {
                let path = path.clone();
                std::thread::spawn(move || Identity::load_or_create(&path).unwrap().0.public())
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|t| t.join().unwrap())
            .collect();
        assert!(keys.iter().all(|k| *k == keys[0]), "one key for all");
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 1, "no temporary left");
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn bad_key_files_are_errors_not_new_identities() {
        let dir = crate::fresh_test_dir("id-bad");
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("k");
        Identity::load_or_create(&path).unwrap();
        let before = fs::read(&path).unwrap();

        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let err = Identity::load_or_create(&path).unwrap_err();
        assert!(matches!(err, KeyFileError::Insecure { .. }), "{err}");
        assert!(err.to_string().contains("0644"), "{err}");

        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        fs::write(&path, "not a key\n").unwrap();
        let err = Identity::load_or_create(&path).unwrap_err();
        assert!(matches!(err, KeyFileError::Malformed { .. }), "{err}");
        fs::write(&path, format!("{}\n", BASE64.encode([1u8; 31]))).unwrap();
        assert!(matches!(
            Identity::load_or_create(&path),
            Err(KeyFileError::Malformed { .. })
        ));

        fs::remove_file(&path).unwrap();
        fs::create_dir(&path).unwrap();
        assert!(matches!(
            Identity::load_or_create(&path),
            Err(KeyFileError::Unreadable { .. })
        ));
        fs::remove_dir(&path).unwrap();
        fs::write(&path, &before).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        assert!(Identity::load(&path).is_ok());
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn public_keys_print_parse_and_encode_as_bytes() {
        let key = Identity::generate().public();
        let text = key.to_string();
        assert_eq!(text.len(), 44);
        assert_eq!(PublicKey::parse(&text).unwrap(), key);
        assert!(PublicKey::parse("AAAA").is_err());
        assert!(PublicKey::parse("!!").is_err());
        let body = crate::codec::encode(&key).unwrap();
        assert_eq!(body[0], 0x58, "a byte string with a one-byte length");
        assert_eq!(crate::codec::decode::<PublicKey>(&body).unwrap(), key);
        let short = crate::codec::encode(&serde_bytes_of(&[0u8; 5])).unwrap();
        assert!(crate::codec::decode::<PublicKey>(&short).is_err());
    }

    fn serde_bytes_of(bytes: &[u8]) -> impl Serialize + '_ {
        struct B<'a>(&'a [u8]);
        impl Serialize for B<'_> {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_bytes(self.0)
            }
        }
        B(bytes)
    }

    #[test]
    fn the_same_private_key_gives_the_same_public_key() {
        let a = Identity::generate();
        assert_eq!(Identity::from_private(a.private()).public(), a.public());
        assert_ne!(Identity::generate().public(), a.public());
    }

    #[test]
    fn public_keys_are_x25519_as_rfc_7748_computes_them() {
        // RFC 7748, section 6.1: Alice's key pair.
        let hex = |s: &str| -> [u8; KEY_LEN] {
            let bytes: Vec<u8> = (0..s.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
                .collect();
            bytes.try_into().unwrap()
        };
        let private = hex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a");
        let public = hex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a");
        assert_eq!(Identity::from_private(&private).public(), PublicKey(public));
    }
}
