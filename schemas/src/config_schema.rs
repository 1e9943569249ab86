//! Experiment config schemas: typed fields with defaults, bounds and `required`.
//!
//! A worker validates a run's config against its experiment's schema before the run
//! starts, and publishes the schema as JSON Schema in its registration so the gateway
//! and the UI can build forms and validate too.

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FieldKind {
    Int,
    Float,
    Bool,
    String,
    /// One of a fixed set of strings.
    Enum(Vec<String>),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Field {
    pub name: String,
    pub kind: FieldKind,
    #[serde(default)]
    pub description: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
    #[serde(default)]
    pub required: bool,
}

impl Field {
    fn new(name: &str, kind: FieldKind) -> Self {
        Field {
            name: name.into(),
            kind,
            description: String::new(),
            default: None,
            min: None,
            max: None,
            required: false,
        }
    }
    pub fn int(name: &str) -> Self {
        Self::new(name, FieldKind::Int)
    }
    pub fn float(name: &str) -> Self {
        Self::new(name, FieldKind::Float)
    }
    pub fn bool(name: &str) -> Self {
        Self::new(name, FieldKind::Bool)
    }
    pub fn string(name: &str) -> Self {
        Self::new(name, FieldKind::String)
    }
    pub fn one_of(name: &str, choices: &[&str]) -> Self {
        Self::new(
            name,
            FieldKind::Enum(choices.iter().map(|s| s.to_string()).collect()),
        )
    }
    pub fn describe(mut self, text: &str) -> Self {
        self.description = text.into();
        self
    }
    pub fn default(mut self, value: impl Into<Value>) -> Self {
        self.default = Some(value.into());
        self
    }
    pub fn min(mut self, min: f64) -> Self {
        self.min = Some(min);
        self
    }
    pub fn max(mut self, max: f64) -> Self {
        self.max = Some(max);
        self
    }
    pub fn required(mut self) -> Self {
        self.required = true;
        self
    }

    fn check(&self, value: &Value) -> Result<(), String> {
        let number = match (&self.kind, value) {
            (FieldKind::Int, Value::Number(n)) if n.is_i64() || n.is_u64() => n.as_f64(),
            (FieldKind::Int, Value::Number(_)) => return Err("must be a whole number".into()),
            (FieldKind::Float, Value::Number(n)) => n.as_f64(),
            (FieldKind::Bool, Value::Bool(_)) | (FieldKind::String, Value::String(_)) => None,
            (FieldKind::Enum(choices), Value::String(s)) if choices.contains(s) => None,
            (FieldKind::Enum(choices), _) => {
                return Err(format!("must be one of {}", choices.join(", ")))
            }
            (kind, other) => {
                return Err(format!(
                    "must be {}, got {}",
                    kind_name(kind),
                    json_type(other)
                ))
            }
        };
        if let Some(n) = number {
            if let Some(min) = self.min.filter(|&min| n < min) {
                return Err(format!("must be at least {min}, got {n}"));
            }
            if let Some(max) = self.max.filter(|&max| n > max) {
                return Err(format!("must be at most {max}, got {n}"));
            }
        }
        Ok(())
    }
}

fn kind_name(kind: &FieldKind) -> &'static str {
    match kind {
        FieldKind::Int => "an integer",
        FieldKind::Float => "a number",
        FieldKind::Bool => "true or false",
        FieldKind::String => "a string",
        FieldKind::Enum(_) => "one of the listed strings",
    }
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A config that does not fit its schema, naming the field at fault.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("config field `{field}` {reason}")]
pub struct ConfigError {
    pub field: String,
    pub reason: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ConfigSchema {
    pub fields: Vec<Field>,
}

impl ConfigSchema {
    pub fn new(fields: impl IntoIterator<Item = Field>) -> Self {
        ConfigSchema {
            fields: fields.into_iter().collect(),
        }
    }

    /// Checks `config` (a JSON object, or null for "all defaults") and returns it with
    /// defaults filled in. Unknown fields, wrong types, values out of bounds and
    /// missing required fields are refused with the field's name.
    pub fn validate(&self, config: &Value) -> Result<Map<String, Value>, ConfigError> {
        let given = match config {
            Value::Null => Map::new(),
            Value::Object(map) => map.clone(),
            other => {
                return Err(ConfigError {
                    field: "(config)".into(),
                    reason: format!("must be an object, got {}", json_type(other)),
                })
            }
        };
        if let Some(unknown) = given
            .keys()
            .find(|k| !self.fields.iter().any(|f| &f.name == *k))
        {
            let known: Vec<&str> = self.fields.iter().map(|f| f.name.as_str()).collect();
            return Err(ConfigError {
                field: unknown.clone(),
                reason: format!(
                    "is not a field of this experiment (fields: {})",
                    known.join(", ")
                ),
            });
        }
        let mut out = Map::new();
        for field in &self.fields {
            let value = match given.get(&field.name).filter(|v| !v.is_null()) {
                Some(v) => v.clone(),
                None => match &field.default {
                    Some(d) => d.clone(),
                    None if field.required => {
                        return Err(ConfigError {
                            field: field.name.clone(),
                            reason: "is required".into(),
                        })
                    }
                    None => continue,
                },
            };
            field.check(&value).map_err(|reason| ConfigError {
                field: field.name.clone(),
                reason,
            })?;
            out.insert(field.name.clone(), value);
        }
        Ok(out)
    }

