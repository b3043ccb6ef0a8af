//! A tenant is `org_id:project_id` (DESIGN.md §3). Parsing happens once, at the edge.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::validation::{ValidationErrors, check_token_chars};

const MAX_PART_LEN: usize = 64;

fn allowed(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')
}

/// A validated tenant. Its parts never contain `:`, so the joined form is unambiguous.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TenantId {
    org: String,
    project: String,
}

impl TenantId {
    pub fn parse(org: &str, project: &str) -> Result<Self, ValidationErrors> {
        let mut errors = Vec::new();
        if let Err(e) = check_token_chars("x-org-id", org, MAX_PART_LEN, allowed) {
            errors.extend(e.0);
        }
        if let Err(e) = check_token_chars("x-project-id", project, MAX_PART_LEN, allowed) {
            errors.extend(e.0);
        }
        if !errors.is_empty() {
            return Err(ValidationErrors(errors));
        }
        Ok(Self {
            org: org.to_owned(),
            project: project.to_owned(),
        })
    }

    /// Parses the joined `org:project` form, as stored.
    pub fn parse_joined(joined: &str) -> Result<Self, ValidationErrors> {
        match joined.split_once(':') {
            Some((org, project)) => Self::parse(org, project),
            None => Err(ValidationErrors::single("tenant", "must be org:project")),
        }
    }

    /// From already validated parts (their alphabet is the tenant's).
    pub fn from_parts(org: &crate::identity::OrgId, project: &crate::identity::ProjectId) -> Self {
        Self {
            org: org.as_str().to_owned(),
            project: project.as_str().to_owned(),
        }
    }

    pub fn org(&self) -> &str {
        &self.org
    }

    pub fn project(&self) -> &str {
        &self.project
    }
}

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.org, self.project)
    }
}

impl Serialize for TenantId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for TenantId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse_joined(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_joins() {
        let t = TenantId::parse("acme", "web-1").unwrap();
        assert_eq!(t.to_string(), "acme:web-1");
        assert_eq!(TenantId::parse_joined("acme:web-1").unwrap(), t);
    }

    #[test]
    fn rejects_separator_empty_and_long_parts() {
        assert!(TenantId::parse("a:b", "c").is_err());
        assert!(TenantId::parse("", "c").is_err());
        assert!(TenantId::parse("a", &"x".repeat(65)).is_err());
        let both = TenantId::parse("", "").unwrap_err();
        assert_eq!(both.0.len(), 2);
    }
}
