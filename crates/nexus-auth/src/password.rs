//! Password rules and password hashing. The rules live here, not in the handlers, so sign-up,
//! password change, admin reset and bootstrap all enforce the same policy; hashing is Argon2id with
//! the OWASP minimum parameters so a stolen database is expensive to crack.

use std::collections::HashSet;
use std::fmt;
use std::sync::OnceLock;

use argon2::password_hash::{PasswordHash, PasswordHasher as _, PasswordVerifier as _, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use rand::RngCore;
use unicode_normalization::UnicodeNormalization;

/// The most characters a password may have. Long enough for any passphrase (NIST asks for ≥ 64).
pub const MAX_PASSWORD_CHARS: usize = 256;
/// The most bytes a password may have, so nobody can make the server hash megabytes per attempt.
/// 1024 bytes hold 256 characters of up to four bytes each.
pub const MAX_PASSWORD_BYTES: usize = 1024;

/// Which rules a new password must satisfy. Built from a preset (`default_rule`, `nist`) chosen by
/// configuration; the fields are public so tests and future presets can adjust one rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PasswordPolicy {
    /// Minimum length in characters (Unicode scalar values), not bytes.
    pub min_chars: usize,
    /// At least one character that is neither a letter nor a digit (spaces and symbols count).
    pub require_special: bool,
    /// Reject passwords from the shipped common-password list (case-insensitive).
    pub reject_common: bool,
    /// Reject passwords containing the user's email, or its local part if that has ≥ 3 characters.
    pub reject_email: bool,
    pub max_chars: usize,
    pub max_bytes: usize,
}

impl PasswordPolicy {
    /// The product owner's rule: ≥ 8 characters with at least one special character, not a
    /// common password, not containing the email.
    pub fn default_rule() -> Self {
        Self {
            min_chars: 8,
            require_special: true,
            reject_common: true,
            reject_email: true,
            max_chars: MAX_PASSWORD_CHARS,
            max_bytes: MAX_PASSWORD_BYTES,
        }
    }

    /// NIST SP 800-63B rev 4 for single-factor passwords: ≥ 15 characters and no composition
    /// rules, but a blocklist. NIST counts "context-specific words such as the username" as
    /// blocklist material, so the email rule stays on here too.
    pub fn nist() -> Self {
        Self {
            min_chars: 15,
            require_special: false,
            reject_common: true,
            reject_email: true,
            max_chars: MAX_PASSWORD_CHARS,
            max_bytes: MAX_PASSWORD_BYTES,
        }
    }

    /// The preset configured by name (`default` or `nist`).
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "default" => Some(Self::default_rule()),
            "nist" => Some(Self::nist()),
            _ => None,
        }
    }

    /// Checks a proposed password, reporting every violated rule at once so the user can fix them
    /// in one go. Pass `""` as `email` when there is none. Cheap: no hashing happens here.
    pub fn check(&self, password: &str, email: &str) -> Result<(), PasswordRejected> {
        let chars = password.chars().count();
        if chars > self.max_chars || password.len() > self.max_bytes {
            // Stop here: the other checks would walk an arbitrarily long input.
            return Err(PasswordRejected {
                violations: vec![Violation::TooLong {
                    max_chars: self.max_chars,
                }],
            });
        }
        let mut violations = Vec::new();
        if chars < self.min_chars {
            violations.push(Violation::TooShort {
                min_chars: self.min_chars,
            });
        }
        if self.require_special && password.chars().all(char::is_alphanumeric) {
            violations.push(Violation::NeedsSpecialCharacter);
        }
        let lower = password.to_lowercase();
        if self.reject_common && is_common_password(&lower) {
            violations.push(Violation::TooCommon);
        }
        if self.reject_email && contains_email(&lower, email) {
            violations.push(Violation::ContainsEmail);
        }
        if violations.is_empty() {
            Ok(())
        } else {
            Err(PasswordRejected { violations })
        }
    }
}

impl Default for PasswordPolicy {
    fn default() -> Self {
        Self::default_rule()
    }
}

