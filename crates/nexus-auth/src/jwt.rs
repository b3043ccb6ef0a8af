//! Short-lived access tokens: JWTs signed with Ed25519 (JWS `alg: EdDSA`), so any replica (or an
//! outside service reading the JWKS) can verify a request without a database round trip, while
//! refresh tokens — opaque and revocable — stay in the database.
//!
//! The JWS compact format is written by hand on top of `ed25519-dalek` rather than through a JWT
//! library: it is three base64url segments and one signature, and owning the ~100 lines means the
//! verifier accepts exactly one algorithm, requires a `kid` from our own ring, never honours
//! header-supplied keys (`jwk`, `jku`, `x5u`) or `crit` extensions, and pulls in no RSA/ECDSA code.
//!
//! Keys are PKCS#8 PEM files in one directory (`ed25519-<unix-seconds>-<random>.pem`). The newest
//! signs; all verify, so rotation is "add a key, keep the old one until its tokens expired, prune".
//! Loading, rotating and pruning do blocking file I/O: call them at start-up or via `spawn_blocking`.

use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
/// Public keys, as the verifying helpers below take them.
pub use ed25519_dalek::VerifyingKey;
use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey};
use ed25519_dalek::{Signature, Signer, SigningKey};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Clock difference tolerated between the signing and the verifying host, applied to `exp`,
/// `iat` and `nbf`. No other leeway: a token is good until `exp` + 30 s at most.
pub const CLOCK_SKEW_SECS: u64 = 30;

/// Longer tokens are rejected before any decoding (ours are ~400 bytes).
const MAX_TOKEN_LEN: usize = 8 * 1024;

const KEY_FILE_PREFIX: &str = "ed25519-";
const KEY_FILE_SUFFIX: &str = ".pem";

/// The claims of an access token. Times are unix seconds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessClaims {
    pub iss: String,
    pub aud: String,
    /// The user id.
    pub sub: String,
    /// The login session id, so revoking the session can be checked against a deny list.
    pub sid: String,
    pub iat: u64,
    pub exp: u64,
    /// Unique token id.
    pub jti: String,
    /// Whether the session passed a second factor.
    pub mfa: bool,
}

/// Why a presented token was refused. Messages are generic and never contain the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("malformed token")]
    Malformed,
    #[error("unsupported token algorithm")]
    UnsupportedAlgorithm,
    #[error("token signed by an unknown key")]
    UnknownKey,
    #[error("bad token signature")]
    BadSignature,
    #[error("token expired")]
    Expired,
    #[error("token not yet valid")]
    NotYetValid,
    #[error("token has the wrong issuer")]
    WrongIssuer,
    #[error("token has the wrong audience")]
    WrongAudience,
}

/// Loading, creating or using the signing keys failed.
#[derive(Debug, thiserror::Error)]
pub enum KeyRingError {
    #[error("key file I/O at {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not an Ed25519 PKCS#8 PEM private key")]
    InvalidKey { path: PathBuf },
    #[error("could not encode the key or token")]
    Encode,
    #[error("the key ring has no signing key")]
    NoSigningKey,
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> KeyRingError + '_ {
    move |source| KeyRingError::Io {
        path: path.to_owned(),
        source,
    }
}

#[derive(Clone)]
struct RingKey {
    kid: String,
    /// From the file name; orders keys (newest signs). 0 for keys without one.
    created: u64,
    file_name: String,
    signing: SigningKey,
}

impl RingKey {
    fn new(signing: SigningKey, created: u64, file_name: String) -> Self {
        Self {
            kid: kid_of(&signing.verifying_key()),
            created,
            file_name,
            signing,
        }
    }
}

/// Purpose line of a key endorsement's signing input. Like `nexus-approval-v1\n` it contains a
/// newline, which no JWS signing input can, so an endorsement can never pass as a token or an
/// approval signature or the other way round.
const ENDORSEMENT_PURPOSE: &str = "nexus-key-endorsement-v1\n";

/// A signature by an older key over a newer key of the same ring: how a device that pinned the
/// older key at pairing learns to trust the newer one after `nexus admin keys rotate`, without
/// trusting whatever a server (or a man in the middle) merely claims.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyEndorsement {
    /// The endorsed key.
    pub kid: String,
    /// The key that signed.
    pub signed_by: String,
    /// base64url Ed25519 signature over [`endorsement_input`]`(kid, x)`.
    pub signature: String,
}

/// What an endorsement signs: the purpose line, then the endorsed key's kid and JWK `x`.
pub fn endorsement_input(kid: &str, x: &str) -> Vec<u8> {
    format!("{ENDORSEMENT_PURPOSE}{kid}\n{x}").into_bytes()
}

/// Whether `signer` endorsed the key `x` under the name `kid`. The kid must also be the one
/// derived from `x`, so a valid endorsement cannot smuggle in a key under another key's name.
pub fn verify_endorsement(signer: &VerifyingKey, kid: &str, x: &str, signature: &str) -> bool {
    verifying_key_from_jwk_x(x).is_some_and(|key| kid_of(&key) == kid)
        && verify_detached_with(signer, &endorsement_input(kid, x), signature)
}

