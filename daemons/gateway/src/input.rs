//! Parsing and validating task request bodies and list queries.
//!
//! Two kinds of error, kept apart on purpose (SPEC §2): malformed JSON or a value of the
//! wrong JSON type is a 400 naming the field; a well-typed value outside its bounds (title
//! length, status spelling, ids ≤ 0, missing required fields) is a 422 listing every bad
//! field at once. Parsing goes through `serde_json::Value` so that absent, `null` and
//! present can be told apart, which PATCH needs.

use serde_json::{Map, Value};
use taskflow_contracts::TaskStatus;

use taskflow_kit::web::FieldError;

pub const MAX_TITLE: usize = 255;
pub const MAX_DESCRIPTION: usize = 10_000;
pub const MAX_OBSERVERS: usize = 100;

/// A field as the client sent it.
#[derive(Debug, Clone, PartialEq)]
pub enum Field<T> {
    Absent,
    Null,
    Value(T),
}

/// A task body, typed but not yet bounds-checked.
#[derive(Debug)]
pub struct TaskInput {
    pub title: Field<String>,
    pub description: Field<String>,
    pub performer_id: Field<i64>,
    pub creator_id: Field<i64>,
    pub observer_ids: Field<Vec<i64>>,
    pub status: Field<String>,
}

/// Why a body was refused.
#[derive(Debug)]
pub enum Rejection {
    /// 400: not JSON, not an object, or wrong types.
    Malformed(String, Vec<FieldError>),
    /// 422: typed correctly but invalid.
    Invalid(Vec<FieldError>),
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn string(obj: &Map<String, Value>, name: &str, bad: &mut Vec<FieldError>) -> Field<String> {
    match obj.get(name) {
        None => Field::Absent,
        Some(Value::Null) => Field::Null,
        Some(Value::String(s)) => Field::Value(s.clone()),
        Some(v) => {
            bad.push(FieldError::new(
                name,
                format!("must be a string, got {}", type_name(v)),
            ));
            Field::Absent
        }
    }
}

fn integer(obj: &Map<String, Value>, name: &str, bad: &mut Vec<FieldError>) -> Field<i64> {
    match obj.get(name) {
        None => Field::Absent,
        Some(Value::Null) => Field::Null,
        Some(Value::Number(n)) if n.as_i64().is_some() => Field::Value(n.as_i64().unwrap_or(0)),
        Some(v) => {
            bad.push(FieldError::new(
                name,
                format!("must be an integer, got {}", type_name(v)),
            ));
            Field::Absent
        }
    }
}

fn integers(obj: &Map<String, Value>, name: &str, bad: &mut Vec<FieldError>) -> Field<Vec<i64>> {
    match obj.get(name) {
        None => Field::Absent,
        Some(Value::Null) => Field::Null,
        Some(Value::Array(items)) => {
            let mut out = Vec::with_capacity(items.len());
            for (i, it) in items.iter().enumerate() {
                match it.as_i64() {
                    Some(n) => out.push(n),
                    None => {
                        bad.push(FieldError::new(
                            &format!("{name}[{i}]"),
                            format!("must be an integer, got {}", type_name(it)),
                        ));
                        return Field::Absent;
                    }
                }
            }
            Field::Value(out)
        }
        Some(v) => {
            bad.push(FieldError::new(
                name,
                format!("must be an array of integers, got {}", type_name(v)),
            ));
            Field::Absent
        }
    }
}

/// Parses a task body (POST, PUT or PATCH).
pub fn parse_task(bytes: &[u8]) -> Result<TaskInput, Rejection> {
    let value: Value = serde_json::from_slice(bytes)
        .map_err(|e| Rejection::Malformed(format!("malformed JSON: {e}"), vec![]))?;
    let Value::Object(obj) = value else {
        return Err(Rejection::Malformed(
            "the body must be a JSON object".into(),
            vec![],
        ));
    };
    let mut bad = Vec::new();
    let input = TaskInput {
        title: string(&obj, "title", &mut bad),
        description: string(&obj, "description", &mut bad),
        performer_id: integer(&obj, "performer_id", &mut bad),
        creator_id: integer(&obj, "creator_id", &mut bad),
        observer_ids: integers(&obj, "observer_ids", &mut bad),
        status: string(&obj, "status", &mut bad),
    };
    if bad.is_empty() {
        Ok(input)
    } else {
        let detail = bad
            .iter()
            .map(|e| format!("field `{}` {}", e.field, e.message))
            .collect::<Vec<_>>()
            .join("; ");
        Err(Rejection::Malformed(detail, bad))
    }
}

/// Which fields a request kind requires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Create,
    Replace,
    Patch,
}

