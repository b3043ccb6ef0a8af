//! The gate in front of every command: deadlines, and for RED commands (by the server's policy
//! or by this device's own `local_red` list) a server approval signature that this device checks
//! itself against keys pinned at pairing. A row written into the server's database by anyone who
//! does not hold the server's signing key can therefore never run a RED command here.

use std::fmt;

use chrono::DateTime;
use nexus_domain::approval::approval_signing_input;
use nexus_domain::{DeviceCommand, DeviceId, Risk};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::AgentConfig;

/// Why the agent will not run a command. `code` is stable and machine-readable (it goes into
/// the report); `reason` is for humans.
///
/// Codes: `unsigned_red`, `bad_signature`, `approval_expired`, `unknown_key`,
/// `deadline_passed`, `not_allowlisted`, `disabled`, `path_escape`, `special_file`,
/// `too_large`, `bad_params`, `not_found`, `exists`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {reason}")]
pub struct Refusal {
    pub code: &'static str,
    pub reason: String,
}

impl Refusal {
    pub fn new(code: &'static str, reason: impl Into<String>) -> Self {
        Self {
            code,
            reason: reason.into(),
        }
    }
}

/// One pinned Ed25519 public key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerKey {
    pub kid: String,
    /// base64url raw public key (the JWK `x` member); checked to be a valid key on parse.
    pub x: String,
}

impl ServerKey {
    /// Parses one JWK of a JWK Set (`index` is its place, for errors). Keys of other types are
    /// `None` (a future server may publish them); a malformed Ed25519 key is an error.
    fn from_jwk(entry: &Value, index: usize) -> Result<Option<ServerKey>, KeysError> {
        let field = |name| entry.get(name).and_then(Value::as_str);
        if field("kty") != Some("OKP") || field("crv") != Some("Ed25519") {
            return Ok(None);
        }
        if field("use").is_some_and(|u| u != "sig") {
            return Ok(None);
        }
        let kid = field("kid")
            .filter(|k| !k.is_empty())
            .ok_or(KeysError::BadKey {
                index,
                reason: "no kid",
            })?;
        let x = field("x").ok_or(KeysError::BadKey {
            index,
            reason: "no x",
        })?;
        if nexus_auth::jwt::verifying_key_from_jwk_x(x).is_none() {
            return Err(KeysError::BadKey {
                index,
                reason: "x is not an Ed25519 public key",
            });
        }
        Ok(Some(ServerKey {
            kid: kid.to_owned(),
            x: x.to_owned(),
        }))
    }

    fn verifying_key(&self) -> Option<nexus_auth::jwt::VerifyingKey> {
        nexus_auth::jwt::verifying_key_from_jwk_x(&self.x)
    }
}

