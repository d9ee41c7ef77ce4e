//! Postgres on this same host, over TCP: connections without TLS unless the URL or `PGSSLMODE`
//! asks for it.
//!
//! sqlx, like libpq, tries TLS first when the URL says nothing of it (`sslmode=prefer`), and a
//! Postgres that has a certificate (Debian's packages make one) accepts it. On a loopback
//! address the encryption protects nothing, since the traffic never leaves the machine, and it costs:
//! 8 % of the Postgres runs/s at N=500, C=50 (BENCHMARKS.md, "No TLS on a loopback address"),
//! every message encrypted by this server and decrypted by the writers' backend under the
//! write lock. A server that takes only TLS connections there (a `hostssl` line in
//! `pg_hba.conf`) is still reached as the URL allows; an `sslmode` in the URL, or `PGSSLMODE`,
//! always decides.

use sea_orm::sqlx::postgres::{PgConnectOptions, PgConnection};
use sea_orm::sqlx::Connection;
use std::net::IpAddr;
use std::str::FromStr;

/// `url` with `sslmode=disable` when [`plain_candidate`] says so and the server there takes a
/// connection without TLS (one is opened to see, and closed); otherwise `url` as given.
pub(super) async fn plain_on_loopback(url: &str) -> String {
    let pgsslmode = std::env::var("PGSSLMODE").ok();
    let Some(plain) = plain_candidate(url, pgsslmode.as_deref()) else {
        return url.to_string();
    };
    let Ok(options) = PgConnectOptions::from_str(&plain) else {
        return url.to_string();
    };
    match PgConnection::connect_with(&options).await {
        Ok(conn) => {
            let _ = conn.close().await;
            tracing::debug!("Postgres on a loopback address: connecting without TLS");
            plain
        }
        Err(e) => {
            // Refused by the server (its `pg_hba.conf` wants TLS here, say), or not reached:
            // the URL as given, whose own connection reports what is wrong if anything is.
            tracing::info!(
                error = %e,
                "Postgres on a loopback address took no connection without TLS; connecting \
                 as the URL allows"
            );
            url.to_string()
        }
    }
}

/// `url` with `sslmode=disable` added, when it reaches Postgres over TCP on a loopback address
/// (`localhost`, 127.0.0.0/8, `::1`) and neither it (`sslmode`, `ssl-mode`) nor `pgsslmode`
/// (the environment's `PGSSLMODE`) says how to use TLS; `None` otherwise (a Unix socket has
/// no TLS to leave out).
fn plain_candidate(url: &str, pgsslmode: Option<&str>) -> Option<String> {
    if pgsslmode.is_some_and(|m| !m.trim().is_empty()) {
        return None;
    }
    let query = url.split_once('?').map(|(_, q)| q).unwrap_or("");
    let says_tls = query
        .split('&')
        .any(|pair| matches!(pair.split('=').next(), Some("sslmode" | "ssl-mode")));
    if says_tls {
        return None;
    }
    let options = PgConnectOptions::from_str(url).ok()?;
    if options.get_socket().is_some() {
        return None;
    }
    let host = options.get_host();
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let loopback = host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
    if !loopback {
        return None;
    }
    let joint = if url.contains('?') { '&' } else { '?' };
    Some(format!("{url}{joint}sslmode=disable"))
}

#[cfg(test)]
mod tests {
    use super::plain_candidate;

    #[test]
    fn only_a_loopback_url_that_says_nothing_of_tls_goes_without_it() {
        let plain = |url: &str| plain_candidate(url, None);
        for (url, joint) in [
            ("postgres://postgres@127.0.0.1:5432/db", '?'),
            ("postgres://u:p@localhost/db?application_name=x", '&'),
            ("postgresql://u@127.0.0.2/db", '?'),
            ("postgres://u@[::1]:5432/db", '?'),
        ] {
            assert_eq!(plain(url), Some(format!("{url}{joint}sslmode=disable")));
        }
        for kept in [
            // The URL decides, whatever it says.
            "postgres://u@127.0.0.1/db?sslmode=prefer",
            "postgres://u@127.0.0.1/db?sslmode=require",
            "postgres://u@127.0.0.1/db?x=1&ssl-mode=verify-full",
            "postgres://u@127.0.0.1/db?sslmode=disable",
            // Another host, or a Unix socket (no TLS there anyway).
            "postgres://u@db.example.com/db",
            "postgres://u@10.0.0.5:5432/db",
            "postgres://u@%2Fvar%2Frun%2Fpostgresql/db",
        ] {
            assert_eq!(plain(kept), None, "{kept}");
        }
        // So does the environment's PGSSLMODE.
        assert_eq!(
            plain_candidate("postgres://u@127.0.0.1/db", Some("require")),
            None
        );
    }
}
