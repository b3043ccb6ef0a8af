//! Field-level validation errors, collected so a client learns every problem in one answer.

use serde::{Deserialize, Serialize};

/// One rejected field, named by its JSON path (`reports[3].meta.approval_level`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// A non-empty list of field errors.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("validation failed: {}", summarize(.0))]
pub struct ValidationErrors(pub Vec<FieldError>);

fn summarize(errors: &[FieldError]) -> String {
    errors
        .iter()
        .map(|e| format!("{}: {}", e.field, e.message))
        .collect::<Vec<_>>()
        .join("; ")
}

impl ValidationErrors {
    pub fn single(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self(vec![FieldError::new(field, message)])
    }

    /// Prefixes every field path, e.g. to place a report's errors under `reports[3]`.
    pub fn prefixed(self, prefix: &str) -> Self {
        Self(
            self.0
                .into_iter()
                .map(|e| FieldError {
                    field: if e.field.is_empty() {
                        prefix.to_owned()
                    } else {
                        format!("{prefix}.{}", e.field)
                    },
                    message: e.message,
                })
                .collect(),
        )
    }
}

/// Checks that `value` is 1..=max characters drawn from `allowed`.
pub fn check_token_chars(
    field: &str,
    value: &str,
    max: usize,
    allowed: impl Fn(char) -> bool,
) -> Result<(), ValidationErrors> {
    if value.is_empty() {
        return Err(ValidationErrors::single(field, "must not be empty"));
    }
    if value.chars().count() > max {
        return Err(ValidationErrors::single(
            field,
            format!("must be at most {max} characters"),
        ));
    }
    if let Some(bad) = value.chars().find(|c| !allowed(*c)) {
        return Err(ValidationErrors::single(
            field,
            format!("contains a character that is not allowed: {bad:?}"),
        ));
    }
    Ok(())
}

/// The field a serde (`serde_path_to_error`) error is about, as a JSON path. serde reports a
/// missing field at its parent's path; this names the missing field itself.
pub fn serde_error_field(path: &str, message: &str) -> String {
    let parent = if path == "." { "" } else { path };
    let missing = message
        .strip_prefix("missing field `")
        .and_then(|rest| rest.split('`').next());
    match (parent, missing) {
        ("", Some(name)) => name.to_owned(),
        (p, Some(name)) => format!("{p}.{name}"),
        (p, None) => p.to_owned(),
    }
}
