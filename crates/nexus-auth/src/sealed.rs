//! Encryption at rest for the few secrets the server has to read back, such as TOTP seeds.
//! Tokens and passwords are only ever hashed; a TOTP seed cannot be (the server computes codes
//! from it), so it is sealed with AES-256-GCM under a key kept outside the database. Whoever
//! steals a database dump or backup then holds ciphertext, not working second factors.
//!
//! Format of a sealed value: `nxs1.<kid>.<base64url(nonce ‖ ciphertext ‖ tag)>`, where `kid`
//! names the key (so keys can be rotated later) and the nonce is 96 random bits. The caller's
//! `context` (say, `totp:<user id>`) is authenticated as associated data: a sealed value copied
//! into another user's row does not open there.
//!
//! The key is 32 random bytes, base64url, in `data.key` (mode 0600) in the server's key
//! directory, created on first start. Replicas share the directory, as they share the token
//! signing keys; first starts racing each other agree on one key because the file is published
//! with a hard link, which never replaces an existing file.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::RngCore;
use sha2::{Digest, Sha256};

const PREFIX: &str = "nxs1";
const KEY_FILE: &str = "data.key";
const NONCE_LEN: usize = 12;

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{0} is not a data key (expected 32 bytes, base64url)")]
    BadKeyFile(PathBuf),
    #[error("no data key is loaded")]
    NoKey,
    #[error("the sealed value is malformed")]
    Malformed,
    #[error("the sealed value was made with key {0}, which is not loaded")]
    UnknownKey(String),
    /// Wrong key, wrong context, or the value was altered.
    #[error("the sealed value does not open")]
    Rejected,
}

/// The data key(s) and the AEAD built from them.
#[derive(Clone)]
pub struct SecretBox {
    key: Option<(String, Aes256Gcm)>,
}

impl std::fmt::Debug for SecretBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretBox")
            .field("kid", &self.key.as_ref().map(|(kid, _)| kid))
            .finish_non_exhaustive()
    }
}

impl SecretBox {
    /// Loads `<dir>/data.key`, creating the directory (0700) and the key (0600) if missing.
    /// Blocking file I/O.
    pub fn load_or_create(dir: &Path) -> Result<Self, SealError> {
        let path = dir.join(KEY_FILE);
        match fs::read_to_string(&path) {
            Ok(text) => Self::from_text(&text).ok_or(SealError::BadKeyFile(path)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                create_key_file(dir, &path)?;
                let text = fs::read_to_string(&path).map_err(io_err(&path))?;
                Self::from_text(&text).ok_or(SealError::BadKeyFile(path))
            }
            Err(e) => Err(SealError::Io { path, source: e }),
        }
    }

    /// A box with a fresh key that lives only in memory (tests, throwaway servers).
    pub fn ephemeral() -> Self {
        Self::from_bytes(&random_key())
    }

    /// A box without a key: seals and opens nothing (for processes that never need to).
    pub fn none() -> Self {
        Self { key: None }
    }

    fn from_text(text: &str) -> Option<Self> {
        let bytes = URL_SAFE_NO_PAD.decode(text.trim()).ok()?;
        let bytes: [u8; 32] = bytes.try_into().ok()?;
        Some(Self::from_bytes(&bytes))
    }

    fn from_bytes(bytes: &[u8; 32]) -> Self {
        // Derived from the key itself, like the signing keys' kid; reveals nothing useful.
        let mut kid = URL_SAFE_NO_PAD.encode(Sha256::digest(
            [b"nexus-data-key\n".as_slice(), bytes].concat(),
        ));
        kid.truncate(8);
        let cipher = Aes256Gcm::new(bytes.into());
        Self {
            key: Some((kid, cipher)),
        }
    }

    /// The loaded key's id, if any.
    pub fn kid(&self) -> Option<&str> {
        self.key.as_ref().map(|(kid, _)| kid.as_str())
    }

    /// Whether a stored value is sealed (values stored before sealing existed are not).
    pub fn is_sealed(stored: &str) -> bool {
        stored.starts_with(PREFIX) && stored.as_bytes().get(PREFIX.len()) == Some(&b'.')
    }

    /// Seals `plaintext`, bound to `context`.
    pub fn seal(&self, context: &str, plaintext: &[u8]) -> Result<String, SealError> {
        let (kid, cipher) = self.key.as_ref().ok_or(SealError::NoKey)?;
        let mut nonce = [0u8; NONCE_LEN];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let sealed = cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: plaintext,
                    aad: context.as_bytes(),
                },
            )
            .map_err(|_| SealError::Rejected)?;
        let mut body = nonce.to_vec();
        body.extend_from_slice(&sealed);
        Ok(format!("{PREFIX}.{kid}.{}", URL_SAFE_NO_PAD.encode(body)))
    }

    /// Opens a value made by [`SecretBox::seal`] with the same `context`.
    pub fn open(&self, context: &str, sealed: &str) -> Result<Vec<u8>, SealError> {
        let mut parts = sealed.splitn(3, '.');
        let (Some(PREFIX), Some(kid), Some(body)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(SealError::Malformed);
        };
        let (own_kid, cipher) = self.key.as_ref().ok_or(SealError::NoKey)?;
        if kid != own_kid {
            return Err(SealError::UnknownKey(kid.to_owned()));
        }
        let body = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| SealError::Malformed)?;
        if body.len() < NONCE_LEN + 16 {
            return Err(SealError::Malformed);
        }
        let (nonce, ciphertext) = body.split_at(NONCE_LEN);
        cipher
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: ciphertext,
                    aad: context.as_bytes(),
                },
            )
            .map_err(|_| SealError::Rejected)
    }
}