fn contains_email(lower_password: &str, email: &str) -> bool {
    let email = email.trim().to_lowercase();
    if email.is_empty() {
        return false;
    }
    if lower_password.contains(&email) {
        return true;
    }
    // A short local part ("jo@…") would forbid too many innocent passwords.
    match email.rsplit_once('@') {
        Some((local, _)) if local.chars().count() >= 3 => lower_password.contains(local),
        _ => false,
    }
}

/// One broken rule. The code is stable (API clients and the console match on it); the message is
/// for people and never includes the password.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Violation {
    TooShort { min_chars: usize },
    TooLong { max_chars: usize },
    NeedsSpecialCharacter,
    TooCommon,
    ContainsEmail,
}

impl Violation {
    pub fn code(&self) -> &'static str {
        match self {
            Violation::TooShort { .. } => "too_short",
            Violation::TooLong { .. } => "too_long",
            Violation::NeedsSpecialCharacter => "needs_special_character",
            Violation::TooCommon => "too_common",
            Violation::ContainsEmail => "contains_email",
        }
    }

    pub fn message(&self) -> String {
        match self {
            Violation::TooShort { min_chars } => {
                format!("Use at least {min_chars} characters.")
            }
            Violation::TooLong { max_chars } => {
                format!("Use at most {max_chars} characters.")
            }
            Violation::NeedsSpecialCharacter => {
                "Include at least one character that is not a letter or digit, such as a space or a symbol."
                    .to_owned()
            }
            Violation::TooCommon => {
                "This password is too common; choose one that is harder to guess.".to_owned()
            }
            Violation::ContainsEmail => "Do not use your email address in your password.".to_owned(),
        }
    }
}

/// Why a proposed password was refused: every violated rule, in a fixed order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PasswordRejected {
    pub violations: Vec<Violation>,
}

impl PasswordRejected {
    pub fn codes(&self) -> Vec<&'static str> {
        self.violations.iter().map(Violation::code).collect()
    }

    pub fn messages(&self) -> Vec<String> {
        self.violations.iter().map(Violation::message).collect()
    }
}

impl fmt::Display for PasswordRejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.messages().join(" "))
    }
}

impl std::error::Error for PasswordRejected {}

const COMMON_PASSWORDS: &str = include_str!("../data/common-passwords.txt");

fn common_passwords() -> &'static HashSet<&'static str> {
    // Built on first use (~30k entries, a few milliseconds), then shared.
    static SET: OnceLock<HashSet<&'static str>> = OnceLock::new();
    SET.get_or_init(|| {
        COMMON_PASSWORDS
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect()
    })
}

/// Whether the password is on the shipped common-password list (case-insensitive).
pub fn is_common_password(password: &str) -> bool {
    let set = common_passwords();
    set.contains(password) || set.contains(password.to_lowercase().as_str())
}

/// How many passwords the shipped list holds (for tests and diagnostics).
pub fn common_password_count() -> usize {
    common_passwords().len()
}

/// Argon2id with m = 19456 KiB, t = 2, p = 1: the OWASP minimum, about 20–50 ms per hash on one core.
const PARAMS: Params = match Params::new(19_456, 2, 1, None) {
    Ok(params) => params,
    Err(_) => panic!("invalid Argon2 parameters"),
};

/// Could not hash a password (only possible on an internal Argon2 failure).
#[derive(Debug, thiserror::Error)]
#[error("password hashing failed")]
pub struct HashError;

/// Hashes and verifies passwords as PHC strings (`$argon2id$v=19$m=19456,t=2,p=1$…`).
///
/// Every method here is deliberately slow, blocking CPU work: call it via
/// `tokio::task::spawn_blocking`, never directly on an async worker thread.
///
/// Passwords are NFKC-normalised before hashing (NIST SP 800-63B), so the same password typed on
/// devices that compose accents differently still matches.
#[derive(Clone)]
pub struct PasswordHasher {
    argon2: Argon2<'static>,
}

impl Default for PasswordHasher {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for PasswordHasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PasswordHasher(argon2id m=19456 t=2 p=1)")
    }
}

impl PasswordHasher {
    pub fn new() -> Self {
        Self {
            argon2: Argon2::new(Algorithm::Argon2id, Version::V0x13, PARAMS),
        }
    }