/// The server's public keys as given at pairing (`CompletePairingResponse.server_keys`).
/// Serialises as a JWK Set and deserialises through [`ServerKeys::from_jwks`], so a stored
/// copy is validated again when it is read back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "Value", into = "Value")]
pub struct ServerKeys {
    keys: Vec<ServerKey>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeysError {
    #[error("the JWK Set has no \"keys\" array")]
    NotAKeySet,
    #[error("the JWK Set has no usable Ed25519 key")]
    NoUsableKey,
    #[error("key {index} of the JWK Set is malformed: {reason}")]
    BadKey { index: usize, reason: &'static str },
}

impl ServerKeys {
    /// Parses a JWK Set (`{"keys":[{"kty":"OKP","crv":"Ed25519","x":..,"kid":..}]}`). Keys of
    /// other types are skipped (a future server may publish them); a malformed Ed25519 key or a
    /// set without any Ed25519 key is an error.
    pub fn from_jwks(jwks: &Value) -> Result<Self, KeysError> {
        let entries = jwks
            .get("keys")
            .and_then(Value::as_array)
            .ok_or(KeysError::NotAKeySet)?;
        let mut keys = Vec::new();
        for (index, entry) in entries.iter().enumerate() {
            keys.extend(ServerKey::from_jwk(entry, index)?);
        }
        if keys.is_empty() {
            return Err(KeysError::NoUsableKey);
        }
        Ok(Self { keys })
    }

    /// The keys as a JWK Set again.
    pub fn to_jwks(&self) -> Value {
        let keys: Vec<Value> = self
            .keys
            .iter()
            .map(|k| {
                serde_json::json!({
                    "kty": "OKP", "crv": "Ed25519", "x": k.x, "kid": k.kid,
                    "alg": "EdDSA", "use": "sig",
                })
            })
            .collect();
        serde_json::json!({ "keys": keys })
    }

    pub fn keys(&self) -> &[ServerKey] {
        &self.keys
    }

    pub fn kids(&self) -> impl Iterator<Item = &str> {
        self.keys.iter().map(|k| k.kid.as_str())
    }

    /// Whether a key named `kid` is pinned.
    pub fn knows(&self, kid: &str) -> bool {
        self.keys.iter().any(|k| k.kid == kid)
    }

    /// Adopts the offered keys that are endorsed by a key already pinned, following chains (a
    /// key endorsed by a key adopted just now counts too), and returns the kids adopted. Keys
    /// without such an endorsement are ignored, whatever the server says about them: pinning
    /// means only the keys given at pairing, and keys they vouch for, are ever trusted.
    pub fn adopt_endorsed(
        &mut self,
        offered: &[Value],
        endorsements: &[nexus_api::KeyEndorsementView],
    ) -> Vec<String> {
        // Malformed offers and other key types are skipped.
        let candidates: Vec<ServerKey> = offered
            .iter()
            .enumerate()
            .filter_map(|(index, jwk)| ServerKey::from_jwk(jwk, index).ok().flatten())
            .collect();
        let mut adopted = Vec::new();
        loop {
            let mut progress = false;
            for candidate in &candidates {
                if self.knows(&candidate.kid) {
                    continue;
                }
                let vouched = endorsements.iter().any(|e| {
                    e.kid == candidate.kid
                        && self
                            .keys
                            .iter()
                            .find(|k| k.kid == e.signed_by)
                            .and_then(ServerKey::verifying_key)
                            .is_some_and(|signer| {
                                nexus_auth::jwt::verify_endorsement(
                                    &signer,
                                    &candidate.kid,
                                    &candidate.x,
                                    &e.signature,
                                )
                            })
                });
                if vouched {
                    self.keys.push(candidate.clone());
                    adopted.push(candidate.kid.clone());
                    progress = true;
                }
            }
            if !progress {
                return adopted;
            }
        }
    }

    /// Checks a detached base64url signature by the key `kid`; `None` when `kid` is unknown.
    pub fn verify(&self, kid: &str, message: &[u8], signature: &str) -> Option<bool> {
        let vk = self.keys.iter().find(|k| k.kid == kid)?.verifying_key()?;
        Some(nexus_auth::jwt::verify_detached_with(
            &vk, message, signature,
        ))
    }
}

impl TryFrom<Value> for ServerKeys {
    type Error = KeysError;
    fn try_from(value: Value) -> Result<Self, KeysError> {
        Self::from_jwks(&value)
    }
}

impl From<ServerKeys> for Value {
    fn from(keys: ServerKeys) -> Value {
        keys.to_jwks()
    }
}

impl fmt::Display for ServerKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kids: Vec<&str> = self.kids().collect();
        write!(f, "{}", kids.join(", "))
    }
}

fn parse_rfc3339_ms(raw: &str) -> Option<i64> {
    DateTime::parse_from_rfc3339(raw)
        .ok()
        .map(|t| t.timestamp_millis())
}

