//! Integration tests: one binary, the real server on port 0, SQLite and Postgres.

mod helpers;
mod ws_client;

mod checkpoints;
mod console;
mod crash;
mod http;
mod postgres_sends;
mod rebuild;
mod runs;
mod runtime_faults;
mod schema;
mod startup;
mod store;
mod subscriptions;
mod workspace;
