//! Input helpers: cursors, page sizes, skill overrides.

use crate::domain::profiles::SkillOverrides;
use crate::error::AppError;
use async_graphql::InputObject;
use base64::Engine;

pub const DEFAULT_PAGE: i32 = 20;
pub const MAX_PAGE: i32 = 100;

pub fn page_size(first: Option<i32>) -> Result<u64, AppError> {
    let n = first.unwrap_or(DEFAULT_PAGE);
    if !(1..=MAX_PAGE).contains(&n) {
        return Err(AppError::validation(format!(
            "first must be between 1 and {MAX_PAGE}"
        )));
    }
    Ok(n as u64)
}

pub fn encode_cursor(seq: i64) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("seq:{seq}"))
}

pub fn decode_cursor(cursor: &str) -> Result<i64, AppError> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(cursor)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|s| s.strip_prefix("seq:").and_then(|n| n.parse().ok()))
        .ok_or_else(|| AppError::validation("invalid cursor"))
}

#[derive(InputObject, Clone, Debug)]
pub struct SkillOverrideInput {
    pub stage_key: String,
    pub skills: Vec<String>,
}

pub fn overrides(list: Option<Vec<SkillOverrideInput>>) -> Result<SkillOverrides, AppError> {
    let mut map = SkillOverrides::new();
    for o in list.unwrap_or_default() {
        if map.insert(o.stage_key.clone(), o.skills).is_some() {
            return Err(AppError::validation(format!(
                "stage override `{}` is given twice",
                o.stage_key
            )));
        }
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_roundtrip_and_reject_garbage() {
        assert_eq!(decode_cursor(&encode_cursor(42)).expect("ok"), 42);
        assert!(decode_cursor("nope").is_err());
        assert!(page_size(Some(0)).is_err() && page_size(Some(101)).is_err());
        assert_eq!(page_size(None).expect("default"), 20);
    }
}
