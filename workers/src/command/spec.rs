//! `[[experiments]]`: command experiments declared in the configuration, and the
//! checks that stop a worker at start on a bad declaration, naming the entry and the
//! field.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use athanor_schemas::config_schema::{ConfigSchema, Field, FieldKind};
use athanor_schemas::{names, Level};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// One `[[experiments]]` entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandSpec {
    /// The experiment's name: a NATS subject token (`A-Z a-z 0-9 - _`).
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// The program and its arguments; never passed through a shell. A relative
    /// program path (one with a `/`) is taken from `cwd`; a bare name is looked up on
    /// `PATH`.
    pub command: Vec<String>,
    /// Where the child starts; relative to the configuration file's folder, which is
    /// also the default.
    #[serde(default)]
    pub cwd: Option<PathBuf>,
    /// Variables set for the child, on top of the worker's environment.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// How long a run may take; past it the child is stopped and the run fails.
    #[serde(default, with = "humantime_serde::option")]
    pub timeout: Option<Duration>,
    /// The level of stdout lines.
    #[serde(default = "info")]
    pub stdout_level: Level,
    /// The level of stderr lines.
    #[serde(default = "warn")]
    pub stderr_level: Level,
    /// Run the child on a pseudo-terminal (stdout and stderr then arrive together, at
    /// `stdout_level`), for programs that only colour or stream on a terminal.
    #[serde(default)]
    pub pty: bool,
    /// The config fields a run takes.
    #[serde(default)]
    pub config: Vec<FieldSpec>,
    /// The folder relative paths are taken from: the configuration file's. Set by
    /// whoever loads the file; the current directory when unset.
    #[serde(skip)]
    pub base_dir: Option<PathBuf>,
}

fn info() -> Level {
    Level::Info
}

fn warn() -> Level {
    Level::Warn
}

/// One config field, as the configuration file writes it:
/// `{ name = "epochs", type = "int", default = 3, min = 1 }`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FieldSpec {
    pub name: String,
    /// `int`, `float`, `bool`, `string` or `one_of` (with `values`).
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub values: Option<Vec<String>>,
    #[serde(default)]
    pub default: Option<Value>,
    #[serde(default)]
    pub min: Option<f64>,
    #[serde(default)]
    pub max: Option<f64>,
    #[serde(default)]
    pub required: bool,
    #[serde(default)]
    pub description: String,
}

/// A declaration the worker refuses to start with.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("experiments[{index}] ({name:?}): `{field}` {reason}")]
pub struct DeclarationError {
    pub index: usize,
    pub name: String,
    pub field: String,
    pub reason: String,
}

/// A checked declaration, paths resolved.
#[derive(Debug, Clone)]
pub(crate) struct Checked {
    pub(crate) spec: CommandSpec,
    pub(crate) program: PathBuf,
    pub(crate) cwd: PathBuf,
    pub(crate) schema: ConfigSchema,
}

/// Checks every declaration; `taken` holds the names already in use (built-ins).
pub(crate) fn check_all(
    specs: &[CommandSpec],
    taken: &[&str],
) -> Result<Vec<Checked>, DeclarationError> {
    let mut names: HashSet<&str> = taken.iter().copied().collect();
    let mut checked = Vec::with_capacity(specs.len());
    for (index, spec) in specs.iter().enumerate() {
        let fail = |field: &str, reason: String| DeclarationError {
            index,
            name: spec.name.clone(),
            field: field.into(),
            reason,
        };
        if !names::is_valid_token(&spec.name) {
            return Err(fail(
                "name",
                "must be 1-128 characters of A-Z a-z 0-9 - _ (it names a NATS subject)".into(),
            ));
        }
        if !names.insert(&spec.name) {
            return Err(fail(
                "name",
                "is already taken by another experiment of this worker".into(),
            ));
        }
        checked.push(check(spec).map_err(|(field, reason)| fail(&field, reason))?);
    }
    Ok(checked)
}

