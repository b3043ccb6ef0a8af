//! The AgentReport wire contract (DESIGN.md §4), kept compatible with NEXUS v2 clients.
//!
//! Validation is strict on types and enums (422, never coerced) but unknown extra fields are kept.
//! We get both by validating with a typed struct (which ignores unknown keys and gives precise
//! error paths) and storing the original JSON with the typed defaults merged in. Serde's
//! `#[serde(flatten)]` would keep extras too, but it buffers input and loses the error path below
//! the flattened struct, and naming the field is part of the contract.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::ToSchema;

use crate::ids::{EventId, SessionId};
use crate::tenant::TenantId;
use crate::validation::{FieldError, ValidationErrors, serde_error_field};

/// Upper bound for one free-text field; the request limit (1 MiB) bounds the whole.
const MAX_TEXT: usize = 64 * 1024;
const MAX_ID: usize = 128;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ApprovalLevel {
    #[default]
    Green,
    Yellow,
    Red,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum AskType {
    #[default]
    Confirm,
    Choice,
    Input,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum RiskLevel {
    #[default]
    Low,
    Medium,
    High,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Surface {
    #[default]
    Chat,
    Dashboard,
    Sidecar,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ActionStyle {
    #[default]
    Primary,
    Secondary,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct Causality {
    pub correlation_id: String,
    pub command_id: Option<String>,
    pub ask_id: Option<String>,
    #[serde(rename = "type")]
    pub kind: String,
}

impl Default for Causality {
    fn default() -> Self {
        Self {
            correlation_id: String::new(),
            command_id: None,
            ask_id: None,
            kind: "device.exec".to_owned(),
        }
    }
}

fn default_mode() -> String {
    "focused".to_owned()
}
fn default_confidence() -> f64 {
    0.7
}
fn default_session() -> String {
    "s1".to_owned()
}
fn default_user() -> String {
    "u".to_owned()
}
fn default_persona() -> String {
    "seria.istj".to_owned()
}
fn default_skin() -> String {
    "seria.default".to_owned()
}

/// `meta`. `event_id` and `tenant` are absent on purpose: the server sets them and ignores
/// whatever a client sent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ReportMeta {
    #[serde(default = "default_mode")]
    pub mode: String,
    #[serde(default)]
    pub approval_level: ApprovalLevel,
    #[serde(default = "default_confidence")]
    pub confidence: f64,
    pub report_id: String,
    pub created_at: String,
    #[serde(default = "default_session")]
    pub session_id: String,
    #[serde(default = "default_user")]
    pub user_id: String,
    #[serde(default)]
    pub json_repaired: bool,
    #[serde(default)]
    pub causality: Causality,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct DoneItem {
    pub title: String,
    pub detail: String,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct NextItem {
    pub title: String,
    pub detail: String,
    pub owner: Option<String>,
    pub eta: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct BlockedItem {
    pub title: String,
    pub why: String,
    pub needs: String,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct AskItem {
    pub question: String,
    #[serde(rename = "type")]
    pub kind: AskType,
    pub severity: ApprovalLevel,
    pub options: Vec<String>,
    #[schema(value_type = Option<Object>)]
    pub default: Option<Value>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct RiskItem {
    pub level: RiskLevel,
    pub item: String,
    pub mitigation: String,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct UndoItem {
    pub title: String,
    pub how: String,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct UiCard {
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub body: String,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct UiAction {
    pub id: String,
    pub label: String,
    pub style: ActionStyle,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct UiHint {
    pub surface: Surface,
    pub cards: Vec<UiCard>,
    pub actions: Vec<UiAction>,
}

/// An AgentReport. Unknown extra fields are accepted and delivered unchanged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct AgentReport {
    pub meta: ReportMeta,
    #[serde(default)]
    pub done: Vec<DoneItem>,
    #[serde(default)]
    pub next: Vec<NextItem>,
    #[serde(default)]
    pub blocked: Vec<BlockedItem>,
    #[serde(default)]
    pub ask: Vec<AskItem>,
    #[serde(default)]
    pub risk: Vec<RiskItem>,
    #[serde(default)]
    pub rationale: String,
    #[serde(default)]
    pub undo: Vec<UndoItem>,
    #[serde(default)]
    pub ui_hint: UiHint,
    #[serde(default = "default_persona")]
    pub persona_id: String,
    #[serde(default = "default_skin")]
    pub skin_id: String,
}

/// A report that passed validation: the typed view plus the JSON to store and deliver
/// (typed defaults filled in, unknown fields kept).
#[derive(Debug, Clone, PartialEq)]
pub struct ValidatedReport {
    pub session_id: SessionId,
    pub report_id: String,
    pub approval_level: ApprovalLevel,
    json: Map<String, Value>,
}

impl ValidatedReport {
    /// Validates one report as received from a client.
    pub fn parse(raw: &Value) -> Result<Self, ValidationErrors> {
        if !raw.is_object() {
            return Err(ValidationErrors::single("", "must be a JSON object"));
        }
        let typed: AgentReport = serde_path_to_error::deserialize(raw).map_err(|e| {
            let path = e.path().to_string();
            let message = e.into_inner().to_string();
            ValidationErrors(vec![FieldError::new(
                serde_error_field(&path, &message),
                message,
            )])
        })?;
        check_semantics(&typed)?;
        let session_id = SessionId::parse("meta.session_id", &typed.meta.session_id)?;
        let mut json = match serde_json::to_value(&typed) {
            Ok(Value::Object(map)) => map,
            _ => return Err(ValidationErrors::single("", "could not be normalized")),
        };
        if let Value::Object(original) = raw {
            keep_unknown_fields(&mut json, original);
        }
        Ok(Self {
            session_id,
            report_id: typed.meta.report_id,
            approval_level: typed.meta.approval_level,
            json,
        })
    }

    /// Stamps the server-owned fields and renders the JSON that is stored and streamed.
    /// `meta.causality.command_id`, when the report is about a command.
    pub fn command_id(&self) -> Option<&str> {
        self.json
            .get("meta")?
            .get("causality")?
            .get("command_id")?
            .as_str()
            .filter(|id| !id.is_empty())
    }

    /// `meta.causality.type` (e.g. `command.failed`).
    pub fn causality_type(&self) -> Option<&str> {
        self.json
            .get("meta")?
            .get("causality")?
            .get("type")?
            .as_str()
    }

    /// Whether the report lists anything under `blocked`.
    pub fn has_blocked(&self) -> bool {
        self.json
            .get("blocked")
            .and_then(Value::as_array)
            .is_some_and(|b| !b.is_empty())
    }

    pub fn render(&self, tenant: &TenantId, event_id: EventId) -> String {
        let mut json = self.json.clone();
        if let Some(Value::Object(meta)) = json.get_mut("meta") {
            meta.insert("event_id".to_owned(), Value::from(event_id));
            meta.insert("tenant".to_owned(), Value::from(tenant.to_string()));
        }
        Value::Object(json).to_string()
    }
}

fn check_semantics(r: &AgentReport) -> Result<(), ValidationErrors> {
    let mut errors = Vec::new();
    let m = &r.meta;
    if !(0.0..=1.0).contains(&m.confidence) {
        errors.push(FieldError::new(
            "meta.confidence",
            "must be between 0 and 1",
        ));
    }
    for (field, value) in [
        ("meta.report_id", &m.report_id),
        ("meta.created_at", &m.created_at),
    ] {
        if value.trim().is_empty() {
            errors.push(FieldError::new(field, "must not be empty"));
        } else if value.len() > MAX_ID {
            errors.push(FieldError::new(
                field,
                format!("must be at most {MAX_ID} bytes"),
            ));
        }
    }
    if r.rationale.len() > MAX_TEXT {
        errors.push(FieldError::new(
            "rationale",
            format!("must be at most {MAX_TEXT} bytes"),
        ));
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(ValidationErrors(errors))
    }
}

/// Copies keys that the typed form does not know from `original` into `normalized`, recursing
/// into objects and into arrays of objects, so extension fields survive at every level.
fn keep_unknown_fields(normalized: &mut Map<String, Value>, original: &Map<String, Value>) {
    for (key, value) in original {
        match normalized.get_mut(key) {
            None => {
                normalized.insert(key.clone(), value.clone());
            }
            Some(Value::Object(inner)) => {
                if let Value::Object(orig_inner) = value {
                    keep_unknown_fields(inner, orig_inner);
                }
            }
            Some(Value::Array(items)) => {
                if let Value::Array(orig_items) = value {
                    for (item, orig) in items.iter_mut().zip(orig_items) {
                        if let (Value::Object(i), Value::Object(o)) = (item, orig) {
                            keep_unknown_fields(i, o);
                        }
                    }
                }
            }
            Some(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn tenant() -> TenantId {
        TenantId::parse("acme", "p1").unwrap()
    }

    #[test]
    fn minimal_report_gets_defaults_and_server_fields() {
        let raw = json!({"meta": {"report_id": "r_1", "created_at": "2026-02-03T10:00:00+0900", "tenant": "evil:x", "event_id": 99}});
        let r = ValidatedReport::parse(&raw).unwrap();
        let out: Value = serde_json::from_str(&r.render(&tenant(), 7)).unwrap();
        assert_eq!(out["meta"]["event_id"], 7);
        assert_eq!(out["meta"]["tenant"], "acme:p1");
        assert_eq!(out["meta"]["session_id"], "s1");
        assert_eq!(out["meta"]["approval_level"], "green");
        assert_eq!(out["meta"]["confidence"], 0.7);
        assert_eq!(out["meta"]["causality"]["type"], "device.exec");
        assert_eq!(out["done"], json!([]));
        assert_eq!(out["ui_hint"]["surface"], "chat");
        assert_eq!(out["persona_id"], "seria.istj");
    }

    #[test]
    fn unknown_fields_kept_at_every_level() {
        let raw = json!({
            "meta": {"report_id": "r", "created_at": "t", "x_meta": 1},
            "done": [{"title": "a", "x_item": true}],
            "ui_hint": {"x_hint": "h"},
            "x_top": {"nested": [1, 2]}
        });
        let out: Value =
            serde_json::from_str(&ValidatedReport::parse(&raw).unwrap().render(&tenant(), 1))
                .unwrap();
        assert_eq!(out["meta"]["x_meta"], 1);
        assert_eq!(out["done"][0]["x_item"], true);
        assert_eq!(out["done"][0]["detail"], "");
        assert_eq!(out["ui_hint"]["x_hint"], "h");
        assert_eq!(out["x_top"]["nested"], json!([1, 2]));
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (json!({"meta": {"created_at": "t"}}), "meta.report_id"),
            (json!({}), "meta"),
            (
                json!({"meta": {"report_id": "r", "created_at": "t", "approval_level": "purple"}}),
                "meta.approval_level",
            ),
            (
                json!({"meta": {"report_id": "r", "created_at": "t", "confidence": "high"}}),
                "meta.confidence",
            ),
            (
                json!({"meta": {"report_id": "r", "created_at": "t", "confidence": 1.5}}),
                "meta.confidence",
            ),
            (
                json!({"meta": {"report_id": "r", "created_at": "t"}, "risk": [{"level": "extreme"}]}),
                "risk[0].level",
            ),
            (
                json!({"meta": {"report_id": "r", "created_at": "t"}, "ask": [{}, {"options": [1]}]}),
                "ask[1].options[0]",
            ),
            (
                json!({"meta": {"report_id": "", "created_at": "t"}}),
                "meta.report_id",
            ),
            (
                json!({"meta": {"report_id": "r", "created_at": "t", "session_id": "a b"}}),
                "meta.session_id",
            ),
            (
                json!({"meta": {"report_id": "r", "created_at": "t"}, "done": "x"}),
                "done",
            ),
        ];
        for (raw, field) in cases {
            let err = ValidatedReport::parse(&raw).unwrap_err();
            assert_eq!(err.0[0].field, field, "{raw} -> {err}");
        }
        assert_eq!(
            ValidatedReport::parse(&json!([1])).unwrap_err().0[0].field,
            ""
        );
    }
}