/// `kid` = the first 16 characters of base64url(SHA-256(raw public key)): stable, derived from
/// the key itself, and reveals nothing about the private half.
/// Verifies a detached base64url Ed25519 signature (strict verification) with a public key.
pub fn verify_detached_with(key: &VerifyingKey, message: &[u8], signature: &str) -> bool {
    let Ok(bytes) = URL_SAFE_NO_PAD.decode(signature) else {
        return false;
    };
    let Ok(signature) = ed25519_dalek::Signature::from_slice(&bytes) else {
        return false;
    };
    key.verify_strict(message, &signature).is_ok()
}

/// A public key from the `x` member of an Ed25519 JWK (base64url, 32 bytes).
pub fn verifying_key_from_jwk_x(x: &str) -> Option<VerifyingKey> {
    let bytes = URL_SAFE_NO_PAD.decode(x).ok()?;
    let bytes: [u8; 32] = bytes.try_into().ok()?;
    VerifyingKey::from_bytes(&bytes).ok()
}

pub fn kid_of(key: &VerifyingKey) -> String {
    let mut kid = URL_SAFE_NO_PAD.encode(Sha256::digest(key.as_bytes()));
    kid.truncate(16);
    kid
}

/// All keys that verify tokens, the newest of which signs. Empty only if made by `empty()`.
#[derive(Clone)]
pub struct KeyRing {
    /// Newest first.
    keys: Vec<RingKey>,
}

impl fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyRing")
            .field("kids", &self.kids())
            .finish_non_exhaustive()
    }
}

#[derive(Serialize)]
struct OutHeader<'a> {
    alg: &'static str,
    typ: &'static str,
    kid: &'a str,
}

/// Unknown header members are ignored; in particular keys offered in the header are never used.
#[derive(Deserialize)]
struct InHeader {
    alg: String,
    #[serde(default)]
    typ: Option<String>,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default)]
    crit: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct NotBefore {
    #[serde(default)]
    nbf: Option<u64>,
}

impl KeyRing {
    /// Loads every `*.pem` private key in `dir`, creating the directory (0700) and a first key
    /// (0600) when there is none. Fails on any unreadable or non-Ed25519 `.pem` file rather than
    /// silently signing with something else. Blocking file I/O.
    pub fn load_or_create(dir: &Path) -> Result<KeyRing, KeyRingError> {
        ensure_dir(dir)?;
        let mut keys = read_keys(dir)?;
        if keys.is_empty() {
            let key = write_new_key(dir, 0)?;
            keys.push(key);
        }
        Ok(Self::from_sorted(keys))
    }

    /// Loads `dir` without creating anything; `None` when it holds no key. For the server's
    /// periodic reload, which must not race `rotate` into creating keys of its own.
    pub fn load(dir: &Path) -> Result<Option<KeyRing>, KeyRingError> {
        let keys = read_keys(dir)?;
        Ok((!keys.is_empty()).then(|| Self::from_sorted(keys)))
    }

    /// Writes a new key to `dir` that becomes the signing key on the next load, and returns its
    /// kid. Old keys stay, so tokens they signed keep verifying. Blocking file I/O.
    pub fn rotate(dir: &Path) -> Result<String, KeyRingError> {
        ensure_dir(dir)?;
        let newest = read_keys(dir)?.first().map_or(0, |k| k.created);
        Ok(write_new_key(dir, newest)?.kid)
    }

    /// Deletes all but the `keep` newest key files (at least one is always kept) and returns the
    /// kids removed. Tokens signed by a removed key stop verifying at once, so prune only keys
    /// that stopped signing longer ago than the access-token lifetime. Blocking file I/O.
    pub fn prune(dir: &Path, keep: usize) -> Result<Vec<String>, KeyRingError> {
        let keys = read_keys(dir)?;
        let mut removed = Vec::new();
        for key in keys.into_iter().skip(keep.max(1)) {
            let path = dir.join(&key.file_name);
            fs::remove_file(&path).map_err(io_err(&path))?;
            removed.push(key.kid);
        }
        Ok(removed)
    }

    /// A ring with one fresh key that lives only in memory: for tests and throwaway dev servers.
    pub fn ephemeral() -> KeyRing {
        let key = RingKey::new(generate_key(), now_secs(), String::new());
        Self::from_sorted(vec![key])
    }

    /// A ring without keys: signs nothing (`NoSigningKey`), verifies nothing (`UnknownKey`).
    /// For processes that must not touch key files, such as admin CLI commands.
    pub fn empty() -> KeyRing {
        KeyRing { keys: Vec::new() }
    }

    fn from_sorted(keys: Vec<RingKey>) -> KeyRing {
        KeyRing { keys }
    }

    fn signing_key(&self) -> Option<&RingKey> {
        self.keys.first()
    }

    /// The kid new tokens are signed with (`None` only for `empty()`).
    pub fn signing_kid(&self) -> Option<&str> {
        self.signing_key().map(|k| k.kid.as_str())
    }

