//! Opaque identifiers with a readable type prefix (DESIGN.md §6), and the per-session event id.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::validation::{ValidationErrors, check_token_chars};

macro_rules! prefixed_id {
    ($(#[$doc:meta])* $name:ident, $prefix:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            pub const PREFIX: &'static str = $prefix;

            /// A fresh id: the prefix plus a lowercase ULID (time-ordered, 80 random bits).
            pub fn generate() -> Self {
                Self(format!("{}{}", $prefix, ulid::Ulid::new().to_string().to_ascii_lowercase()))
            }

            /// Accepts only ids of this type; anything else cannot name one of our objects.
            pub fn parse(field: &str, raw: &str) -> Result<Self, $crate::validation::ValidationErrors> {
                $crate::validation::check_token_chars(field, raw, 64, |c| c.is_ascii_alphanumeric() || c == '_')?;
                if !raw.starts_with($prefix) {
                    return Err($crate::validation::ValidationErrors::single(field, concat!("must start with ", $prefix)));
                }
                Ok(Self(raw.to_owned()))
            }

            /// For values read back from our own store.
            pub fn from_trusted(raw: String) -> Self {
                Self(raw)
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

pub(crate) use prefixed_id;

prefixed_id!(
    /// A paired device.
    DeviceId, "dev_"
);
prefixed_id!(
    /// A pairing attempt (start → confirm → complete).
    PairingId, "pair_"
);
prefixed_id!(
    /// A command queued for a device.
    CommandId, "cmd_"
);

/// A session is named by its clients (`meta.session_id`), so it is validated, not generated.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SessionId(String);

impl SessionId {
    pub const MAX_LEN: usize = 128;

    pub fn parse(field: &str, raw: &str) -> Result<Self, ValidationErrors> {
        check_token_chars(field, raw, Self::MAX_LEN, |c| {
            c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':' | '@')
        })?;
        Ok(Self(raw.to_owned()))
    }

    pub fn from_trusted(raw: String) -> Self {
        Self(raw)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Position of an event in its (tenant, session) stream: 1, 2, 3, … with no gaps.
/// 0 means "before the first event".
pub type EventId = u64;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_parse_back() {
        let id = DeviceId::generate();
        assert!(id.as_str().starts_with("dev_"));
        assert_eq!(DeviceId::parse("id", id.as_str()).unwrap(), id);
    }

    #[test]
    fn wrong_prefix_or_chars_rejected() {
        assert!(DeviceId::parse("id", "cmd_123").is_err());
        assert!(DeviceId::parse("id", "dev_12/3").is_err());
        assert!(SessionId::parse("s", "a b").is_err());
        assert!(SessionId::parse("s", "sess-1:x").is_ok());
    }
}
