//! Second factor: RFC 6238 TOTP (SHA-1, 6 digits, 30 s — the only parameters every authenticator
//! app supports) plus single-use recovery codes for a lost phone. Replay protection needs state,
//! so `verify` returns the matched time step and storage refuses a step ≤ the last accepted one.

use std::fmt;

use nexus_domain::secret::SecretHash;
use qrcode::QrCode;
use qrcode::render::svg;
use rand::RngCore;
use subtle::ConstantTimeEq;
use totp_rs::{Algorithm, Secret, TOTP};

pub const DIGITS: usize = 6;
pub const STEP_SECS: u64 = 30;
/// RFC 4226 recommends 160-bit shared secrets.
const SECRET_BYTES: usize = 20;
/// RFC 4226 requires at least 128 bits; shorter stored secrets are refused.
const MIN_SECRET_BYTES: usize = 16;

/// A stored TOTP secret that is not base32 of at least 128 bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("invalid TOTP secret")]
pub struct InvalidTotpSecret;

/// The data does not fit in a QR code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("too long for a QR code")]
pub struct QrTooLong;

/// The shared TOTP secret. Stored as base32 (the form authenticator apps take); `Debug` is
/// redacted. Encrypting it at rest is the storage layer's concern.
#[derive(Clone, PartialEq, Eq)]
pub struct TotpSecret(Vec<u8>);

impl fmt::Debug for TotpSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TotpSecret(…redacted)")
    }
}

impl TotpSecret {
    /// 160 random bits.
    pub fn generate() -> Self {
        let mut bytes = vec![0u8; SECRET_BYTES];
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        Self(bytes)
    }

    /// RFC 4648 base32 without padding, e.g. `JBSWY3DPEHPK3PXP…` (32 characters).
    pub fn as_base32(&self) -> String {
        match Secret::Raw(self.0.clone()).to_encoded() {
            Secret::Encoded(text) => text,
            Secret::Raw(_) => String::new(), // to_encoded always returns Encoded
        }
    }

    /// Parses stored (or user-typed) base32: case, spaces and padding are ignored. Fails if it is
    /// not base32 or shorter than 128 bits.
    pub fn from_base32(text: &str) -> Result<Self, InvalidTotpSecret> {
        let cleaned: String = text
            .chars()
            .filter(|c| !c.is_whitespace() && *c != '=')
            .map(|c| c.to_ascii_uppercase())
            .collect();
        if cleaned.is_empty()
            || !cleaned
                .bytes()
                .all(|b| matches!(b, b'A'..=b'Z' | b'2'..=b'7'))
        {
            return Err(InvalidTotpSecret);
        }
        let bytes = Secret::Encoded(cleaned)
            .to_bytes()
            .map_err(|_| InvalidTotpSecret)?;
        if bytes.len() < MIN_SECRET_BYTES {
            return Err(InvalidTotpSecret);
        }
        Ok(Self(bytes))
    }

    fn totp(&self) -> TOTP {
        // Unchecked: the length was checked when the secret was made or parsed. Skew is handled
        // by `verify`, which needs to know which step matched.
        TOTP::new_unchecked(Algorithm::SHA1, DIGITS, 0, STEP_SECS, self.0.clone())
    }

    /// The code for the step containing `unix_secs` (for tests and enrolment checks).
    pub fn code_at(&self, unix_secs: u64) -> String {
        self.totp().generate(unix_secs)
    }
}

/// The `otpauth://` URI authenticator apps enrol from (Google Authenticator "Key Uri Format").
pub fn otpauth_uri(secret: &TotpSecret, issuer: &str, account: &str) -> String {
    let issuer = percent_encode(issuer);
    format!(
        "otpauth://totp/{issuer}:{}?secret={}&issuer={issuer}&algorithm=SHA1&digits={DIGITS}&period={STEP_SECS}",
        percent_encode(account),
        secret.as_base32(),
    )
}