    /// Every kid that verifies, newest first.
    pub fn kids(&self) -> Vec<&str> {
        self.keys.iter().map(|k| k.kid.as_str()).collect()
    }

    /// Signs the claims with the newest key: `{"alg":"EdDSA","typ":"JWT","kid":…}`.
    pub fn sign(&self, claims: &AccessClaims) -> Result<String, KeyRingError> {
        let key = self.signing_key().ok_or(KeyRingError::NoSigningKey)?;
        let header = serde_json::to_vec(&OutHeader {
            alg: "EdDSA",
            typ: "JWT",
            kid: &key.kid,
        })
        .map_err(|_| KeyRingError::Encode)?;
        let payload = serde_json::to_vec(claims).map_err(|_| KeyRingError::Encode)?;
        let mut token = URL_SAFE_NO_PAD.encode(header);
        token.push('.');
        token.push_str(&URL_SAFE_NO_PAD.encode(payload));
        let signature = key.signing.sign(token.as_bytes());
        token.push('.');
        token.push_str(&URL_SAFE_NO_PAD.encode(signature.to_bytes()));
        Ok(token)
    }

    /// Verifies a token and returns its claims. Rejects any `alg` but `EdDSA` (so `none` and
    /// HS256 key-confusion tokens), a `typ` other than `JWT`, any `crit` header, a missing or
    /// unknown `kid`, a bad signature (strict Ed25519 verification), `exp` passed, `iat`/`nbf` in
    /// the future, and an `iss`/`aud` that is not exactly the expected string. Each time check
    /// allows `CLOCK_SKEW_SECS`.
    pub fn verify(
        &self,
        token: &str,
        now_unix_secs: u64,
        expected_iss: &str,
        expected_aud: &str,
    ) -> Result<AccessClaims, TokenError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::Malformed);
        }
        let mut parts = token.split('.');
        let (Some(header_b64), Some(payload_b64), Some(signature_b64), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed);
        };

        let header = decode_segment(header_b64)?;
        let header: InHeader =
            serde_json::from_slice(&header).map_err(|_| TokenError::Malformed)?;
        if header.alg != "EdDSA" {
            return Err(TokenError::UnsupportedAlgorithm);
        }
        if header
            .typ
            .is_some_and(|typ| !typ.eq_ignore_ascii_case("JWT"))
            || header.crit.is_some()
        {
            return Err(TokenError::Malformed);
        }
        let kid = header.kid.ok_or(TokenError::Malformed)?;
        let key = self
            .keys
            .iter()
            .find(|k| k.kid == kid)
            .ok_or(TokenError::UnknownKey)?;

        let signature = decode_segment(signature_b64)?;
        let signature = Signature::from_slice(&signature).map_err(|_| TokenError::Malformed)?;
        let signed = &token[..header_b64.len() + 1 + payload_b64.len()];
        key.signing
            .verifying_key()
            .verify_strict(signed.as_bytes(), &signature)
            .map_err(|_| TokenError::BadSignature)?;

        // Only authenticated bytes are parsed from here on.
        let payload = decode_segment(payload_b64)?;
        let claims: AccessClaims =
            serde_json::from_slice(&payload).map_err(|_| TokenError::Malformed)?;
        let not_before: NotBefore =
            serde_json::from_slice(&payload).map_err(|_| TokenError::Malformed)?;

        if now_unix_secs >= claims.exp.saturating_add(CLOCK_SKEW_SECS) {
            return Err(TokenError::Expired);
        }
        let latest_start = now_unix_secs.saturating_add(CLOCK_SKEW_SECS);
        if claims.iat > latest_start || not_before.nbf.is_some_and(|nbf| nbf > latest_start) {
            return Err(TokenError::NotYetValid);
        }
        if claims.iss != expected_iss {
            return Err(TokenError::WrongIssuer);
        }
        if claims.aud != expected_aud {
            return Err(TokenError::WrongAudience);
        }
        Ok(claims)
    }

    /// Signs arbitrary bytes with the current signing key: `(kid, base64url signature)`. Used for
    /// approval grants; their input starts with a purpose line (`nexus-approval-v1\n`), which a
    /// JWS signing input (base64url text) can never contain, so a signature made for one purpose
    /// cannot be replayed as the other.
    pub fn sign_detached(&self, message: &[u8]) -> Result<(String, String), KeyRingError> {
        let key = self.signing_key().ok_or(KeyRingError::NoSigningKey)?;
        let signature = key.signing.sign(message);
        Ok((
            key.kid.clone(),
            URL_SAFE_NO_PAD.encode(signature.to_bytes()),
        ))
    }

    /// Checks a detached signature made by [`KeyRing::sign_detached`] with the key `kid`.
    pub fn verify_detached(&self, kid: &str, message: &[u8], signature: &str) -> bool {
        self.keys
            .iter()
            .find(|k| k.kid == kid)
            .is_some_and(|k| verify_detached_with(&k.signing.verifying_key(), message, signature))
    }

    /// Every key endorsed by every older key of the ring (see [`KeyEndorsement`]). A device that
    /// pinned any key still in the ring can follow the endorsements to all newer ones.
    pub fn endorsements(&self) -> Vec<KeyEndorsement> {
        let mut out = Vec::new();
        for (i, newer) in self.keys.iter().enumerate() {
            let x = URL_SAFE_NO_PAD.encode(newer.signing.verifying_key().as_bytes());
            let input = endorsement_input(&newer.kid, &x);
            for older in &self.keys[i + 1..] {
                out.push(KeyEndorsement {
                    kid: newer.kid.clone(),
                    signed_by: older.kid.clone(),
                    signature: URL_SAFE_NO_PAD.encode(older.signing.sign(&input).to_bytes()),
                });
            }
        }
        out
    }

    /// The public keys as a JWK Set (RFC 7517/8037), for `/.well-known/jwks.json`.
    pub fn jwks(&self) -> serde_json::Value {
        serde_json::json!({ "keys": self.public_jwks() })
    }

    /// The public keys as JWKs, newest first.
    pub fn public_jwks(&self) -> Vec<serde_json::Value> {
        self.keys
            .iter()
            .map(|k| {
                serde_json::json!({
                    "kty": "OKP",
                    "crv": "Ed25519",
                    "x": URL_SAFE_NO_PAD.encode(k.signing.verifying_key().as_bytes()),
                    "kid": k.kid,
                    "alg": "EdDSA",
                    "use": "sig",
                })
            })
            .collect()
    }
}