/// The validated changes of a body. `None` = leave as is (PATCH) or default.
#[derive(Debug, Default)]
pub struct Valid {
    pub title: Option<String>,
    pub description: Option<String>,
    pub performer_id: Option<i64>,
    pub creator_id: Option<i64>,
    pub observer_ids: Option<Vec<i64>>,
    pub status: Option<TaskStatus>,
}

/// Bounds and presence rules of SPEC §2 for `mode`.
/// `observer_ids`: positive, de-duplicated, at most [`MAX_OBSERVERS`]; null or absent
/// is none (kept as is on PATCH).
fn observers(field: Field<Vec<i64>>, mode: Mode, errs: &mut Vec<FieldError>) -> Option<Vec<i64>> {
    match field {
        Field::Value(mut ids) => {
            if ids.iter().any(|i| *i <= 0) {
                errs.push(FieldError::new("observer_ids", "must be positive user ids"));
                None
            } else {
                ids.sort_unstable();
                ids.dedup();
                if ids.len() > MAX_OBSERVERS {
                    errs.push(FieldError::new("observer_ids", "at most 100 observers"));
                    None
                } else {
                    Some(ids)
                }
            }
        }
        Field::Absent if mode == Mode::Patch => None,
        Field::Null | Field::Absent => Some(vec![]),
    }
}

/// `status`: required on PUT, defaults to `pending` on create, kept on PATCH.
fn status(field: Field<String>, mode: Mode, errs: &mut Vec<FieldError>) -> Option<TaskStatus> {
    match field {
        Field::Value(s) => match s.parse::<TaskStatus>() {
            Ok(st) => Some(st),
            Err(e) => {
                errs.push(FieldError::new("status", e.to_string()));
                None
            }
        },
        Field::Null if mode == Mode::Patch => {
            errs.push(FieldError::new("status", "must not be null"));
            None
        }
        Field::Absent | Field::Null if mode == Mode::Replace => {
            errs.push(FieldError::new("status", "is required"));
            None
        }
        Field::Absent | Field::Null => (mode == Mode::Create).then_some(TaskStatus::Pending),
    }
}

pub fn validate(input: TaskInput, mode: Mode) -> Result<Valid, Rejection> {
    let mut errs = Vec::new();
    let mut out = Valid::default();
    let required =
        |errs: &mut Vec<FieldError>, name: &str| errs.push(FieldError::new(name, "is required"));

    match input.title {
        Field::Value(t) => {
            let n = t.chars().count();
            if t.trim().is_empty() || n > MAX_TITLE {
                errs.push(FieldError::new(
                    "title",
                    "must be 1 to 255 characters, not blank",
                ));
            } else {
                out.title = Some(t);
            }
        }
        Field::Null if mode == Mode::Patch => {
            errs.push(FieldError::new("title", "must not be null"))
        }
        Field::Absent if mode == Mode::Patch => {}
        _ => required(&mut errs, "title"),
    }
    match input.description {
        Field::Value(d) if d.chars().count() > MAX_DESCRIPTION => {
            errs.push(FieldError::new(
                "description",
                "must be at most 10000 characters",
            ));
        }
        Field::Value(d) => out.description = Some(d),
        Field::Null => out.description = Some(String::new()),
        Field::Absent if mode == Mode::Patch => {}
        Field::Absent => out.description = Some(String::new()),
    }
    match input.performer_id {
        Field::Value(p) if p > 0 => out.performer_id = Some(p),
        Field::Value(_) => errs.push(FieldError::new(
            "performer_id",
            "must be a positive user id",
        )),
        Field::Null if mode == Mode::Patch => {
            errs.push(FieldError::new("performer_id", "must not be null"))
        }
        Field::Absent if mode == Mode::Patch => {}
        _ => required(&mut errs, "performer_id"),
    }
    match input.creator_id {
        Field::Value(c) if c > 0 => out.creator_id = Some(c),
        Field::Value(_) => errs.push(FieldError::new("creator_id", "must be a positive user id")),
        Field::Null | Field::Absent => {}
    }
    out.observer_ids = observers(input.observer_ids, mode, &mut errs);
    out.status = status(input.status, mode, &mut errs);
    if errs.is_empty() {
        Ok(out)
    } else {
        Err(Rejection::Invalid(errs))
    }
}

