//! Bearer secrets: 256 random bits with a readable prefix so leaked tokens can be spotted by
//! scanners (DESIGN.md §6). Only a SHA-256 hash is ever stored. A fast hash is right here —
//! unlike passwords, these secrets have full entropy, so there is nothing to brute-force.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// A secret as handed to its owner exactly once. `Debug` is redacted so it cannot leak via logs.
#[derive(Clone, PartialEq, Eq)]
pub struct DeviceToken(String);

impl DeviceToken {
    pub const PREFIX: &'static str = "nxd_";
    /// Device refresh tokens share the web refresh prefix (DESIGN.md §6).
    pub const REFRESH_PREFIX: &'static str = "nxr_";

    pub fn generate() -> Self {
        Self(random_secret(Self::PREFIX))
    }

    pub fn generate_refresh() -> Self {
        Self(random_secret(Self::REFRESH_PREFIX))
    }

    /// Wraps a presented access token. Shape is checked so garbage is rejected before hashing.
    pub fn from_presented(raw: &str) -> Option<Self> {
        Self::with_prefix(raw, Self::PREFIX)
    }

    pub fn from_presented_refresh(raw: &str) -> Option<Self> {
        Self::with_prefix(raw, Self::REFRESH_PREFIX)
    }

    fn with_prefix(raw: &str, prefix: &str) -> Option<Self> {
        let body = raw.strip_prefix(prefix)?;
        (body.len() == 43
            && body
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'))
        .then(|| Self(raw.to_owned()))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn hash(&self) -> SecretHash {
        SecretHash::of(&self.0)
    }
}

impl fmt::Debug for DeviceToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "DeviceToken({}…redacted)",
            &self.0[..4.min(self.0.len())]
        )
    }
}

/// A random one-time secret with a prefix (`prefix` + 43 base64url chars = 256 bits).
pub fn random_secret(prefix: &str) -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    format!("{prefix}{}", URL_SAFE_NO_PAD.encode(bytes))
}

/// Hex SHA-256 of a secret, the only form in which secrets are stored.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct SecretHash(String);

impl SecretHash {
    pub fn of(secret: &str) -> Self {
        Self(hex::encode(Sha256::digest(secret.as_bytes())))
    }

    pub fn from_stored(hex: String) -> Self {
        Self(hex)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Constant-time equality, so timing does not reveal how much of a guess matched.
    pub fn matches(&self, other: &SecretHash) -> bool {
        self.0.as_bytes().ct_eq(other.0.as_bytes()).into()
    }
}

impl fmt::Debug for SecretHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretHash({}…)", &self.0[..self.0.len().min(8)])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_shape_and_hash() {
        let t = DeviceToken::generate();
        assert!(t.expose().starts_with("nxd_"));
        assert_eq!(t.expose().len(), 4 + 43);
        assert_eq!(DeviceToken::from_presented(t.expose()), Some(t.clone()));
        assert!(t.hash().matches(&SecretHash::of(t.expose())));
        assert!(!t.hash().matches(&DeviceToken::generate().hash()));
        assert!(!format!("{t:?}").contains(&t.expose()[4..]));
    }

    #[test]
    fn malformed_presented_tokens_rejected() {
        assert!(DeviceToken::from_presented("nxd_short").is_none());
        assert!(DeviceToken::from_presented("abc").is_none());
        assert!(DeviceToken::from_presented(&format!("nxd_{}", "!".repeat(43))).is_none());
    }
}
