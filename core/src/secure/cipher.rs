//! AES-GCM for snow through ring, keeping only the 32-byte key per session.
//!
//! ring's AES-GCM is what makes sealing cheap (BENCHMARKS.md, "The cost of a
//! session"), but snow's own ring resolver keeps ring's expanded key, 544
//! bytes, for each direction of every session: a registry holding 19,000
//! idle peers spent 19 MB on key schedules it uses a few times a second.
//! This cipher keeps the key and expands it for each message instead, as
//! snow's RustCrypto cipher does; the expansion is a small fixed cost per
//! message (measured in the `secure` bench) against a kilobyte per idle
//! connection. Only the glue is ours: the AEAD is ring's, the rest of the
//! suite is snow's default resolver. Snow seals the handshake's payloads
//! with it; the session seals its transport messages with it directly
//! (`Session` in secure.rs).

use ring::aead::{Aad, LessSafeKey, Nonce, Tag, UnboundKey, AES_256_GCM};
use snow::params::{CipherChoice, DHChoice, HashChoice};
use snow::resolvers::{CryptoResolver, DefaultResolver};
use snow::types::{Cipher, Dh, Hash, Random};
use zeroize::Zeroize;

pub(super) const KEY_LEN: usize = 32;
const TAG_LEN: usize = 16;

/// snow's default resolver, with AES-GCM taken from [`AesGcm`].
pub(super) struct Resolver;

impl CryptoResolver for Resolver {
    fn resolve_rng(&self) -> Option<Box<dyn Random>> {
        DefaultResolver.resolve_rng()
    }

    fn resolve_dh(&self, choice: &DHChoice) -> Option<Box<dyn Dh>> {
        DefaultResolver.resolve_dh(choice)
    }

    fn resolve_hash(&self, choice: &HashChoice) -> Option<Box<dyn Hash>> {
        DefaultResolver.resolve_hash(choice)
    }

    fn resolve_cipher(&self, choice: &CipherChoice) -> Option<Box<dyn Cipher>> {
        match choice {
            CipherChoice::AESGCM => Some(Box::<AesGcm>::default()),
            _ => DefaultResolver.resolve_cipher(choice),
        }
    }
}

#[derive(Default)]
pub(super) struct AesGcm {
    key: [u8; KEY_LEN],
}

impl Drop for AesGcm {
    fn drop(&mut self) {
        self.key.zeroize();
    }
}

impl AesGcm {
    pub(super) fn new(key: &[u8; KEY_LEN]) -> Self {
        AesGcm { key: *key }
    }

    fn expanded(&self) -> LessSafeKey {
        LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &self.key).expect("the key is 32 bytes"))
    }

    /// Encrypts `body` where it lies and returns its tag.
    pub(super) fn seal_in_place(&self, counter: u64, authtext: &[u8], body: &mut [u8]) -> Tag {
        self.expanded()
            .seal_in_place_separate_tag(nonce(counter), Aad::from(authtext), body)
            .expect("a Noise message is far below AES-GCM's length limit")
    }

    /// Decrypts `body` where it lies if `tag` proves it, else zeroes it.
    pub(super) fn open_in_place(
        &self,
        counter: u64,
        authtext: &[u8],
        body: &mut [u8],
        tag: &[u8],
    ) -> Result<(), snow::Error> {
        let tag = Tag::try_from(tag).map_err(|_| snow::Error::Decrypt)?;
        self.expanded()
            .open_in_place_separate_tag(nonce(counter), Aad::from(authtext), tag, body, 0..)
            .map(|_| ())
            .map_err(|_| snow::Error::Decrypt)
    }
}

/// Noise's AES-GCM nonce: 32 zero bits, then the counter big-endian.
fn nonce(counter: u64) -> Nonce {
    let mut bytes = [0u8; 12];
    bytes[4..].copy_from_slice(&counter.to_be_bytes());
    Nonce::assume_unique_for_key(bytes)
}

impl Cipher for AesGcm {
    fn name(&self) -> &'static str {
        "AESGCM"
    }

    fn set(&mut self, key: &[u8; KEY_LEN]) {
        self.key = *key;
    }

    fn encrypt(&self, counter: u64, authtext: &[u8], plaintext: &[u8], out: &mut [u8]) -> usize {
        let (body, rest) = out.split_at_mut(plaintext.len());
        body.copy_from_slice(plaintext);
        let tag = self.seal_in_place(counter, authtext, body);
        rest[..TAG_LEN].copy_from_slice(tag.as_ref());
        plaintext.len() + TAG_LEN
    }

    fn decrypt(
        &self,
        counter: u64,
        authtext: &[u8],
        ciphertext: &[u8],
        out: &mut [u8],
    ) -> Result<usize, snow::Error> {
        let Some(body_len) = ciphertext.len().checked_sub(TAG_LEN) else {
            return Err(snow::Error::Decrypt);
        };
        let (body, tag) = ciphertext.split_at(body_len);
        let plain = &mut out[..body_len];
        plain.copy_from_slice(body);
        self.open_in_place(counter, authtext, plain, tag)?;
        Ok(body_len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The RustCrypto cipher snow ships is the reference: same key, nonce
    /// and associated data must give the same bytes, both ways.
    #[test]
    fn it_seals_and_opens_exactly_like_snows_own_aes_gcm() {
        let mut ours = AesGcm::default();
        let mut reference = DefaultResolver
            .resolve_cipher(&CipherChoice::AESGCM)
            .expect("snow's AES-GCM is built in");
        let key = [7u8; KEY_LEN];
        ours.set(&key);
        reference.set(&key);
        for len in [0usize, 1, 15, 16, 17, 1000] {
            let plain: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let mut a = vec![0u8; len + TAG_LEN];
            let mut b = vec![0u8; len + TAG_LEN];
            assert_eq!(ours.encrypt(42, b"ad", &plain, &mut a), len + TAG_LEN);
            reference.encrypt(42, b"ad", &plain, &mut b);
            assert_eq!(a, b, "{len} bytes");
            let mut opened = vec![0u8; len];
            assert_eq!(ours.decrypt(42, b"ad", &b, &mut opened).unwrap(), len);
            assert_eq!(opened, plain);
        }
    }

    #[test]
    fn it_refuses_a_wrong_tag_counter_or_associated_data_and_a_short_message() {
        let mut cipher = AesGcm::default();
        cipher.set(&[1u8; KEY_LEN]);
        let mut sealed = vec![0u8; 5 + TAG_LEN];
        cipher.encrypt(3, b"ad", b"hello", &mut sealed);
        let mut out = vec![0u8; 5];
        assert!(cipher.decrypt(4, b"ad", &sealed, &mut out).is_err());
        assert!(cipher.decrypt(3, b"other", &sealed, &mut out).is_err());
        assert_eq!(out, [0u8; 5], "nothing of a refused message is left");
        let mut flipped = sealed.clone();
        flipped[5] ^= 1;
        assert!(cipher.decrypt(3, b"ad", &flipped, &mut out).is_err());
        assert!(cipher
            .decrypt(3, b"ad", &sealed[..TAG_LEN - 1], &mut out)
            .is_err());
        assert_eq!(cipher.decrypt(3, b"ad", &sealed, &mut out).unwrap(), 5);
        assert_eq!(out, b"hello");
    }
}