fn random_key() -> [u8; 32] {
    let mut key = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut key);
    key
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> SealError + '_ {
    move |source| SealError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Writes a new key to a private temporary file, then publishes it as `path` with a hard link,
/// which fails if `path` exists: of several processes creating the key at once, one wins and the
/// others read its key.
fn create_key_file(dir: &Path, path: &Path) -> Result<(), SealError> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir).map_err(io_err(dir))?;
    let mut suffix = [0u8; 6];
    rand::rngs::OsRng.fill_bytes(&mut suffix);
    let tmp = dir.join(format!(
        ".{KEY_FILE}.{}.tmp",
        URL_SAFE_NO_PAD.encode(suffix)
    ));
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let result = (|| {
        let mut file = options.open(&tmp).map_err(io_err(&tmp))?;
        file.write_all(format!("{}\n", URL_SAFE_NO_PAD.encode(random_key())).as_bytes())
            .map_err(io_err(&tmp))?;
        file.sync_all().map_err(io_err(&tmp))?;
        match fs::hard_link(&tmp, path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(SealError::Io {
                path: path.to_owned(),
                source: e,
            }),
        }
    })();
    let _ = fs::remove_file(&tmp);
    result?;
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn seals_and_opens_only_with_the_same_key_and_context() {
        let sealer = SecretBox::ephemeral();
        let sealed = sealer.seal("totp:usr_1", b"JBSWY3DPEHPK3PXP").unwrap();
        assert!(SecretBox::is_sealed(&sealed));
        assert!(!sealed.contains("JBSWY3DPEHPK3PXP"));
        assert_eq!(
            sealer.open("totp:usr_1", &sealed).unwrap(),
            b"JBSWY3DPEHPK3PXP"
        );
        // Same input twice: different nonces, different output.
        assert_ne!(
            sealer.seal("totp:usr_1", b"JBSWY3DPEHPK3PXP").unwrap(),
            sealed
        );
        // Another user's row.
        assert!(matches!(
            sealer.open("totp:usr_2", &sealed),
            Err(SealError::Rejected)
        ));
        // Another key.
        assert!(matches!(
            SecretBox::ephemeral().open("totp:usr_1", &sealed),
            Err(SealError::UnknownKey(_))
        ));
        // Any flipped byte of the body.
        let (head, body) = sealed.rsplit_once('.').unwrap();
        let mut bytes = URL_SAFE_NO_PAD.decode(body).unwrap();
        for i in 0..bytes.len() {
            bytes[i] ^= 1;
            let altered = format!("{head}.{}", URL_SAFE_NO_PAD.encode(&bytes));
            assert!(sealer.open("totp:usr_1", &altered).is_err(), "byte {i}");
            bytes[i] ^= 1;
        }
        for junk in [
            "",
            "nxs1",
            "nxs1.x",
            "nxs1.x.",
            "nxs2.a.b",
            "JBSWY3DPEHPK3PXP",
        ] {
            assert!(sealer.open("totp:usr_1", junk).is_err(), "{junk:?}");
        }
        assert!(!SecretBox::is_sealed("JBSWY3DPEHPK3PXP"));
        assert!(matches!(
            SecretBox::none().seal("c", b"x"),
            Err(SealError::NoKey)
        ));
    }

    #[test]
    fn the_key_file_is_created_once_private_and_reused() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("keys");
        let first = SecretBox::load_or_create(&dir).unwrap();
        let again = SecretBox::load_or_create(&dir).unwrap();
        assert_eq!(first.kid(), again.kid());
        let sealed = first.seal("c", b"secret").unwrap();
        assert_eq!(again.open("c", &sealed).unwrap(), b"secret");
        let names: Vec<String> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["data.key"], "no temporary file left behind");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(dir.join("data.key"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        fs::write(dir.join("data.key"), "not a key").unwrap();
        assert!(matches!(
            SecretBox::load_or_create(&dir),
            Err(SealError::BadKeyFile(_))
        ));
    }

    #[test]
    fn racing_first_starts_agree_on_one_key() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("keys");
        let boxes: Vec<SecretBox> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| s.spawn(|| SecretBox::load_or_create(&dir).unwrap()))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(boxes.iter().all(|b| b.kid() == boxes[0].kid()));
    }
}