/// `GET /tasks` query.
#[derive(Debug, Default)]
pub struct ListQuery {
    pub performer_id: Option<i64>,
    pub creator_id: Option<i64>,
    pub observer_id: Option<i64>,
    pub status: Option<TaskStatus>,
    pub limit: i64,
    pub after_id: i64,
}

pub const DEFAULT_LIMIT: i64 = 50;
pub const MAX_LIMIT: i64 = 500;

pub fn parse_list_query(q: &str) -> Result<ListQuery, Vec<FieldError>> {
    let mut out = ListQuery {
        limit: DEFAULT_LIMIT,
        ..ListQuery::default()
    };
    let mut errs = Vec::new();
    let id = |v: &str, name: &str, errs: &mut Vec<FieldError>| match v.parse::<i64>() {
        Ok(n) if n > 0 => Some(n),
        _ => {
            errs.push(FieldError::new(name, "must be a positive integer"));
            None
        }
    };
    for (k, v) in taskflow_kit::web::query_pairs(q) {
        match k.as_str() {
            "performer_id" => out.performer_id = id(&v, "performer_id", &mut errs),
            "creator_id" => out.creator_id = id(&v, "creator_id", &mut errs),
            "observer_id" => out.observer_id = id(&v, "observer_id", &mut errs),
            "status" => match v.parse::<TaskStatus>() {
                Ok(s) => out.status = Some(s),
                Err(e) => errs.push(FieldError::new("status", e.to_string())),
            },
            "limit" => match v.parse::<i64>() {
                Ok(n) if (1..=MAX_LIMIT).contains(&n) => out.limit = n,
                _ => errs.push(FieldError::new("limit", "must be an integer from 1 to 500")),
            },
            "cursor" => match v.parse::<i64>() {
                Ok(n) if n >= 0 => out.after_id = n,
                _ if v.is_empty() => {}
                _ => errs.push(FieldError::new(
                    "cursor",
                    "not a cursor returned by this API",
                )),
            },
            _ => {}
        }
    }
    if errs.is_empty() {
        Ok(out)
    } else {
        Err(errs)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn check(body: &str, mode: Mode) -> Result<Valid, Rejection> {
        validate(parse_task(body.as_bytes())?, mode)
    }

    #[test]
    fn seed_create_body_is_valid() {
        let v = check(
            r#"{"title":"Complete project","description":"Finish the backend implementation","performer_id":2,"creator_id":1,"observer_ids":[3,4],"status":"pending"}"#,
            Mode::Create,
        )
        .unwrap();
        assert_eq!(v.observer_ids, Some(vec![3, 4]));
        assert_eq!(v.status, Some(TaskStatus::Pending));
    }

    #[test]
    fn wrong_types_are_400_naming_the_field() {
        match check(r#"{"title":1,"performer_id":"2"}"#, Mode::Create) {
            Err(Rejection::Malformed(_, errs)) => {
                let f: Vec<_> = errs.iter().map(|e| e.field.as_str()).collect();
                assert_eq!(f, vec!["title", "performer_id"]);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            check("{", Mode::Create),
            Err(Rejection::Malformed(..))
        ));
        assert!(matches!(
            check("[]", Mode::Create),
            Err(Rejection::Malformed(..))
        ));
        assert!(matches!(
            check(
                r#"{"title":"x","performer_id":1,"observer_ids":[1,"a"]}"#,
                Mode::Create
            ),
            Err(Rejection::Malformed(..))
        ));
    }

    #[test]
    fn bounds_are_422() {
        let long = "x".repeat(256);
        match check(
            &format!(r#"{{"title":"{long}","performer_id":0,"status":"done"}}"#),
            Mode::Create,
        ) {
            Err(Rejection::Invalid(errs)) => {
                let f: Vec<_> = errs.iter().map(|e| e.field.as_str()).collect();
                assert_eq!(f, vec!["title", "performer_id", "status"]);
            }
            other => panic!("{other:?}"),
        }
        assert!(check(r#"{"title":"x","performer_id":1}"#, Mode::Replace).is_err());
        assert!(check(r#"{"status":"completed"}"#, Mode::Patch).is_ok());
        assert!(check(r#"{"title":null}"#, Mode::Patch).is_err());
    }

    #[test]
    fn list_query() {
        let q = parse_list_query("performer_id=2&status=pending&limit=10&cursor=5").unwrap();
        assert_eq!((q.performer_id, q.limit, q.after_id), (Some(2), 10, 5));
        assert_eq!(q.status, Some(TaskStatus::Pending));
        assert!(parse_list_query("limit=501").is_err());
        assert!(parse_list_query("performer_id=x").is_err());
    }
}