    /// Reads back a schema written by [`to_json_schema`](Self::to_json_schema) (the
    /// subset of JSON Schema Athanor uses), as the gateway does from the registry.
    pub fn from_json_schema(schema: &Value) -> Option<Self> {
        let properties = schema.get("properties")?.as_object()?;
        let required: Vec<&str> = schema
            .get("required")
            .and_then(Value::as_array)
            .map_or_else(Vec::new, |r| r.iter().filter_map(Value::as_str).collect());
        let mut fields = Vec::new();
        for (name, p) in properties {
            let kind = match (
                p.get("type").and_then(Value::as_str)?,
                p.get("enum").and_then(Value::as_array),
            ) {
                ("string", Some(choices)) => FieldKind::Enum(
                    choices
                        .iter()
                        .filter_map(|c| c.as_str().map(str::to_string))
                        .collect(),
                ),
                ("string", None) => FieldKind::String,
                ("integer", _) => FieldKind::Int,
                ("number", _) => FieldKind::Float,
                ("boolean", _) => FieldKind::Bool,
                _ => return None,
            };
            fields.push(Field {
                name: name.clone(),
                kind,
                description: p
                    .get("description")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string(),
                default: p.get("default").cloned(),
                min: p.get("minimum").and_then(Value::as_f64),
                max: p.get("maximum").and_then(Value::as_f64),
                required: required.contains(&name.as_str()),
            });
        }
        // In the declared order (`x-order`) where the schema gives it; the rest after.
        let order: Vec<&str> = schema
            .get("x-order")
            .and_then(Value::as_array)
            .map_or_else(Vec::new, |o| o.iter().filter_map(Value::as_str).collect());
        fields.sort_by_key(|f| {
            order
                .iter()
                .position(|n| *n == f.name)
                .unwrap_or(order.len())
        });
        Some(ConfigSchema { fields })
    }

    /// The schema as JSON Schema (draft 2020-12), as published in the worker registry.
    pub fn to_json_schema(&self) -> Value {
        let mut properties = Map::new();
        for f in &self.fields {
            let mut p = match &f.kind {
                FieldKind::Int => json!({"type": "integer"}),
                FieldKind::Float => json!({"type": "number"}),
                FieldKind::Bool => json!({"type": "boolean"}),
                FieldKind::String => json!({"type": "string"}),
                FieldKind::Enum(choices) => json!({"type": "string", "enum": choices}),
            };
            let obj = p.as_object_mut().expect("object literal");
            if !f.description.is_empty() {
                obj.insert("description".into(), f.description.clone().into());
            }
            if let Some(d) = &f.default {
                obj.insert("default".into(), d.clone());
            }
            if let Some(min) = f.min {
                obj.insert("minimum".into(), number(min));
            }
            if let Some(max) = f.max {
                obj.insert("maximum".into(), number(max));
            }
            properties.insert(f.name.clone(), p);
        }
        let required: Vec<&str> = self
            .fields
            .iter()
            .filter(|f| f.required)
            .map(|f| f.name.as_str())
            .collect();
        // JSON objects have no order; `x-order` keeps the declared one (forms, listings).
        let order: Vec<&str> = self.fields.iter().map(|f| f.name.as_str()).collect();
        json!({
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "type": "object",
            "properties": properties,
            "required": required,
            "additionalProperties": false,
            "x-order": order,
        })
    }
}

fn number(n: f64) -> Value {
    if n.fract() == 0.0 && n.abs() < 9.0e15 {
        Value::from(n as i64)
    } else {
        Value::from(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema() -> ConfigSchema {
        ConfigSchema::new([
            Field::int("lines").default(10).min(1.0).max(100.0),
            Field::bool("loud").default(false),
            Field::one_of("mode", &["ok", "error"]).required(),
            Field::float("rate"),
        ])
    }

    #[test]
    fn defaults_are_applied() {
        let c = schema().validate(&json!({"mode": "ok"})).unwrap();
        assert_eq!(
            Value::Object(c),
            json!({"lines": 10, "loud": false, "mode": "ok"})
        );
    }

    #[test]
    fn bad_configs_name_the_field() {
        let s = schema();
        let cases = [
            (
                json!({"mode": "ok", "lines": 0}),
                "lines",
                "must be at least 1, got 0",
            ),
            (
                json!({"mode": "ok", "lines": 101}),
                "lines",
                "must be at most 100, got 101",
            ),
            (
                json!({"mode": "ok", "lines": 1.5}),
                "lines",
                "must be a whole number",
            ),
            (
                json!({"mode": "ok", "lines": "5"}),
                "lines",
                "must be an integer, got a string",
            ),
            (json!({"mode": "nope"}), "mode", "must be one of ok, error"),
            (json!({}), "mode", "is required"),
            (
                json!({"mode": "ok", "colour": 1}),
                "colour",
                "is not a field of this experiment (fields: lines, loud, mode, rate)",
            ),
        ];
        for (config, field, reason) in cases {
            let err = s.validate(&config).unwrap_err();
            assert_eq!(
                (err.field.as_str(), err.reason.as_str()),
                (field, reason),
                "{config}"
            );
        }
        assert_eq!(
            s.validate(&json!([1])).unwrap_err().reason,
            "must be an object, got an array"
        );
    }

    #[test]
    fn json_schema_reads_back() {
        // In the declared order, not the JSON object's (alphabetical).
        let back = ConfigSchema::from_json_schema(&schema().to_json_schema()).unwrap();
        assert_eq!(back.fields, schema().fields);
    }

    #[test]
    fn json_schema_carries_types_bounds_and_required() {
        let js = schema().to_json_schema();
        assert_eq!(
            js["properties"]["lines"],
            json!({"type": "integer", "default": 10, "minimum": 1, "maximum": 100})
        );
        assert_eq!(js["properties"]["mode"]["enum"], json!(["ok", "error"]));
        assert_eq!(js["required"], json!(["mode"]));
        assert_eq!(js["additionalProperties"], json!(false));
    }
}