fn check(spec: &CommandSpec) -> Result<Checked, (String, String)> {
    let err = |field: &str, reason: String| (field.to_string(), reason);
    let base = match &spec.base_dir {
        Some(dir) => dir.clone(),
        None => {
            std::env::current_dir().map_err(|e| err("cwd", format!("cannot be resolved: {e}")))?
        }
    };
    let cwd = match &spec.cwd {
        Some(cwd) => base.join(cwd),
        None => base,
    };
    if !cwd.is_dir() {
        return Err(err("cwd", format!("{} is not a folder", cwd.display())));
    }
    let Some(program) = spec.command.first() else {
        return Err(err(
            "command",
            "is empty: give the program and its arguments".into(),
        ));
    };
    if program.is_empty() || program.contains('\0') {
        return Err(err(
            "command",
            "names no program in its first element".into(),
        ));
    }
    if let Some(arg) = spec.command.iter().position(|a| a.contains('\0')) {
        return Err(err("command", format!("element {arg} contains a NUL byte")));
    }
    let path_var = spec
        .env
        .get("PATH")
        .cloned()
        .or_else(|| std::env::var("PATH").ok())
        .unwrap_or_default();
    let program = resolve_program(program, &cwd, &path_var).map_err(|r| err("command", r))?;
    for (key, value) in &spec.env {
        if key.is_empty() || key.contains('=') || key.contains('\0') || value.contains('\0') {
            return Err(err("env", format!("has an invalid variable {key:?}")));
        }
        if key.starts_with("ATHANOR_") {
            return Err(err("env", format!("sets {key}, which Athanor sets itself")));
        }
    }
    if spec.timeout == Some(Duration::ZERO) {
        return Err(err(
            "timeout",
            "must be more than zero (leave it out for none)".into(),
        ));
    }
    let schema = schema(&spec.config).map_err(|(i, reason)| (format!("config[{i}]"), reason))?;
    Ok(Checked {
        spec: spec.clone(),
        program,
        cwd,
        schema,
    })
}

/// A program path: relative with a `/` → from `cwd`; a bare name → on `PATH`.
fn resolve_program(program: &str, cwd: &Path, path_var: &str) -> Result<PathBuf, String> {
    if program.contains('/') {
        let path = cwd.join(program);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(format!("program {} does not exist", path.display()))
        };
    }
    std::env::split_paths(path_var)
        .map(|dir| dir.join(program))
        .find(|candidate| is_executable(candidate))
        .ok_or_else(|| format!("program {program:?} is not found on PATH"))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// The config schema of the declared fields; errors carry the field's index.
