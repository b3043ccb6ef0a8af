//! Pairing: a device shows a short code, a user of a tenant confirms it, the device claims its
//! credentials once. The code is only a rendezvous; the secret that binds the claim is the nonce
//! the device received at start (and only the device has).

use std::fmt;

use rand::Rng;
use serde::Serialize;

use crate::validation::ValidationErrors;

/// How long a pairing code stays confirmable and claimable.
pub const PAIRING_TTL_MILLIS: i64 = 5 * 60 * 1000;

/// Six digits shown as `ddd-ddd`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PairingCode(String);

impl PairingCode {
    pub fn generate() -> Self {
        let n: u32 = rand::rngs::OsRng.gen_range(0..1_000_000);
        Self(format!("{:03}-{:03}", n / 1000, n % 1000))
    }

    /// Accepts `123-456` and, for people typing it, `123456` or surrounding spaces.
    pub fn parse(raw: &str) -> Result<Self, ValidationErrors> {
        let digits: String = raw
            .trim()
            .chars()
            .filter(|c| *c != '-' && *c != ' ')
            .collect();
        if digits.len() != 6 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(ValidationErrors::single(
                "pairing_code",
                "must be six digits, like 123-456",
            ));
        }
        Ok(Self(format!("{}-{}", &digits[..3], &digits[3..])))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for PairingCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where a pairing is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PairingState {
    Pending,
    Confirmed,
    Completed,
}

impl PairingState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Confirmed => "confirmed",
            Self::Completed => "completed",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        match raw {
            "pending" => Some(Self::Pending),
            "confirmed" => Some(Self::Confirmed),
            "completed" => Some(Self::Completed),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_codes_have_the_shape() {
        for _ in 0..100 {
            let c = PairingCode::generate();
            assert_eq!(PairingCode::parse(c.as_str()).unwrap(), c);
            assert_eq!(c.as_str().len(), 7);
        }
    }

    #[test]
    fn lenient_input_strict_shape() {
        assert_eq!(PairingCode::parse(" 123456 ").unwrap().as_str(), "123-456");
        assert!(PairingCode::parse("12-3456x").is_err());
        assert!(PairingCode::parse("1234567").is_err());
    }
}

/// A pairing attempt as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Pairing {
    pub id: crate::ids::PairingId,
    /// `None` once released (completed or expired and reused).
    pub code: Option<PairingCode>,
    /// Set at start when the device named its tenant, or at confirm by the confirming user.
    pub tenant: Option<crate::tenant::TenantId>,
    pub device_name: String,
    pub device_type: String,
    pub capabilities: Vec<String>,
    pub nonce_hash: crate::secret::SecretHash,
    pub state: PairingState,
    /// Chosen when the pairing is confirmed; the device row is created on completion.
    pub device_id: Option<crate::ids::DeviceId>,
    pub created_at: crate::time::Millis,
    pub expires_at: crate::time::Millis,
    /// The address the device called from and the agent version it announced, shown to the
    /// user who previews the code (RFC 8628 §5.4: check it is really your device).
    pub client_ip: Option<String>,
    pub agent_version: Option<String>,
}

impl Pairing {
    /// A short fingerprint both sides can show: the device derives it from its nonce, the server
    /// from the nonce's hash, so a user can tell their device's pairing from a phished code.
    pub fn fingerprint(&self) -> String {
        pairing_fingerprint(&self.nonce_hash)
    }

    pub fn is_expired(&self, now: crate::time::Millis) -> bool {
        now >= self.expires_at
    }
}

/// `ABCD-1234` from the SHA-256 of the nonce (the device computes `SecretHash::of(nonce)` first).
pub fn pairing_fingerprint(nonce_hash: &crate::secret::SecretHash) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(format!("nexus-pairing-fingerprint:{}", nonce_hash.as_str()));
    let hex = hex::encode_upper(&digest[..4]);
    format!("{}-{}", &hex[..4], &hex[4..])
}
