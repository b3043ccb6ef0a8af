//! Opaque bearer secrets of the login flow. Refresh tokens are long-lived and must be revocable,
//! so they are random strings looked up by hash rather than JWTs; stream tickets are short-lived
//! single-use secrets for the SSE endpoint, where browsers cannot send an `Authorization` header.
//! Both follow `nexus_domain::secret`: a scanner-friendly prefix, 256 random bits, only the
//! SHA-256 stored, and a redacted `Debug`.

use std::fmt;

use nexus_domain::secret::{SecretHash, random_secret};

/// base64url characters of 32 random bytes, unpadded.
const BODY_LEN: usize = 43;

fn well_formed(raw: &str, prefix: &str) -> bool {
    raw.strip_prefix(prefix).is_some_and(|body| {
        body.len() == BODY_LEN
            && body
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    })
}

macro_rules! opaque_token {
    ($(#[$doc:meta])* $name:ident, $prefix:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq)]
        pub struct $name(String);

        impl $name {
            pub const PREFIX: &'static str = $prefix;

            pub fn generate() -> Self {
                Self(random_secret(Self::PREFIX))
            }

            /// Wraps a presented token after checking its shape (prefix, length, charset), so
            /// garbage is rejected before it is hashed or looked up.
            pub fn from_presented(raw: &str) -> Option<Self> {
                well_formed(raw, Self::PREFIX).then(|| Self(raw.to_owned()))
            }

            /// The secret itself, to hand to its owner once.
            pub fn expose(&self) -> &str {
                &self.0
            }

            /// The only form that is stored.
            pub fn hash(&self) -> SecretHash {
                SecretHash::of(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(concat!(stringify!($name), "(", $prefix, "…redacted)"))
            }
        }
    };
}

opaque_token!(
    /// A refresh token (`nxr_…`): exchanged, and rotated, for a new access token.
    RefreshToken,
    "nxr_"
);

opaque_token!(
    /// A stream ticket (`nxt_…`): a short-lived, single-use credential for opening an event stream.
    StreamTicket,
    "nxt_"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refresh_token_shape_and_hash() {
        let t = RefreshToken::generate();
        assert!(t.expose().starts_with("nxr_"));
        assert_eq!(t.expose().len(), 4 + 43);
        assert_eq!(RefreshToken::from_presented(t.expose()), Some(t.clone()));
        assert!(t.hash().matches(&SecretHash::of(t.expose())));
        assert!(!t.hash().matches(&RefreshToken::generate().hash()));
        let debug = format!("{t:?}");
        assert_eq!(debug, "RefreshToken(nxr_…redacted)");
        assert!(!debug.contains(&t.expose()[4..]));
    }

    #[test]
    fn stream_ticket_shape() {
        let t = StreamTicket::generate();
        assert!(t.expose().starts_with("nxt_"));
        assert_eq!(StreamTicket::from_presented(t.expose()), Some(t.clone()));
        assert_eq!(format!("{t:?}"), "StreamTicket(nxt_…redacted)");
    }

    #[test]
    fn prefixes_are_not_interchangeable() {
        let r = RefreshToken::generate();
        let t = StreamTicket::generate();
        assert!(StreamTicket::from_presented(r.expose()).is_none());
        assert!(RefreshToken::from_presented(t.expose()).is_none());
    }

    #[test]
    fn malformed_presented_tokens_rejected() {
        let body = "A".repeat(43);
        assert!(RefreshToken::from_presented(&format!("nxr_{body}")).is_some());
        for bad in [
            String::new(),
            "nxr_".into(),
            "nxr_short".into(),
            body.clone(),
            format!("NXR_{body}"),
            format!("nxr_{body}A"),
            format!("nxr_{}", &body[1..]),
            format!("nxr_{}=", &body[1..]),
            format!("nxr_{}+", &body[1..]),
            format!("nxr_{}é", &body[2..]),
            format!(" nxr_{body}"),
        ] {
            assert!(RefreshToken::from_presented(&bad).is_none(), "{bad}");
        }
    }
}