fn schema(fields: &[FieldSpec]) -> Result<ConfigSchema, (usize, String)> {
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(fields.len());
    for (i, spec) in fields.iter().enumerate() {
        let fail = |reason: String| (i, reason);
        if spec.name.is_empty() {
            return Err(fail("has an empty name".into()));
        }
        if !seen.insert(spec.name.as_str()) {
            return Err(fail(format!("repeats the field name {:?}", spec.name)));
        }
        let kind = match spec.kind.as_str() {
            "int" => FieldKind::Int,
            "float" => FieldKind::Float,
            "bool" => FieldKind::Bool,
            "string" => FieldKind::String,
            "one_of" => match &spec.values {
                Some(values) if !values.is_empty() => FieldKind::Enum(values.clone()),
                _ => {
                    return Err(fail(format!(
                        "({}) of type one_of needs a non-empty `values` list",
                        spec.name
                    )))
                }
            },
            other => {
                return Err(fail(format!(
                    "({}) has an unknown type {other:?}: use int, float, bool, string or one_of",
                    spec.name
                )))
            }
        };
        if spec.values.is_some() && !matches!(kind, FieldKind::Enum(_)) {
            return Err(fail(format!(
                "({}) has `values`, which only one_of takes",
                spec.name
            )));
        }
        if (spec.min.is_some() || spec.max.is_some())
            && !matches!(kind, FieldKind::Int | FieldKind::Float)
        {
            return Err(fail(format!(
                "({}) has `min`/`max`, which only int and float take",
                spec.name
            )));
        }
        if let (Some(min), Some(max)) = (spec.min, spec.max) {
            if min > max {
                return Err(fail(format!(
                    "({}) has min {min} above max {max}",
                    spec.name
                )));
            }
        }
        let field = Field {
            name: spec.name.clone(),
            kind,
            description: spec.description.clone(),
            default: spec.default.clone(),
            min: spec.min,
            max: spec.max,
            required: spec.required,
        };
        out.push(field);
    }
    let schema = ConfigSchema::new(out);
    // Every default must pass its field's own checks.
    for (i, spec) in fields.iter().enumerate() {
        if let Some(default) = &spec.default {
            let one = ConfigSchema::new(schema.fields.get(i).cloned());
            let mut config = serde_json::Map::new();
            config.insert(spec.name.clone(), default.clone());
            if let Err(error) = one.validate(&Value::Object(config)) {
                return Err((
                    i,
                    format!("({}) has a default that {}", spec.name, error.reason),
                ));
            }
        }
    }
    Ok(schema)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(toml_entry: serde_json::Value) -> CommandSpec {
        serde_json::from_value(toml_entry).unwrap()
    }

    #[test]
    fn the_documented_form_checks_and_builds_its_schema() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("examples")).unwrap();
        let mut train = spec(serde_json::json!({
            "name": "train", "description": "Trains the toy model",
            "command": ["python3", "train.py"], "cwd": "examples",
            "config": [
                {"name": "epochs", "type": "int", "default": 3, "min": 1, "max": 1000, "description": "Passes over the data"},
                {"name": "lr", "type": "float", "default": 0.001},
                {"name": "note", "type": "string", "default": ""},
                {"name": "optimizer", "type": "one_of", "values": ["adam", "sgd"], "default": "adam"},
                {"name": "shuffle", "type": "bool", "default": true},
            ]
        }));
        train.base_dir = Some(dir.path().into());
        let checked = check_all(&[train], &["echo"]).unwrap();
        assert_eq!(checked[0].cwd, dir.path().join("examples"));
        assert!(checked[0].program.ends_with("python3"));
        let defaults = checked[0].schema.validate(&Value::Null).unwrap();
        assert_eq!(
            Value::Object(defaults),
            serde_json::json!({"epochs": 3, "lr": 0.001, "note": "", "optimizer": "adam", "shuffle": true})
        );
    }

    #[test]
    fn bad_declarations_name_the_entry_and_the_field() {
        let base = serde_json::json!({"name": "ok", "command": ["true"]});
        let with = |patch: serde_json::Value| {
            let mut v = base.clone();
            for (k, x) in patch.as_object().unwrap() {
                v[k] = x.clone();
            }
            spec(v)
        };
        let err = |specs: &[CommandSpec]| check_all(specs, &["echo"]).unwrap_err().to_string();
        assert_eq!(
            err(&[
                with(serde_json::json!({})),
                with(serde_json::json!({"command": []}))
            ]),
            "experiments[1] (\"ok\"): `name` is already taken by another experiment of this worker"
        );
        assert_eq!(
            err(&[with(serde_json::json!({"name": "two", "command": []}))]),
            "experiments[0] (\"two\"): `command` is empty: give the program and its arguments"
        );
        assert_eq!(
            err(&[with(serde_json::json!({"name": "echo"}))]),
            "experiments[0] (\"echo\"): `name` is already taken by another experiment of this worker"
        );
        assert!(err(&[with(serde_json::json!({"name": "a.b"}))])
            .starts_with("experiments[0] (\"a.b\"): `name` must be"));
        assert_eq!(
            err(&[with(serde_json::json!({"config": [{"name": "x", "type": "int"}, {"name": "y", "type": "complex"}]}))]),
            "experiments[0] (\"ok\"): `config[1]` (y) has an unknown type \"complex\": use int, float, bool, string or one_of"
        );
        assert_eq!(
            err(&[with(
                serde_json::json!({"config": [{"name": "n", "type": "int", "default": 0, "min": 1}]})
            )]),
            "experiments[0] (\"ok\"): `config[0]` (n) has a default that must be at least 1, got 0"
        );
        assert_eq!(
            err(&[with(serde_json::json!({"command": ["no-such-program-here"]}))]),
            "experiments[0] (\"ok\"): `command` program \"no-such-program-here\" is not found on PATH"
        );
        assert!(err(&[with(serde_json::json!({"cwd": "/no/such/folder"}))])
            .contains("`cwd` /no/such/folder is not a folder"));
    }
}
