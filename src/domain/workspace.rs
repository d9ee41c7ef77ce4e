//! Rules for brands, projects and threads.

use crate::error::AppError;

pub const MAX_NAME_LEN: usize = 200;
pub const MAX_TEXT_LEN: usize = 10_000;

/// A required, trimmed, bounded name.
pub fn parse_name(field: &str, raw: &str) -> Result<String, AppError> {
    let name = raw.trim();
    if name.is_empty() {
        return Err(AppError::validation(format!("{field} must not be empty")));
    }
    if name.chars().count() > MAX_NAME_LEN {
        return Err(AppError::validation(format!(
            "{field} must be at most {MAX_NAME_LEN} characters"
        )));
    }
    if name.contains('\0') {
        return Err(AppError::validation(format!(
            "{field} must not contain NUL characters"
        )));
    }
    Ok(name.to_string())
}

/// An optional free text, bounded.
pub fn parse_text(field: &str, raw: &str) -> Result<String, AppError> {
    if raw.chars().count() > MAX_TEXT_LEN {
        return Err(AppError::validation(format!(
            "{field} must be at most {MAX_TEXT_LEN} characters"
        )));
    }
    if raw.contains('\0') {
        return Err(AppError::validation(format!(
            "{field} must not contain NUL characters"
        )));
    }
    Ok(raw.trim().to_string())
}

/// A mode name as stored on a thread: `[A-Za-z0-9_-]{1,64}`.
pub fn parse_mode(raw: &str) -> Result<String, AppError> {
    super::ids::parse_client_id("mode", raw.trim())
}

pub fn parse_channels(raw: &[String]) -> Result<Vec<String>, AppError> {
    let mut out = Vec::with_capacity(raw.len());
    for c in raw {
        let c = parse_name("channel", c)?;
        if !out.contains(&c) {
            out.push(c);
        }
    }
    Ok(out)
}

/// A due date in `YYYY-MM-DD` form.
pub fn parse_due_date(raw: &str) -> Result<String, AppError> {
    chrono::NaiveDate::parse_from_str(raw.trim(), "%Y-%m-%d")
        .map(|d| d.format("%Y-%m-%d").to_string())
        .map_err(|_| AppError::validation("dueDate must be a date in YYYY-MM-DD form"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_trimmed_and_required() {
        assert_eq!(parse_name("name", "  Acme ").expect("ok"), "Acme");
        assert!(parse_name("name", "   ").is_err());
        assert!(parse_name("name", &"x".repeat(201)).is_err());
    }

    #[test]
    fn modes_and_dates() {
        assert_eq!(parse_mode("plan_90d").expect("ok"), "plan_90d");
        assert!(parse_mode("bad mode").is_err());
        assert_eq!(parse_due_date("2026-03-01").expect("ok"), "2026-03-01");
        assert!(parse_due_date("03/01/2026").is_err());
        assert_eq!(
            parse_channels(&["a".into(), "a".into(), "b".into()]).expect("ok"),
            ["a", "b"]
        );
    }
}
