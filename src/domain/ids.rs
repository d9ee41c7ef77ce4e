//! Identifiers: client-supplied ones are validated, generated ones are prefixed, ordered by
//! creation time and random after that.

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

/// `prefix` + 24 hex digits: 11 of the milliseconds since the Unix epoch, then 13 random
/// (52 bits), e.g. `run-019ac1b2c3d4e5f60718293a`.
///
/// Ids are keys of most indexes (runs, stages, approvals, the event log's streams). Leading with
/// the time puts each new row at the end of those indexes, next to the rows created just before
/// it, instead of at a random place in them: with random ids, a database holding 1,000,000 events
/// dirtied and wrote back so many more index pages per run that it served 24 % fewer runs per
/// second than an empty one (BENCHMARKS.md).
pub fn generate(prefix: &str) -> String {
    let random = rand::thread_rng().next_u64();
    format!(
        "{prefix}{:011x}{:013x}",
        super::time::now_millis() & ((1 << 44) - 1),
        random & ((1 << 52) - 1)
    )
}

/// When a generated id was made (milliseconds since the epoch), read from the 24 digits after
/// its prefix; `None` for anything else.
pub fn generated_millis(digits: &str) -> Option<u64> {
    if digits.len() != 24 {
        return None;
    }
    u64::from_str_radix(&digits[..11], 16).ok()
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
        assert!(a.starts_with("b-") && a.len() == 26, "{a}");
        assert_ne!(a, b);
        assert!(parse_client_id("id", &a).is_ok());
    }

    #[test]
    fn generated_ids_tell_when_they_were_made() {
        let before = crate::domain::time::now_millis();
        let id = generate("");
        let made = generated_millis(&id).expect("a generated id");
        assert!(made >= before && made <= crate::domain::time::now_millis());
        assert_eq!(generated_millis("3f09a1c2d4e5f678"), None);
    }

    #[test]
    fn generated_ids_sort_by_creation_time() {
        let mut ids = Vec::new();
        for _ in 0..5 {
            ids.push(generate("run-"));
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        let mut sorted = ids.clone();
        sorted.sort();
        assert_eq!(sorted, ids);
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