/// Encodes everything but RFC 3986 unreserved characters, so `:`, `@`, `&`, spaces and non-ASCII
/// in issuer or account cannot break the label or the query.
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The URI as a QR code, as an inline `<svg …>…</svg>` document (no XML prologue, so it can be
/// embedded in HTML as is). Fails only if the URI is too long for a QR code.
pub fn qr_svg(uri: &str) -> Result<String, QrTooLong> {
    let code = QrCode::new(uri.as_bytes()).map_err(|_| QrTooLong)?;
    let image = code
        .render::<svg::Color>()
        .min_dimensions(240, 240)
        .quiet_zone(true)
        .build();
    let start = image.find("<svg").unwrap_or(0);
    Ok(image[start..].to_owned())
}

/// Checks a 6-digit code against the current step and one step either side (clock drift and
/// typing time). Returns the matched time step (`unix / 30`); the caller must reject it unless it
/// is greater than the last accepted step, which makes each code single-use. Input must be
/// exactly six ASCII digits (surrounding whitespace is ignored). Every candidate is compared in
/// constant time and all three are always compared.
pub fn verify(secret: &TotpSecret, code: &str, now_unix_secs: u64) -> Option<u64> {
    let code = code.trim();
    if code.len() != DIGITS || !code.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let totp = secret.totp();
    let current = now_unix_secs / STEP_SECS;
    let mut matched = None;
    for step in [
        current.checked_sub(1),
        Some(current),
        current.checked_add(1),
    ]
    .into_iter()
    .flatten()
    {
        let Some(at) = step.checked_mul(STEP_SECS) else {
            continue;
        };
        let candidate = totp.generate(at);
        if bool::from(candidate.as_bytes().ct_eq(code.as_bytes())) {
            // On a (one-in-a-million) collision the latest step wins: the stricter for replay.
            matched = Some(step);
        }
    }
    matched
}

/// How many recovery codes a user gets.
pub const RECOVERY_CODE_COUNT: usize = 10;
/// Crockford's base32 alphabet, lowercase: no `i`, `l`, `o`, `u`, so nothing is ambiguous once
/// `o`→`0` and `i`/`l`→`1` are folded on input. 12 characters × 5 bits = 60 bits per code.
const RECOVERY_ALPHABET: &[u8; 32] = b"0123456789abcdefghjkmnpqrstvwxyz";
const RECOVERY_CHARS: usize = 12;

/// Ten fresh single-use recovery codes like `7kq2-m9vd-x4tb`. Show them once; store only
/// `recovery_code_hash` of each.
pub fn generate_recovery_codes() -> Vec<String> {
    (0..RECOVERY_CODE_COUNT)
        .map(|_| generate_recovery_code())
        .collect()
}

fn generate_recovery_code() -> String {
    let bits = rand::rngs::OsRng.next_u64();
    let chars: Vec<u8> = (0..RECOVERY_CHARS)
        .map(|i| RECOVERY_ALPHABET[((bits >> (5 * i)) & 0x1f) as usize])
        .collect();
    format_recovery(&chars)
}

fn format_recovery(chars: &[u8]) -> String {
    chars
        .chunks(4)
        .map(|group| group.iter().map(|&b| char::from(b)).collect::<String>())
        .collect::<Vec<_>>()
        .join("-")
}

/// The canonical form (`xxxx-xxxx-xxxx`, lowercase) of a typed recovery code: case-insensitive,
/// dashes and spaces optional, `o`/`i`/`l` read as `0`/`1`/`1`. `None` if it cannot be one.
pub fn normalize_recovery_code(input: &str) -> Option<String> {
    if input.len() > 64 {
        return None;
    }
    let mut chars = Vec::with_capacity(RECOVERY_CHARS);
    for c in input.chars() {
        if c == '-' || c.is_whitespace() {
            continue;
        }
        let c = match c.to_ascii_lowercase() {
            'o' => '0',
            'i' | 'l' => '1',
            c => c,
        };
        let b = u8::try_from(c).ok()?;
        if !RECOVERY_ALPHABET.contains(&b) {
            return None;
        }
        chars.push(b);
    }
    (chars.len() == RECOVERY_CHARS).then(|| format_recovery(&chars))
}

/// The stored form of a recovery code: SHA-256 of its canonical form. A fast hash is enough: 60
/// random bits cannot be brute-forced through a throttled login, nor offline in useful time for
/// ten single-use codes. `None` for input that is not a recovery code.
pub fn recovery_code_hash(input: &str) -> Option<SecretHash> {
    normalize_recovery_code(input).map(|code| SecretHash::of(&code))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 6238 appendix B: the SHA-1 seed is ASCII "12345678901234567890".
    fn rfc_secret() -> TotpSecret {
        TotpSecret(b"12345678901234567890".to_vec())
    }

    #[test]
    fn rfc6238_test_vectors() {
        let eight = TOTP::new(Algorithm::SHA1, 8, 0, 30, b"12345678901234567890".to_vec()).unwrap();
        assert_eq!(eight.generate(59), "94287082");
        assert_eq!(eight.generate(1_111_111_109), "07081804");
        assert_eq!(eight.generate(2_000_000_000), "69279037");
        let s = rfc_secret();
        assert_eq!(s.code_at(59), "287082");
        assert_eq!(s.code_at(1_111_111_109), "081804");
        assert_eq!(verify(&s, "287082", 59), Some(1));
    }

    #[test]
    fn window_is_one_step_each_side() {
        let s = TotpSecret::generate();
        let now = 1_750_000_015; // step 58_333_333
        let step = now / STEP_SECS;
        assert_eq!(verify(&s, &s.code_at(now), now), Some(step));
        assert_eq!(verify(&s, &s.code_at(now - 30), now), Some(step - 1));
        assert_eq!(verify(&s, &s.code_at(now + 30), now), Some(step + 1));
        let far = [s.code_at(now - 60), s.code_at(now + 60)];
        for code in far {
            if [now - 30, now, now + 30]
                .iter()
                .all(|&t| s.code_at(t) != code)
            {
                assert_eq!(verify(&s, &code, now), None);
            }
        }
        assert_eq!(
            verify(&s, &format!(" {} ", s.code_at(now)), now),
            Some(step)
        );
    }

    #[test]
    fn step_zero_does_not_underflow() {
        let s = rfc_secret();
        assert_eq!(verify(&s, &s.code_at(0), 0), Some(0));
        assert_eq!(verify(&s, &s.code_at(30), 0), Some(1));
    }

    #[test]
    fn bad_input_rejected() {
        let s = rfc_secret();
        for code in [
            "",
            "28708",
            "2870822",
            "28708a",
            "287 082",
            "２８７０８２",
            "+287082",
            "94287082",
        ] {
            assert_eq!(verify(&s, code, 59), None, "{code}");
        }
        assert_eq!(verify(&TotpSecret::generate(), "287082", 59), None);
    }

    #[test]
    fn base32_roundtrip() {
        let s = TotpSecret::generate();
        let text = s.as_base32();
        assert_eq!(text.len(), 32);
        assert_eq!(TotpSecret::from_base32(&text), Ok(s.clone()));
        assert_eq!(TotpSecret::from_base32(&text.to_lowercase()), Ok(s.clone()));
        let spaced: String = text
            .as_bytes()
            .chunks(4)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect::<Vec<_>>()
            .join(" ");
        assert_eq!(TotpSecret::from_base32(&spaced), Ok(s.clone()));
        assert_eq!(rfc_secret().as_base32(), "GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ");
        assert_eq!(
            TotpSecret::from_base32("GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ"),
            Ok(rfc_secret())
        );
        assert_eq!(TotpSecret::from_base32(""), Err(InvalidTotpSecret));
        assert_eq!(
            TotpSecret::from_base32("JBSWY3DPEHPK3PXP"),
            Err(InvalidTotpSecret),
            "80 bits is too short"
        );
        assert_eq!(
            TotpSecret::from_base32("GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJ1"),
            Err(InvalidTotpSecret)
        );
        assert!(!format!("{s:?}").contains(&text));
    }

    #[test]
    fn otpauth_uri_and_qr() {
        let s = rfc_secret();
        let uri = otpauth_uri(&s, "NEXUS", "ana+2fa@example.com");
        assert_eq!(
            uri,
            "otpauth://totp/NEXUS:ana%2B2fa%40example.com?secret=GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ\
             &issuer=NEXUS&algorithm=SHA1&digits=6&period=30"
        );
        assert!(otpauth_uri(&s, "A&B", "x:y z").starts_with("otpauth://totp/A%26B:x%3Ay%20z?"));
        let svg = qr_svg(&uri).unwrap();
        assert!(
            svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""),
            "{svg}"
        );
        assert!(svg.ends_with("</svg>"));
        assert_eq!(qr_svg(&"x".repeat(5000)), Err(QrTooLong));
    }

    #[test]
    fn recovery_codes_shape() {
        let codes = generate_recovery_codes();
        assert_eq!(codes.len(), RECOVERY_CODE_COUNT);
        let unique: std::collections::HashSet<_> = codes.iter().collect();
        assert_eq!(unique.len(), codes.len());
        for code in &codes {
            assert_eq!(code.len(), 14, "{code}");
            let groups: Vec<&str> = code.split('-').collect();
            assert_eq!(groups.len(), 3);
            assert!(groups.iter().all(|g| g.len() == 4));
            assert!(
                code.bytes()
                    .all(|b| b == b'-' || RECOVERY_ALPHABET.contains(&b))
            );
            assert_eq!(
                normalize_recovery_code(code).as_deref(),
                Some(code.as_str())
            );
        }
    }

    #[test]
    fn recovery_code_normalization() {
        let canonical = Some("7kq2-m9vd-x4tb".to_owned());
        assert_eq!(normalize_recovery_code("7kq2-m9vd-x4tb"), canonical);
        assert_eq!(normalize_recovery_code("7KQ2M9VDX4TB"), canonical);
        assert_eq!(normalize_recovery_code(" 7kq2 m9vd x4tb "), canonical);
        assert_eq!(normalize_recovery_code("7kq-2m9-vdx-4tb"), canonical);
        assert_eq!(
            normalize_recovery_code("0o1i-l000-1111"),
            Some("0011-1000-1111".to_owned())
        );
        assert_eq!(normalize_recovery_code("7kq2-m9vd-x4t"), None);
        assert_eq!(normalize_recovery_code("7kq2-m9vd-x4tbb"), None);
        assert_eq!(normalize_recovery_code("7kq2-m9vd-x4tu"), None);
        assert_eq!(normalize_recovery_code("7kq2-m9vd-x4té"), None);
        assert_eq!(normalize_recovery_code(""), None);
        assert_eq!(normalize_recovery_code(&"-".repeat(100)), None);
        let hash = recovery_code_hash("7KQ2 M9VD X4TB").unwrap();
        assert!(hash.matches(&SecretHash::of("7kq2-m9vd-x4tb")));
        assert!(recovery_code_hash("nope").is_none());
    }
}