    /// A PHC string with a fresh 128-bit salt. Blocking (see the type's docs).
    pub fn hash_password(&self, password: &str) -> Result<String, HashError> {
        let mut salt = [0u8; 16];
        rand::rngs::OsRng.fill_bytes(&mut salt);
        let salt = SaltString::encode_b64(&salt).map_err(|_| HashError)?;
        let normalized: String = password.nfkc().collect();
        self.argon2
            .hash_password(normalized.as_bytes(), &salt)
            .map(|hash| hash.to_string())
            .map_err(|_| HashError)
    }

    /// Whether `password` matches the stored PHC string. False for a malformed hash or an
    /// over-long password; never panics. Blocking (see the type's docs).
    pub fn verify_password(&self, phc: &str, password: &str) -> bool {
        if password.len() > MAX_PASSWORD_BYTES {
            return false;
        }
        let Ok(parsed) = PasswordHash::new(phc) else {
            return false;
        };
        let normalized: String = password.nfkc().collect();
        // Argon2 takes the algorithm and cost parameters from the PHC string itself.
        self.argon2
            .verify_password(normalized.as_bytes(), &parsed)
            .is_ok()
    }

    /// Spends the same time as `verify_password` against a real hash, for logins naming an unknown
    /// account, so response time does not reveal which emails are registered. The hash compared
    /// against is computed once, lazily (so the very first call costs one extra hash; call it once
    /// at start-up to warm it). Blocking (see the type's docs).
    pub fn dummy_verify(&self, password: &str) {
        static DUMMY: OnceLock<String> = OnceLock::new();
        let phc = DUMMY.get_or_init(|| {
            self.hash_password("nexus-dummy-password-for-timing")
                .unwrap_or_default()
        });
        let _ = self.verify_password(phc, password);
    }

    /// Whether a stored hash uses other parameters than the current ones, so the caller can
    /// re-hash the password after a successful login when the parameters are raised.
    pub fn needs_rehash(&self, phc: &str) -> bool {
        let Ok(parsed) = PasswordHash::new(phc) else {
            return true;
        };
        if parsed.algorithm != Algorithm::Argon2id.ident() {
            return true;
        }
        match Params::try_from(&parsed) {
            Ok(p) => {
                p.m_cost() != PARAMS.m_cost()
                    || p.t_cost() != PARAMS.t_cost()
                    || p.p_cost() != PARAMS.p_cost()
            }
            Err(_) => true,
        }
    }
}

fn shared_hasher() -> &'static PasswordHasher {
    static HASHER: OnceLock<PasswordHasher> = OnceLock::new();
    HASHER.get_or_init(PasswordHasher::new)
}

/// `PasswordHasher::hash_password` with the standard parameters. Blocking: use `spawn_blocking`.
pub fn hash_password(password: &str) -> Result<String, HashError> {
    shared_hasher().hash_password(password)
}

/// `PasswordHasher::verify_password` with the standard parameters. Blocking: use `spawn_blocking`.
pub fn verify_password(phc: &str, password: &str) -> bool {
    shared_hasher().verify_password(phc, password)
}

/// `PasswordHasher::dummy_verify` with the standard parameters. Blocking: use `spawn_blocking`.
pub fn dummy_verify(password: &str) {
    shared_hasher().dummy_verify(password)
}