fn decode_segment(segment: &str) -> Result<Vec<u8>, TokenError> {
    // URL_SAFE_NO_PAD rejects padding, other alphabets and non-canonical trailing bits.
    URL_SAFE_NO_PAD
        .decode(segment)
        .map_err(|_| TokenError::Malformed)
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn generate_key() -> SigningKey {
    let mut secret = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut secret);
    SigningKey::from_bytes(&secret)
}

/// `ed25519-<unix-seconds>-<random>.pem` → seconds; any other name → 0 (oldest).
fn created_from_name(name: &str) -> u64 {
    name.strip_prefix(KEY_FILE_PREFIX)
        .and_then(|rest| rest.split(['-', '.']).next())
        .and_then(|secs| secs.parse().ok())
        .unwrap_or(0)
}

fn ensure_dir(dir: &Path) -> Result<(), KeyRingError> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir).map_err(io_err(dir))
}

/// Every key in `dir`, newest first, one entry per distinct key.
fn read_keys(dir: &Path) -> Result<Vec<RingKey>, KeyRingError> {
    let mut keys: Vec<RingKey> = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        // Dot files are our own in-progress temporary files.
        if !name.ends_with(KEY_FILE_SUFFIX) || name.starts_with('.') {
            continue;
        }
        let path = entry.path();
        if !path.is_file() {
            continue;
        }
        let pem = fs::read_to_string(&path).map_err(io_err(&path))?;
        let signing = SigningKey::from_pkcs8_pem(&pem)
            .map_err(|_| KeyRingError::InvalidKey { path: path.clone() })?;
        keys.push(RingKey::new(signing, created_from_name(&name), name));
    }
    keys.sort_by(|a, b| {
        b.created
            .cmp(&a.created)
            .then_with(|| b.file_name.cmp(&a.file_name))
    });
    let mut seen = std::collections::HashSet::new();
    keys.retain(|k| seen.insert(k.kid.clone()));
    Ok(keys)
}