/// Whether the command may start now on this device. Checks, in order: the delivery deadline
/// (`run_before`); then, if the command is RED by the server's policy or by `local.local_red`,
/// that it carries an approval grant whose approval id matches the policy's, signed by a pinned
/// key over exactly this command id, device id, type, params, approval id and expiry, and not
/// yet expired. A grant on a command that does not need one is checked too: a forged or
/// mismatched grant is evidence of tampering, never something to ignore.
pub fn check(
    cmd: &DeviceCommand,
    device_id: &DeviceId,
    keys: &ServerKeys,
    local: &AgentConfig,
    now_unix_ms: i64,
) -> Result<(), Refusal> {
    if let Some(run_before) = &cmd.run_before {
        let deadline = parse_rfc3339_ms(run_before).ok_or_else(|| {
            Refusal::new(
                "bad_params",
                format!("run_before {run_before:?} is not an RFC 3339 time"),
            )
        })?;
        if now_unix_ms > deadline {
            return Err(Refusal::new(
                "deadline_passed",
                format!("the command had to start before {run_before}"),
            ));
        }
    }

    let locally_red = local.is_locally_red(&cmd.command_type);
    let needs_approval = locally_red || cmd.policy.risk == Risk::Red;
    let Some(grant) = &cmd.approval else {
        if needs_approval {
            let why = if cmd.policy.risk == Risk::Red {
                "the server marks it RED"
            } else {
                "this device's local policy treats it as RED"
            };
            return Err(Refusal::new(
                "unsigned_red",
                format!(
                    "{} needs a signed approval ({why}) and none came with it",
                    cmd.command_type
                ),
            ));
        }
        return Ok(());
    };

    if let Some(expected) = &cmd.policy.approval_id
        && expected != grant.approval_id.as_str()
    {
        return Err(Refusal::new(
            "bad_signature",
            format!(
                "the approval grant is for {} but the command names approval {expected}",
                grant.approval_id
            ),
        ));
    }
    let message = approval_signing_input(
        &cmd.command_id,
        device_id,
        &cmd.command_type,
        &cmd.params,
        &grant.approval_id,
        &grant.expires_at,
    );
    match keys.verify(&grant.kid, &message, &grant.signature) {
        None => {
            return Err(Refusal::new(
                "unknown_key",
                format!(
                    "the approval is signed by key {:?}, which is not among the server keys pinned at pairing ({keys})",
                    grant.kid
                ),
            ));
        }
        Some(false) => {
            return Err(Refusal::new(
                "bad_signature",
                "the approval signature does not match this command on this device",
            ));
        }
        Some(true) => {}
    }
    let expires = parse_rfc3339_ms(&grant.expires_at).ok_or_else(|| {
        Refusal::new(
            "bad_params",
            format!(
                "approval expires_at {:?} is not an RFC 3339 time",
                grant.expires_at
            ),
        )
    })?;
    if now_unix_ms >= expires {
        return Err(Refusal::new(
            "approval_expired",
            format!("the approval expired at {}", grant.expires_at),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use nexus_auth::jwt::KeyRing;
    use nexus_domain::approval::{ApprovalGrant, ApprovalId};
    use nexus_domain::command::{ClientContext, CommandPolicy};
    use nexus_domain::time::rfc3339;
    use nexus_domain::{CommandId, UserId};
    use serde_json::json;

    use super::*;

    const NOW: i64 = 1_800_000_000_000;

    struct Setup {
        ring: KeyRing,
        keys: ServerKeys,
        device: DeviceId,
        config: AgentConfig,
    }

    fn setup() -> Setup {
        let ring = KeyRing::ephemeral();
        let keys = ServerKeys::from_jwks(&ring.jwks()).unwrap();
        Setup {
            ring,
            keys,
            device: DeviceId::generate(),
            config: AgentConfig::default(),
        }
    }

    fn command(kind: &str, risk: Risk, params: Value) -> DeviceCommand {
        DeviceCommand {
            command_id: CommandId::generate(),
            command_type: kind.to_owned(),
            params,
            context: Value::Null,
            client_context: ClientContext::default(),
            policy: CommandPolicy {
                risk,
                approval_id: None,
            },
            created_at: rfc3339(NOW - 1000),
            attempt: 1,
            run_before: None,
            approval: None,
        }
    }

    /// Approves `cmd` for `device` as the server would, valid until `expires_at_ms`.
    fn approve(ring: &KeyRing, cmd: &mut DeviceCommand, device: &DeviceId, expires_at_ms: i64) {
        let approval_id = ApprovalId::generate();
        let expires_at = rfc3339(expires_at_ms);
        let input = approval_signing_input(
            &cmd.command_id,
            device,
            &cmd.command_type,
            &cmd.params,
            &approval_id,
            &expires_at,
        );
        let (kid, signature) = ring.sign_detached(&input).unwrap();
        cmd.policy.approval_id = Some(approval_id.as_str().to_owned());
        cmd.approval = Some(ApprovalGrant {
            approval_id,
            approved_by: UserId::generate(),
            approved_at: rfc3339(NOW - 500),
            expires_at,
            kid,
            signature,
        });
    }

    fn code(r: Result<(), Refusal>) -> &'static str {
        r.unwrap_err().code
    }

    fn red() -> DeviceCommand {
        command("shell.exec", Risk::Red, json!({"argv": ["echo", "hi"]}))
    }

    #[test]
    fn green_without_approval_runs() {
        let s = setup();
        let cmd = command("fs.read", Risk::Green, json!({"path": "a.txt"}));
        assert!(check(&cmd, &s.device, &s.keys, &s.config, NOW).is_ok());
        let cmd = command("fs.write", Risk::Yellow, json!({"path": "a.txt"}));
        assert!(check(&cmd, &s.device, &s.keys, &s.config, NOW).is_ok());
    }

    #[test]
    fn signed_red_runs() {
        let s = setup();
        let mut cmd = red();
        approve(&s.ring, &mut cmd, &s.device, NOW + 60_000);
        assert!(check(&cmd, &s.device, &s.keys, &s.config, NOW).is_ok());
        // A stored-and-reloaded copy of the keys works the same.
        let stored = serde_json::to_string(&s.keys).unwrap();
        let keys: ServerKeys = serde_json::from_str(&stored).unwrap();
        assert_eq!(keys, s.keys);
        assert!(check(&cmd, &s.device, &keys, &s.config, NOW).is_ok());
    }

    #[test]
    fn unsigned_red_is_refused() {
        let s = setup();
        assert_eq!(
            code(check(&red(), &s.device, &s.keys, &s.config, NOW)),
            "unsigned_red"
        );
        // RED by the server even though nothing in the local list says so.
        let cmd = command("custom.thing", Risk::Red, json!({}));
        assert_eq!(
            code(check(&cmd, &s.device, &s.keys, &s.config, NOW)),
            "unsigned_red"
        );
    }

    #[test]
    fn locally_red_needs_a_signature_even_if_the_server_says_green() {
        let s = setup();
        for kind in [
            "fs.delete",
            "shell.exec",
            "system.settings.wifi",
            "email.send",
        ] {
            let cmd = command(kind, Risk::Green, json!({"path": "x"}));
            assert_eq!(
                code(check(&cmd, &s.device, &s.keys, &s.config, NOW)),
                "unsigned_red",
                "{kind}"
            );
        }
        let mut cmd = command("fs.delete", Risk::Green, json!({"path": "x"}));
        approve(&s.ring, &mut cmd, &s.device, NOW + 60_000);
        assert!(check(&cmd, &s.device, &s.keys, &s.config, NOW).is_ok());
        // And a local list can add types.
        let strict = AgentConfig {
            local_red: vec!["fs.*".into()],
            ..AgentConfig::default()
        };
        let cmd = command("fs.read", Risk::Green, json!({"path": "x"}));
        assert_eq!(
            code(check(&cmd, &s.device, &s.keys, &strict, NOW)),
            "unsigned_red"
        );
    }

    #[test]
    fn tampering_breaks_the_signature() {
        let s = setup();
        let mut cmd = red();
        approve(&s.ring, &mut cmd, &s.device, NOW + 60_000);

        let mut params = cmd.clone();
        params.params = json!({"argv": ["rm", "-rf", "/"]});
        let mut kind = cmd.clone();
        kind.command_type = "fs.delete".into();
        let mut id = cmd.clone();
        id.command_id = CommandId::generate();
        let mut expiry = cmd.clone();
        expiry.approval.as_mut().unwrap().expires_at = rfc3339(NOW + 3_600_000);
        let mut sig = cmd.clone();
        let grant = sig.approval.as_mut().unwrap();
        let mut bytes = grant.signature.clone().into_bytes();
        bytes[3] = if bytes[3] == b'A' { b'B' } else { b'A' };
        grant.signature = String::from_utf8(bytes).unwrap();
        let mut garbage = cmd.clone();
        garbage.approval.as_mut().unwrap().signature = "not base64 !".into();
        for (what, c) in [
            ("params", params),
            ("type", kind),
            ("command id", id),
            ("expiry", expiry),
            ("signature", sig),
            ("garbage", garbage),
        ] {
            assert_eq!(
                code(check(&c, &s.device, &s.keys, &s.config, NOW)),
                "bad_signature",
                "{what}"
            );
        }
    }

    #[test]
    fn an_approval_for_another_device_does_not_run_here() {
        let s = setup();
        let mut cmd = red();
        approve(&s.ring, &mut cmd, &DeviceId::generate(), NOW + 60_000);
        assert_eq!(
            code(check(&cmd, &s.device, &s.keys, &s.config, NOW)),
            "bad_signature"
        );
    }

    #[test]
    fn a_grant_for_another_approval_id_is_refused() {
        let s = setup();
        let mut cmd = red();
        approve(&s.ring, &mut cmd, &s.device, NOW + 60_000);
        cmd.policy.approval_id = Some(ApprovalId::generate().as_str().to_owned());
        assert_eq!(
            code(check(&cmd, &s.device, &s.keys, &s.config, NOW)),
            "bad_signature"
        );
    }

    #[test]
    fn unknown_key_is_refused() {
        let s = setup();
        let other = KeyRing::ephemeral();
        let mut cmd = red();
        approve(&other, &mut cmd, &s.device, NOW + 60_000);
        assert_eq!(
            code(check(&cmd, &s.device, &s.keys, &s.config, NOW)),
            "unknown_key"
        );
        // A signature by another key under a pinned kid is a bad signature.
        let mut cmd = red();
        approve(&other, &mut cmd, &s.device, NOW + 60_000);
        cmd.approval.as_mut().unwrap().kid = s.ring.signing_kid().unwrap().to_owned();
        assert_eq!(
            code(check(&cmd, &s.device, &s.keys, &s.config, NOW)),
            "bad_signature"
        );
    }

    #[test]
    fn expired_approval_is_refused() {
        let s = setup();
        let mut cmd = red();
        approve(&s.ring, &mut cmd, &s.device, NOW - 1);
        assert_eq!(
            code(check(&cmd, &s.device, &s.keys, &s.config, NOW)),
            "approval_expired"
        );
        let mut cmd = red();
        approve(&s.ring, &mut cmd, &s.device, NOW);
        assert_eq!(
            code(check(&cmd, &s.device, &s.keys, &s.config, NOW)),
            "approval_expired"
        );
    }

    #[test]
    fn a_forged_grant_on_a_green_command_is_still_refused() {
        let s = setup();
        let mut cmd = command("fs.read", Risk::Green, json!({"path": "a"}));
        approve(&KeyRing::ephemeral(), &mut cmd, &s.device, NOW + 60_000);
        assert_eq!(
            code(check(&cmd, &s.device, &s.keys, &s.config, NOW)),
            "unknown_key"
        );
    }

    #[test]
    fn run_before_is_a_deadline() {
        let s = setup();
        let mut cmd = command("fs.read", Risk::Green, json!({"path": "a"}));
        cmd.run_before = Some(rfc3339(NOW - 1));
        assert_eq!(
            code(check(&cmd, &s.device, &s.keys, &s.config, NOW)),
            "deadline_passed"
        );
        cmd.run_before = Some(rfc3339(NOW + 1000));
        assert!(check(&cmd, &s.device, &s.keys, &s.config, NOW).is_ok());
        cmd.run_before = Some("tomorrow".into());
        assert_eq!(
            code(check(&cmd, &s.device, &s.keys, &s.config, NOW)),
            "bad_params"
        );
        // A valid approval does not outlive the delivery deadline.
        let mut cmd = red();
        approve(&s.ring, &mut cmd, &s.device, NOW + 60_000);
        cmd.run_before = Some(rfc3339(NOW - 1));
        assert_eq!(
            code(check(&cmd, &s.device, &s.keys, &s.config, NOW)),
            "deadline_passed"
        );
    }

    #[test]
    fn jwks_parsing() {
        let ring = KeyRing::ephemeral();
        let keys = ServerKeys::from_jwks(&ring.jwks()).unwrap();
        assert_eq!(
            keys.kids().collect::<Vec<_>>(),
            vec![ring.signing_kid().unwrap()]
        );
        assert_eq!(ServerKeys::from_jwks(&keys.to_jwks()).unwrap(), keys);
        assert_eq!(
            ServerKeys::from_jwks(&json!({})),
            Err(KeysError::NotAKeySet)
        );
        assert_eq!(
            ServerKeys::from_jwks(&json!({"keys": []})),
            Err(KeysError::NoUsableKey)
        );
        assert_eq!(
            ServerKeys::from_jwks(
                &json!({"keys": [{"kty": "RSA", "n": "x", "e": "AQAB", "kid": "r"}]})
            ),
            Err(KeysError::NoUsableKey)
        );
        assert!(matches!(
            ServerKeys::from_jwks(
                &json!({"keys": [{"kty": "OKP", "crv": "Ed25519", "x": "AAAA", "kid": "k"}]})
            ),
            Err(KeysError::BadKey { index: 0, .. })
        ));
        let mut jwks = ring.jwks();
        jwks["keys"][0].as_object_mut().unwrap().remove("kid");
        assert!(matches!(
            ServerKeys::from_jwks(&jwks),
            Err(KeysError::BadKey { index: 0, .. })
        ));
        // Deserialising validates too.
        assert!(serde_json::from_value::<ServerKeys>(json!({"keys": []})).is_err());
    }

    fn offer(ring: &KeyRing) -> (Vec<Value>, Vec<nexus_api::KeyEndorsementView>) {
        let keys = ring.jwks()["keys"].as_array().unwrap().clone();
        let endorsements = ring
            .endorsements()
            .into_iter()
            .map(|e| nexus_api::KeyEndorsementView {
                kid: e.kid,
                signed_by: e.signed_by,
                signature: e.signature,
            })
            .collect();
        (keys, endorsements)
    }

    #[test]
    fn keys_endorsed_by_a_pinned_key_are_adopted_through_chains() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("keys");
        let first = KeyRing::load_or_create(&dir).unwrap();
        let mut pinned = ServerKeys::from_jwks(&first.jwks()).unwrap();
        let rotated = [
            KeyRing::rotate(&dir).unwrap(),
            KeyRing::rotate(&dir).unwrap(),
        ];
        let ring = KeyRing::load(&dir).unwrap().unwrap();
        let (keys, endorsements) = offer(&ring);
        // Only the chain middle → newest: the newest is reachable through the adopted middle.
        let chain_only: Vec<_> = endorsements
            .iter()
            .filter(|e| e.signed_by != first.kids()[0] || e.kid == rotated[0])
            .cloned()
            .collect();
        assert_eq!(chain_only.len(), 2);
        let mut adopted = pinned.adopt_endorsed(&keys, &chain_only);
        adopted.sort();
        let mut want = rotated.to_vec();
        want.sort();
        assert_eq!(adopted, want);
        assert!(pinned.knows(&rotated[1]) && pinned.knows(first.kids()[0]));
        assert!(
            pinned.adopt_endorsed(&keys, &endorsements).is_empty(),
            "nothing new"
        );

        // And an approval signed by the newest key now verifies.
        let device = DeviceId::generate();
        let mut cmd = command("fs.delete", Risk::Red, json!({"path": "/x"}));
        approve(&ring, &mut cmd, &device, NOW + 60_000);
        assert_eq!(
            check(&cmd, &device, &pinned, &AgentConfig::default(), NOW),
            Ok(())
        );
    }

    #[test]
    fn keys_without_a_valid_endorsement_by_a_pinned_key_are_ignored() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("keys");
        let first = KeyRing::load_or_create(&dir).unwrap();
        let pinned = ServerKeys::from_jwks(&first.jwks()).unwrap();
        let newer = KeyRing::rotate(&dir).unwrap();
        let ring = KeyRing::load(&dir).unwrap().unwrap();
        let (keys, endorsements) = offer(&ring);

        // No endorsements at all (say, a server that merely lists a key).
        assert!(pinned.clone().adopt_endorsed(&keys, &[]).is_empty());
        // A tampered signature.
        let mut tampered = endorsements.clone();
        let sig = &mut tampered[0].signature;
        let flipped = if sig.starts_with('A') { "B" } else { "A" };
        sig.replace_range(0..1, flipped);
        assert!(pinned.clone().adopt_endorsed(&keys, &tampered).is_empty());
        // Claimed to be signed by the pinned key, but signed by another (an attacker's) key.
        let attacker = KeyRing::ephemeral();
        let (attacker_keys, _) = offer(&attacker);
        let attacker_x = attacker_keys[0]["x"].as_str().unwrap();
        let attacker_kid = attacker.kids()[0].to_owned();
        let (_, forged_sig) = attacker
            .sign_detached(&nexus_auth::jwt::endorsement_input(
                &attacker_kid,
                attacker_x,
            ))
            .unwrap();
        let forged = vec![nexus_api::KeyEndorsementView {
            kid: attacker_kid.clone(),
            signed_by: first.kids()[0].to_owned(),
            signature: forged_sig,
        }];
        assert!(
            pinned
                .clone()
                .adopt_endorsed(&attacker_keys, &forged)
                .is_empty()
        );
        // A genuine endorsement of the new key does not carry over to another key offered
        // under the new key's kid.
        let mut swapped = attacker_keys[0].clone();
        swapped["kid"] = json!(newer);
        assert!(
            pinned
                .clone()
                .adopt_endorsed(std::slice::from_ref(&swapped), &endorsements)
                .is_empty()
        );
        // The oldest key pruned: nothing the device pinned vouches for what is left.
        KeyRing::rotate(&dir).unwrap();
        KeyRing::prune(&dir, 2).unwrap();
        let pruned = KeyRing::load(&dir).unwrap().unwrap();
        assert!(!pruned.kids().contains(&first.kids()[0]));
        let (keys, endorsements) = offer(&pruned);
        let mut only_newest_chain = pinned.clone();
        assert!(
            only_newest_chain
                .adopt_endorsed(&keys, &endorsements)
                .is_empty(),
            "a device that missed a pruned key must pair again"
        );
    }
}
