//! Identifiers: client-supplied ones are validated, generated ones are random and prefixed.

use crate::error::AppError;
use rand::RngCore;

pub const MAX_ID_LEN: usize = 64;

/// A client-supplied id: `[A-Za-z0-9_-]{1,64}`.
pub fn parse_client_id(field: &str, raw: &str) -> Result<String, AppError> {
    let ok = !raw.is_empty()
        && raw.len() <= MAX_ID_LEN
        && raw
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(raw.to_string())
    } else {
        Err(AppError::validation(format!(
            "{field} must match [A-Za-z0-9_-]{{1,64}}"
        )))
    }
}

/// `prefix` + 16 random hex digits, e.g. `b-3f09a1c2d4e5f678`.
pub fn generate(prefix: &str) -> String {
    let mut bytes = [0u8; 8];
    rand::thread_rng().fill_bytes(&mut bytes);
    format!("{prefix}{}", hex::encode(bytes))
}

/// Gate approval id: unique per run and stage (the whole run id, never a prefix of it).
pub fn approval_id(run_id: &str, stage_key: &str) -> String {
    format!("apr-{run_id}-{stage_key}")
}

/// Gate review task id: unique per run and stage.
pub fn task_id(run_id: &str, stage_key: &str) -> String {
    format!("task-{run_id}-{stage_key}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_valid_ids() {
        for id in ["a", "b-1", "Brand_01", &"x".repeat(64)] {
            assert_eq!(parse_client_id("id", id).ok().as_deref(), Some(id));
        }
    }

    #[test]
    fn rejects_invalid_ids() {
        for id in ["", "a b", "../etc", "é", &"x".repeat(65), "a/b", "a.b"] {
            assert!(matches!(
                parse_client_id("id", id),
                Err(AppError::Validation(_))
            ));
        }
    }

    #[test]
    fn generated_ids_are_prefixed_and_unique() {
        let a = generate("b-");
        let b = generate("b-");
        assert!(a.starts_with("b-") && a.len() == 18);
        assert_ne!(a, b);
        assert!(parse_client_id("id", &a).is_ok());
    }

    #[test]
    fn gate_ids_do_not_collide_across_runs_sharing_a_prefix() {
        assert_ne!(
            approval_id("run-07d9aaaa", "brand-voice"),
            approval_id("run-07d9bbbb", "brand-voice")
        );
        assert_ne!(task_id("run-1", "a"), task_id("run-1", "b"));
    }
}
