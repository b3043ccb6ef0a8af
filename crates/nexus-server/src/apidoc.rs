//! Renders the OpenAPI document as the Markdown API reference in `docs/API.md`, so the reference
//! is generated from the code and cannot drift from it (a test compares the committed file).

use std::fmt::Write;

use serde_json::Value;

fn schema_name(schema: &Value) -> String {
    if let Some(r) = schema.get("$ref").and_then(Value::as_str) {
        return format!("`{}`", r.rsplit('/').next().unwrap_or(r));
    }
    if let Some(items) = schema.get("items") {
        return format!("array of {}", schema_name(items));
    }
    match schema.get("type") {
        Some(Value::String(t)) => format!("`{t}`"),
        Some(Value::Array(types)) => types
            .iter()
            .filter_map(Value::as_str)
            .map(|t| format!("`{t}`"))
            .collect::<Vec<_>>()
            .join(" or "),
        _ => "`object`".to_owned(),
    }
}

fn one_line(text: &str) -> String {
    text.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .replace('|', "\\|")
}

/// How an operation is authenticated, from its `security` requirements: a user's access token
/// (`bearer`) or a device token (`device_token`); an empty requirement means the parameters offer
/// another way (a stream ticket).
fn authentication(security: &Value) -> Option<String> {
    let requirements = security.as_array().filter(|s| !s.is_empty())?;
    let mut ways = Vec::new();
    let mut optional = false;
    for requirement in requirements {
        let Some(schemes) = requirement.as_object() else {
            continue;
        };
        optional |= schemes.is_empty();
        for scheme in schemes.keys() {
            let way = match scheme.as_str() {
                "bearer" => "user access token (`Authorization: Bearer <JWT>`)".to_owned(),
                "device_token" => "device token (`Authorization: Bearer nxd_…`)".to_owned(),
                other => format!("`{other}`"),
            };
            if !ways.contains(&way) {
                ways.push(way);
            }
        }
    }
    if ways.is_empty() {
        return None;
    }
    let mut text = ways.join(" or ");
    if optional {
        text.push_str(", or as the parameters describe");
    }
    Some(text)
}

/// Markdown for every path and method of `openapi`, in document order.
pub fn markdown(openapi: &Value) -> String {
    let mut out = String::new();
    let title = openapi["info"]["title"].as_str().unwrap_or("API");
    let _ = writeln!(out, "# {title} reference\n");
    let _ = writeln!(
        out,
        "Generated from the OpenAPI document (`nexus openapi`, served at `/openapi.json`); do not edit by hand.\n\
         Every error is `application/problem+json` (RFC 9457) with a stable `code`.\n"
    );
    let Some(paths) = openapi["paths"].as_object() else {
        return out;
    };
    for (path, item) in paths {
        let Some(methods) = item.as_object() else {
            continue;
        };
        for (method, operation) in methods {
            let _ = writeln!(out, "## `{} {path}`\n", method.to_uppercase());
            if let Some(summary) = operation["summary"].as_str() {
                let _ = writeln!(out, "{}\n", one_line(summary));
            }
            if let Some(description) = operation["description"].as_str() {
                let _ = writeln!(out, "{}\n", one_line(description));
            }
            if let Some(tag) = operation["tags"][0].as_str() {
                let _ = writeln!(out, "Tag: `{tag}`.");
            }
            if let Some(auth) = authentication(&operation["security"]) {
                let _ = writeln!(out, "Authentication: {auth}.");
            }
            let _ = writeln!(out);
            if let Some(params) = operation["parameters"].as_array().filter(|p| !p.is_empty()) {
                let _ = writeln!(
                    out,
                    "| parameter | in | required | type | description |\n|---|---|---|---|---|"
                );
                for p in params {
                    let _ = writeln!(
                        out,
                        "| `{}` | {} | {} | {} | {} |",
                        p["name"].as_str().unwrap_or(""),
                        p["in"].as_str().unwrap_or(""),
                        if p["required"].as_bool().unwrap_or(false) {
                            "yes"
                        } else {
                            "no"
                        },
                        schema_name(&p["schema"]),
                        one_line(p["description"].as_str().unwrap_or(""))
                    );
                }
                let _ = writeln!(out);
            }
            if let Some(body) = operation["requestBody"]["content"]
                .as_object()
                .and_then(|c| c.values().next())
            {
                let _ = writeln!(out, "Request body: {}\n", schema_name(&body["schema"]));
            }
            if let Some(responses) = operation["responses"].as_object() {
                let _ = writeln!(out, "| status | body | description |\n|---|---|---|");
                for (status, response) in responses {
                    let body = response["content"]
                        .as_object()
                        .and_then(|c| c.iter().next())
                        .map(|(mime, media)| match media.get("schema") {
                            Some(schema) => format!("{} ({mime})", schema_name(schema)),
                            None => format!("({mime})"),
                        })
                        .unwrap_or_default();
                    let _ = writeln!(
                        out,
                        "| {status} | {body} | {} |",
                        one_line(response["description"].as_str().unwrap_or(""))
                    );
                }
                let _ = writeln!(out);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn authentication_names_the_scheme_the_operation_takes() {
        assert_eq!(
            authentication(&json!([{"bearer": []}])).as_deref(),
            Some("user access token (`Authorization: Bearer <JWT>`)")
        );
        assert_eq!(
            authentication(&json!([{"device_token": []}])).as_deref(),
            Some("device token (`Authorization: Bearer nxd_…`)")
        );
        assert_eq!(
            authentication(&json!([{"bearer": []}, {}])).as_deref(),
            Some(
                "user access token (`Authorization: Bearer <JWT>`), or as the parameters describe"
            )
        );
        assert_eq!(authentication(&json!([])), None);
        assert_eq!(authentication(&Value::Null), None);
    }
}