/// Writes a fresh key whose timestamp is later than `newest_existing`, so it sorts first even
/// when rotating twice within a second. Atomic: a 0600 temporary file, fsync, rename, fsync dir.
fn write_new_key(dir: &Path, newest_existing: u64) -> Result<RingKey, KeyRingError> {
    let created = now_secs().max(newest_existing.saturating_add(1));
    let mut suffix = [0u8; 4];
    rand::rngs::OsRng.fill_bytes(&mut suffix);
    let suffix: String = suffix.iter().map(|b| format!("{b:02x}")).collect();
    let name = format!("{KEY_FILE_PREFIX}{created}-{suffix}{KEY_FILE_SUFFIX}");

    let signing = generate_key();
    let pem = signing
        .to_pkcs8_pem(LineEnding::LF)
        .map_err(|_| KeyRingError::Encode)?;

    let tmp = dir.join(format!(".{name}.tmp"));
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let result = (|| {
        let mut file = options.open(&tmp)?;
        file.write_all(pem.as_bytes())?;
        file.sync_all()
    })();
    if let Err(source) = result {
        let _ = fs::remove_file(&tmp);
        return Err(KeyRingError::Io { path: tmp, source });
    }
    let path = dir.join(&name);
    fs::rename(&tmp, &path).map_err(io_err(&path))?;
    // Make the rename itself durable (best effort: not every platform can open a directory).
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(RingKey::new(signing, created, name))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ISS: &str = "https://nexus.example";
    const AUD: &str = "nexus-api";
    const NOW: u64 = 1_750_000_000;

    fn claims() -> AccessClaims {
        AccessClaims {
            iss: ISS.into(),
            aud: AUD.into(),
            sub: "user-1".into(),
            sid: "session-1".into(),
            iat: NOW,
            exp: NOW + 900,
            jti: "jti-1".into(),
            mfa: true,
        }
    }

    fn b64(bytes: impl AsRef<[u8]>) -> String {
        URL_SAFE_NO_PAD.encode(bytes)
    }

    fn parts(token: &str) -> Vec<String> {
        token.split('.').map(str::to_owned).collect()
    }

    /// HMAC-SHA256 written out, to craft the HS256 token of a key-confusion attack.
    fn hmac_sha256(key: &[u8], msg: &[u8]) -> Vec<u8> {
        let mut k = [0u8; 64];
        k[..key.len()].copy_from_slice(key);
        let inner: Vec<u8> = k
            .iter()
            .map(|b| b ^ 0x36)
            .chain(msg.iter().copied())
            .collect();
        let inner = Sha256::digest(inner);
        let outer: Vec<u8> = k.iter().map(|b| b ^ 0x5c).chain(inner).collect();
        Sha256::digest(outer).to_vec()
    }

    #[test]
    fn detached_signatures_verify_only_unchanged() {
        let ring = KeyRing::ephemeral();
        let (kid, sig) = ring.sign_detached(b"nexus-approval-v1\n{}").unwrap();
        assert!(ring.verify_detached(&kid, b"nexus-approval-v1\n{}", &sig));
        assert!(!ring.verify_detached(&kid, b"nexus-approval-v1\n{ }", &sig));
        assert!(!ring.verify_detached("other", b"nexus-approval-v1\n{}", &sig));
        assert!(!KeyRing::ephemeral().verify_detached(&kid, b"nexus-approval-v1\n{}", &sig));
        let jwks = ring.jwks();
        let key = verifying_key_from_jwk_x(jwks["keys"][0]["x"].as_str().unwrap()).unwrap();
        assert!(verify_detached_with(&key, b"nexus-approval-v1\n{}", &sig));
        assert!(!verify_detached_with(
            &key,
            b"nexus-approval-v1\n{}",
            "AAAA"
        ));
    }

    #[test]
    fn sign_and_verify_roundtrip() {
        let ring = KeyRing::ephemeral();
        let token = ring.sign(&claims()).unwrap();
        assert_eq!(ring.verify(&token, NOW, ISS, AUD), Ok(claims()));
        let header: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(&parts(&token)[0]).unwrap()).unwrap();
        assert_eq!(
            header,
            serde_json::json!({"alg": "EdDSA", "typ": "JWT", "kid": ring.signing_kid().unwrap()})
        );
    }

    #[test]
    fn expiry_and_not_yet_valid_with_skew() {
        let ring = KeyRing::ephemeral();
        let token = ring.sign(&claims()).unwrap();
        let exp = NOW + 900;
        assert!(ring.verify(&token, exp, ISS, AUD).is_ok());
        assert!(
            ring.verify(&token, exp + CLOCK_SKEW_SECS - 1, ISS, AUD)
                .is_ok()
        );
        assert_eq!(
            ring.verify(&token, exp + CLOCK_SKEW_SECS, ISS, AUD),
            Err(TokenError::Expired)
        );
        assert!(ring.verify(&token, NOW - CLOCK_SKEW_SECS, ISS, AUD).is_ok());
        assert_eq!(
            ring.verify(&token, NOW - CLOCK_SKEW_SECS - 1, ISS, AUD),
            Err(TokenError::NotYetValid)
        );
    }

    #[test]
    fn nbf_in_the_future_is_rejected() {
        let ring = KeyRing::ephemeral();
        let mut payload = serde_json::to_value(claims()).unwrap();
        payload["nbf"] = (NOW + 600).into();
        let token = sign_raw(
            &ring,
            &serde_json::json!({"alg":"EdDSA","kid":ring.signing_kid().unwrap()}),
            &payload,
        );
        assert_eq!(
            ring.verify(&token, NOW, ISS, AUD),
            Err(TokenError::NotYetValid)
        );
        assert!(ring.verify(&token, NOW + 600, ISS, AUD).is_ok());
    }

    /// Signs arbitrary header and payload JSON with the ring's signing key.
    fn sign_raw(ring: &KeyRing, header: &serde_json::Value, payload: &serde_json::Value) -> String {
        let input = format!(
            "{}.{}",
            b64(serde_json::to_vec(header).unwrap()),
            b64(serde_json::to_vec(payload).unwrap())
        );
        let sig = ring.signing_key().unwrap().signing.sign(input.as_bytes());
        format!("{input}.{}", b64(sig.to_bytes()))
    }

    #[test]
    fn issuer_and_audience_must_match_exactly() {
        let ring = KeyRing::ephemeral();
        let token = ring.sign(&claims()).unwrap();
        assert_eq!(
            ring.verify(&token, NOW, "https://nexus.example/", AUD),
            Err(TokenError::WrongIssuer)
        );
        assert_eq!(
            ring.verify(&token, NOW, ISS, "NEXUS-API"),
            Err(TokenError::WrongAudience)
        );
        // An audience array is not accepted in place of the string we issue.
        let mut payload = serde_json::to_value(claims()).unwrap();
        payload["aud"] = serde_json::json!([AUD]);
        let token = sign_raw(
            &ring,
            &serde_json::json!({"alg":"EdDSA","kid":ring.signing_kid().unwrap()}),
            &payload,
        );
        assert_eq!(
            ring.verify(&token, NOW, ISS, AUD),
            Err(TokenError::Malformed)
        );
    }

    #[test]
    fn typ_is_optional_but_must_be_jwt() {
        let ring = KeyRing::ephemeral();
        let payload = serde_json::to_value(claims()).unwrap();
        let kid = ring.signing_kid().unwrap().to_owned();
        let ok = sign_raw(
            &ring,
            &serde_json::json!({"alg":"EdDSA","kid":kid}),
            &payload,
        );
        assert!(ring.verify(&ok, NOW, ISS, AUD).is_ok());
        let bad = sign_raw(
            &ring,
            &serde_json::json!({"alg":"EdDSA","typ":"at+jwt2","kid":kid}),
            &payload,
        );
        assert_eq!(ring.verify(&bad, NOW, ISS, AUD), Err(TokenError::Malformed));
        let crit = sign_raw(
            &ring,
            &serde_json::json!({"alg":"EdDSA","kid":kid,"crit":["exp"]}),
            &payload,
        );
        assert_eq!(
            ring.verify(&crit, NOW, ISS, AUD),
            Err(TokenError::Malformed)
        );
        let no_kid = sign_raw(&ring, &serde_json::json!({"alg":"EdDSA"}), &payload);
        assert_eq!(
            ring.verify(&no_kid, NOW, ISS, AUD),
            Err(TokenError::Malformed)
        );
    }

    #[test]
    fn tampered_payload_and_signature_rejected() {
        let ring = KeyRing::ephemeral();
        let token = ring.sign(&claims()).unwrap();
        let p = parts(&token);

        let mut forged = claims();
        forged.sub = "admin".into();
        let forged_payload = b64(serde_json::to_vec(&forged).unwrap());
        let t = format!("{}.{}.{}", p[0], forged_payload, p[2]);
        assert_eq!(
            ring.verify(&t, NOW, ISS, AUD),
            Err(TokenError::BadSignature)
        );

        let mut sig = URL_SAFE_NO_PAD.decode(&p[2]).unwrap();
        sig[10] ^= 1;
        let t = format!("{}.{}.{}", p[0], p[1], b64(&sig));
        assert_eq!(
            ring.verify(&t, NOW, ISS, AUD),
            Err(TokenError::BadSignature)
        );

        let t = format!("{}.{}.{}", p[0], p[1], b64(&sig[..63]));
        assert_eq!(ring.verify(&t, NOW, ISS, AUD), Err(TokenError::Malformed));
    }

    #[test]
    fn malformed_tokens_rejected() {
        let ring = KeyRing::ephemeral();
        let token = ring.sign(&claims()).unwrap();
        let p = parts(&token);
        for bad in [
            String::new(),
            "abc".into(),
            format!("{}.{}", p[0], p[1]),
            format!("{token}.x"),
            format!("{}=.{}.{}", p[0], p[1], p[2]),
            format!("{}.{}.{}=", p[0], p[1], p[2]),
            format!("{}.{}.{}", b64("not json"), p[1], p[2]),
            "a".repeat(MAX_TOKEN_LEN + 1),
        ] {
            assert_eq!(
                ring.verify(&bad, NOW, ISS, AUD),
                Err(TokenError::Malformed),
                "{bad}"
            );
        }
    }

    #[test]
    fn alg_none_rejected() {
        let ring = KeyRing::ephemeral();
        let header = b64(format!(
            r#"{{"alg":"none","typ":"JWT","kid":"{}"}}"#,
            ring.signing_kid().unwrap()
        ));
        let payload = b64(serde_json::to_vec(&claims()).unwrap());
        for token in [
            format!("{header}.{payload}."),
            format!("{header}.{payload}"),
        ] {
            assert!(ring.verify(&token, NOW, ISS, AUD).is_err());
        }
        assert_eq!(
            ring.verify(&format!("{header}.{payload}."), NOW, ISS, AUD),
            Err(TokenError::UnsupportedAlgorithm)
        );
        let header = b64(format!(
            r#"{{"alg":"NONE","kid":"{}"}}"#,
            ring.signing_kid().unwrap()
        ));
        assert_eq!(
            ring.verify(&format!("{header}.{payload}."), NOW, ISS, AUD),
            Err(TokenError::UnsupportedAlgorithm)
        );
    }

    #[test]
    fn hs256_key_confusion_rejected() {
        let ring = KeyRing::ephemeral();
        // The classic attack: HMAC keyed with the (public) verification key.
        let public = ring
            .signing_key()
            .unwrap()
            .signing
            .verifying_key()
            .to_bytes();
        let header = b64(format!(
            r#"{{"alg":"HS256","typ":"JWT","kid":"{}"}}"#,
            ring.signing_kid().unwrap()
        ));
        let payload = b64(serde_json::to_vec(&claims()).unwrap());
        let input = format!("{header}.{payload}");
        let mac = hmac_sha256(&public, input.as_bytes());
        assert_eq!(
            ring.verify(&format!("{input}.{}", b64(mac)), NOW, ISS, AUD),
            Err(TokenError::UnsupportedAlgorithm)
        );
    }

    #[test]
    fn hmac_helper_matches_rfc4231() {
        // RFC 4231 test case 2, so the key-confusion test above crafts a real HS256 token.
        let mac = hmac_sha256(b"Jefe", b"what do ya want for nothing?");
        assert_eq!(
            mac.iter().map(|b| format!("{b:02x}")).collect::<String>(),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn foreign_keys_rejected() {
        let ring = KeyRing::ephemeral();
        let other = KeyRing::ephemeral();
        let token = other.sign(&claims()).unwrap();
        assert_eq!(
            ring.verify(&token, NOW, ISS, AUD),
            Err(TokenError::UnknownKey)
        );
        // A foreign key claiming our kid fails on the signature.
        let payload = serde_json::to_value(claims()).unwrap();
        let forged = sign_raw(
            &other,
            &serde_json::json!({"alg":"EdDSA","kid":ring.signing_kid().unwrap()}),
            &payload,
        );
        assert_eq!(
            ring.verify(&forged, NOW, ISS, AUD),
            Err(TokenError::BadSignature)
        );
    }

    #[test]
    fn load_or_create_then_rotate_and_prune() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("keys");

        let ring = KeyRing::load_or_create(&dir).unwrap();
        assert_eq!(ring.kids().len(), 1);
        let first_kid = ring.signing_kid().unwrap().to_owned();
        let old_token = ring.sign(&claims()).unwrap();

        // Loading again finds the same key and creates nothing.
        let again = KeyRing::load_or_create(&dir).unwrap();
        assert_eq!(again.kids(), vec![first_kid.as_str()]);

        let second = KeyRing::rotate(&dir).unwrap();
        let third = KeyRing::rotate(&dir).unwrap();
        let ring = KeyRing::load_or_create(&dir).unwrap();
        assert_eq!(
            ring.kids(),
            vec![third.as_str(), second.as_str(), first_kid.as_str()]
        );
        assert_eq!(ring.signing_kid(), Some(third.as_str()));
        assert_eq!(ring.verify(&old_token, NOW, ISS, AUD), Ok(claims()));
        let new_token = ring.sign(&claims()).unwrap();
        let header: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(&parts(&new_token)[0]).unwrap())
                .unwrap();
        assert_eq!(header["kid"], third.as_str());

        assert_eq!(KeyRing::prune(&dir, 2).unwrap(), vec![first_kid.clone()]);
        let ring = KeyRing::load(&dir).unwrap().unwrap();
        assert_eq!(ring.kids(), vec![third.as_str(), second.as_str()]);
        assert_eq!(
            ring.verify(&old_token, NOW, ISS, AUD),
            Err(TokenError::UnknownKey)
        );
        assert_eq!(KeyRing::prune(&dir, 0).unwrap(), vec![second]);
        assert_eq!(
            KeyRing::load(&dir).unwrap().unwrap().kids(),
            vec![third.as_str()]
        );
    }

    #[cfg(unix)]
    #[test]
    fn key_files_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("keys");
        KeyRing::load_or_create(&dir).unwrap();
        assert_eq!(
            fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            0o700
        );
        let files: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(files.len(), 1, "no temporary file left behind");
        let name = files[0].file_name().unwrap().to_str().unwrap().to_owned();
        assert!(
            name.starts_with("ed25519-") && name.ends_with(".pem"),
            "{name}"
        );
        assert_eq!(
            fs::metadata(&files[0]).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let pem = fs::read_to_string(&files[0]).unwrap();
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----"), "{pem}");
    }

    #[test]
    fn foreign_pem_names_and_bad_files() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        // A key imported under any name loads, but sorts as the oldest.
        let imported = generate_key();
        fs::write(
            dir.join("imported.pem"),
            imported.to_pkcs8_pem(LineEnding::LF).unwrap().as_bytes(),
        )
        .unwrap();
        fs::write(dir.join("notes.txt"), "ignored").unwrap();
        let ring = KeyRing::load_or_create(dir).unwrap();
        assert_eq!(
            ring.kids(),
            vec![kid_of(&imported.verifying_key()).as_str()]
        );
        let newer = KeyRing::rotate(dir).unwrap();
        assert_eq!(
            KeyRing::load(dir).unwrap().unwrap().signing_kid(),
            Some(newer.as_str())
        );

        fs::write(
            dir.join("ed25519-9-broken.pem"),
            "-----BEGIN PRIVATE KEY-----\nAAAA\n",
        )
        .unwrap();
        assert!(matches!(
            KeyRing::load(dir),
            Err(KeyRingError::InvalidKey { .. })
        ));
    }

    #[test]
    fn empty_dir_loads_as_none() {
        let tmp = tempfile::tempdir().unwrap();
        assert!(KeyRing::load(tmp.path()).unwrap().is_none());
        assert!(matches!(
            KeyRing::load(&tmp.path().join("missing")),
            Err(KeyRingError::Io { .. })
        ));
    }

    #[test]
    fn kid_and_file_name_parsing() {
        assert_eq!(
            created_from_name("ed25519-1700000000-abcd1234.pem"),
            1_700_000_000
        );
        assert_eq!(created_from_name("ed25519-12.pem"), 12);
        assert_eq!(created_from_name("other.pem"), 0);
        let ring = KeyRing::ephemeral();
        assert_eq!(ring.signing_kid().unwrap().len(), 16);
        let debug = format!("{ring:?}");
        assert!(debug.contains(ring.signing_kid().unwrap()));
    }

    #[test]
    fn empty_ring_signs_and_verifies_nothing() {
        let empty = KeyRing::empty();
        assert_eq!(empty.signing_kid(), None);
        assert!(matches!(
            empty.sign(&claims()),
            Err(KeyRingError::NoSigningKey)
        ));
        let token = KeyRing::ephemeral().sign(&claims()).unwrap();
        assert_eq!(
            empty.verify(&token, NOW, ISS, AUD),
            Err(TokenError::UnknownKey)
        );
        assert_eq!(empty.jwks(), serde_json::json!({"keys": []}));
    }

    #[test]
    fn jwks_shape() {
        let tmp = tempfile::tempdir().unwrap();
        KeyRing::load_or_create(tmp.path()).unwrap();
        KeyRing::rotate(tmp.path()).unwrap();
        let ring = KeyRing::load_or_create(tmp.path()).unwrap();
        let jwks = ring.jwks();
        let keys = jwks["keys"].as_array().unwrap();
        assert_eq!(keys.len(), 2);
        for (jwk, kid) in keys.iter().zip(ring.kids()) {
            assert_eq!(jwk["kty"], "OKP");
            assert_eq!(jwk["crv"], "Ed25519");
            assert_eq!(jwk["alg"], "EdDSA");
            assert_eq!(jwk["use"], "sig");
            assert_eq!(jwk["kid"], kid);
            let x = URL_SAFE_NO_PAD.decode(jwk["x"].as_str().unwrap()).unwrap();
            assert_eq!(x.len(), 32);
            let vk = VerifyingKey::from_bytes(&x.try_into().unwrap()).unwrap();
            assert_eq!(kid_of(&vk), kid);
            assert_eq!(jwk.as_object().unwrap().len(), 6, "no private members");
        }
    }

    #[test]
    fn every_key_is_endorsed_by_every_older_key_and_nothing_else_verifies() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("keys");
        let first = KeyRing::load_or_create(&dir).unwrap();
        assert!(first.endorsements().is_empty(), "one key endorses nothing");
        KeyRing::rotate(&dir).unwrap();
        KeyRing::rotate(&dir).unwrap();
        let ring = KeyRing::load(&dir).unwrap().unwrap();
        let kids = ring.kids();
        let (newest, middle, oldest) = (kids[0], kids[1], kids[2]);
        let endorsements = ring.endorsements();
        let pairs: Vec<(&str, &str)> = endorsements
            .iter()
            .map(|e| (e.kid.as_str(), e.signed_by.as_str()))
            .collect();
        assert_eq!(
            pairs,
            [(newest, middle), (newest, oldest), (middle, oldest)]
        );
        let jwks = ring.jwks();
        let x_of = |kid: &str| {
            jwks["keys"]
                .as_array()
                .unwrap()
                .iter()
                .find(|k| k["kid"] == kid)
                .unwrap()["x"]
                .as_str()
                .unwrap()
                .to_owned()
        };
        let key_of = |kid: &str| verifying_key_from_jwk_x(&x_of(kid)).unwrap();
        for e in &endorsements {
            assert!(verify_endorsement(
                &key_of(&e.signed_by),
                &e.kid,
                &x_of(&e.kid),
                &e.signature
            ));
            // Not by the endorsed key itself, not for another key, not under another name.
            assert!(!verify_endorsement(
                &key_of(&e.kid),
                &e.kid,
                &x_of(&e.kid),
                &e.signature
            ));
            let other = if e.kid == newest { middle } else { newest };
            assert!(!verify_endorsement(
                &key_of(&e.signed_by),
                &e.kid,
                &x_of(other),
                &e.signature
            ));
            assert!(!verify_endorsement(
                &key_of(&e.signed_by),
                other,
                &x_of(&e.kid),
                &e.signature
            ));
        }
        // An endorsement is not an approval signature or a token signature.
        let e = &endorsements[0];
        assert!(!ring.verify_detached(&e.signed_by, b"nexus-approval-v1\n{}", &e.signature));
    }
}
