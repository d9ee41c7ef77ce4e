//! Timestamps are stored as fixed-width RFC 3339 UTC strings, so they sort as text on every backend.

use chrono::{DateTime, SecondsFormat, Utc};

pub fn now() -> String {
    format(Utc::now())
}

/// Milliseconds since the Unix epoch.
pub fn now_millis() -> u64 {
    Utc::now().timestamp_millis().max(0) as u64
}

pub fn format(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Micros, true)
}

pub fn parse(text: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(text)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

pub fn after_seconds(seconds: f64) -> String {
    let millis = (seconds * 1000.0).round() as i64;
    format(Utc::now() + chrono::Duration::milliseconds(millis))
}