/// `PasswordHasher::needs_rehash` with the standard parameters.
pub fn needs_rehash(phc: &str) -> bool {
    shared_hasher().needs_rehash(phc)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn codes(policy: &PasswordPolicy, password: &str, email: &str) -> Vec<&'static str> {
        match policy.check(password, email) {
            Ok(()) => vec![],
            Err(rejected) => rejected.codes(),
        }
    }

    #[test]
    fn default_rule_accepts_and_rejects() {
        let p = PasswordPolicy::default_rule();
        assert_eq!(
            codes(&p, "blue-Horse-42", "ana@example.com"),
            Vec::<&str>::new()
        );
        assert_eq!(codes(&p, "correct horse", ""), Vec::<&str>::new());
        assert_eq!(codes(&p, "a!b2c3", ""), vec!["too_short"]);
        assert_eq!(codes(&p, "abcdefgh12", ""), vec!["needs_special_character"]);
        assert_eq!(
            codes(&p, "abc", ""),
            vec!["too_short", "needs_special_character"]
        );
        // Characters, not bytes: 8 two-byte characters are enough, 7 are not.
        assert_eq!(codes(&p, "ééééééé!", ""), Vec::<&str>::new());
        assert_eq!(codes(&p, "éééééé!", ""), vec!["too_short"]);
        // Letters and digits of any script are not special.
        assert_eq!(
            codes(&p, "пароль123456", ""),
            vec!["needs_special_character"]
        );
    }

    #[test]
    fn nist_needs_length_not_composition() {
        let p = PasswordPolicy::nist();
        assert_eq!(codes(&p, "abcdefghijklmnopq", ""), Vec::<&str>::new());
        assert_eq!(codes(&p, "blue-Horse-42", ""), vec!["too_short"]);
        assert_eq!(codes(&p, "14characterss!", ""), vec!["too_short"]);
        assert_eq!(codes(&p, "15characterss!!", ""), Vec::<&str>::new());
        assert_eq!(
            codes(&p, "anasmith-longpassphrase", "anasmith@example.com"),
            vec!["contains_email"]
        );
    }

    #[test]
    fn from_name_picks_presets() {
        assert_eq!(
            PasswordPolicy::from_name("default"),
            Some(PasswordPolicy::default_rule())
        );
        assert_eq!(
            PasswordPolicy::from_name("nist"),
            Some(PasswordPolicy::nist())
        );
        assert_eq!(PasswordPolicy::from_name("NIST"), None);
        assert_eq!(PasswordPolicy::from_name(""), None);
    }

    #[test]
    fn long_passphrases_ok_huge_inputs_rejected() {
        for p in [PasswordPolicy::default_rule(), PasswordPolicy::nist()] {
            let phrase = "the quick brown fox jumps over the lazy dog, then naps in sunlight";
            assert!(phrase.chars().count() >= 64);
            assert_eq!(codes(&p, phrase, ""), Vec::<&str>::new());
            assert_eq!(codes(&p, &"x!".repeat(128), ""), Vec::<&str>::new()); // 256 chars
            assert_eq!(codes(&p, &"x!".repeat(1000), ""), vec!["too_long"]); // 2000 bytes
            assert_eq!(
                codes(&p, &format!("{}!", "y".repeat(256)), ""),
                vec!["too_long"]
            );
            // 256 four-byte characters are exactly 1024 bytes: both limits hold.
            assert_eq!(codes(&p, &"😀".repeat(256), ""), Vec::<&str>::new());
            assert_eq!(codes(&p, &"😀".repeat(257), ""), vec!["too_long"]);
        }
        // With a larger character limit, the byte limit still caps the hashing work.
        let loose = PasswordPolicy {
            max_chars: 10_000,
            ..PasswordPolicy::nist()
        };
        assert_eq!(codes(&loose, &"😀".repeat(300), ""), vec!["too_long"]);
        assert_eq!(codes(&loose, &"a!".repeat(400), ""), Vec::<&str>::new());
    }

    #[test]
    fn email_containment_is_case_insensitive() {
        let p = PasswordPolicy::default_rule();
        let email = "Ana.Smith@Example.com";
        assert_eq!(
            codes(&p, "x!ana.smith@example.comx", email),
            vec!["contains_email"]
        );
        assert_eq!(
            codes(&p, "my-ANA.SMITH-pass", email),
            vec!["contains_email"]
        );
        assert_eq!(codes(&p, "my-ana-pass!", email), Vec::<&str>::new());
        // A local part shorter than 3 characters is not checked on its own…
        assert_eq!(
            codes(&p, "jojo-rabbit!", "jo@example.com"),
            Vec::<&str>::new()
        );
        // …but the whole address still is.
        assert_eq!(
            codes(&p, "jo@example.com!", "jo@example.com"),
            vec!["contains_email"]
        );
        assert_eq!(codes(&p, "abc-defg-hij", ""), Vec::<&str>::new());
    }

    #[test]
    fn blocklist_is_large_and_case_insensitive() {
        assert!(common_password_count() >= 10_000);
        assert!(is_common_password("password"));
        assert!(is_common_password("PassWord"));
        assert!(is_common_password("123456"));
        assert!(!is_common_password("blue-Horse-42-stapler"));
        let p = PasswordPolicy::default_rule();
        assert_eq!(codes(&p, "P@ssw0rd", ""), vec!["too_common"]);
        assert_eq!(
            codes(&p, "PASSWORD", ""),
            vec!["needs_special_character", "too_common"]
        );
        let nist = PasswordPolicy::nist();
        assert_eq!(codes(&nist, "Q1W2E3R4T5Y6U7I8O9P0", ""), vec!["too_common"]);
        assert_eq!(codes(&nist, "qazwsxedcrfvtgb", ""), vec!["too_common"]);
    }

    #[test]
    fn every_list_entry_is_lowercase_and_trimmed() {
        for line in COMMON_PASSWORDS.lines() {
            assert_eq!(line, line.trim());
            assert_eq!(line, line.to_lowercase());
            assert!(!line.is_empty());
        }
    }

    #[test]
    fn messages_never_echo_the_password() {
        let secret = "ana.smith!";
        let err = PasswordPolicy::nist()
            .check(secret, "ana.smith@example.com")
            .unwrap_err();
        assert_eq!(err.codes(), vec!["too_short", "contains_email"]);
        let text = format!("{err} {err:?}");
        assert!(!text.contains(secret));
        assert!(text.contains("at least 15 characters"));
    }

    #[test]
    fn hash_and_verify() {
        let hasher = PasswordHasher::new();
        let phc = hasher.hash_password("blue-Horse-42").unwrap();
        assert!(phc.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{phc}");
        assert!(hasher.verify_password(&phc, "blue-Horse-42"));
        assert!(!hasher.verify_password(&phc, "blue-horse-42"));
        assert!(!hasher.verify_password(&phc, ""));
        // Salted: the same password hashes differently each time.
        assert_ne!(phc, hasher.hash_password("blue-Horse-42").unwrap());
        assert!(!hasher.needs_rehash(&phc));
    }

    #[test]
    fn unicode_is_normalized_before_hashing() {
        let hasher = PasswordHasher::new();
        let composed = "caf\u{e9}-au-lait!";
        let decomposed = "cafe\u{301}-au-lait!";
        let phc = hasher.hash_password(composed).unwrap();
        assert!(hasher.verify_password(&phc, decomposed));
    }

    #[test]
    fn malformed_hashes_never_verify() {
        let hasher = PasswordHasher::new();
        for phc in [
            "",
            "not a hash",
            "$argon2id$",
            "$argon2id$v=19$m=19456,t=2,p=1$",
            "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$!!!",
            "$2b$12$abcdefghijklmnopqrstuu0123456789012345678901234567890",
        ] {
            assert!(!hasher.verify_password(phc, "password"), "{phc}");
            assert!(hasher.needs_rehash(phc), "{phc}");
        }
        let phc = hasher.hash_password("x").unwrap();
        assert!(!hasher.verify_password(&phc, &"x".repeat(MAX_PASSWORD_BYTES + 1)));
    }

    #[test]
    fn weaker_parameters_need_rehash() {
        let weak = Argon2::new(
            Algorithm::Argon2id,
            Version::V0x13,
            Params::new(8, 1, 1, None).unwrap(),
        );
        let salt = SaltString::encode_b64(b"0123456789abcdef").unwrap();
        let phc = weak.hash_password(b"pw", &salt).unwrap().to_string();
        let hasher = PasswordHasher::new();
        assert!(hasher.verify_password(&phc, "pw"));
        assert!(hasher.needs_rehash(&phc));
    }

    #[test]
    fn dummy_verify_runs() {
        let hasher = PasswordHasher::new();
        hasher.dummy_verify("whatever");
        hasher.dummy_verify("");
        dummy_verify("x");
    }

    #[test]
    fn free_functions_use_the_standard_hasher() {
        let phc = hash_password("blue-Horse-42").unwrap();
        assert!(verify_password(&phc, "blue-Horse-42"));
        assert!(PasswordHasher::new().verify_password(&phc, "blue-Horse-42"));
        assert!(!verify_password(&phc, "nope"));
        assert!(!needs_rehash(&phc));
    }
}
