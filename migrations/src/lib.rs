//! One migration history for SQLite and Postgres.

pub use sea_orm_migration::prelude::*;

mod m20261125_000001_create_event_log_and_read_models;
mod m20261128_000002_timeline_from_the_log;

pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20261125_000001_create_event_log_and_read_models::Migration),
            Box::new(m20261128_000002_timeline_from_the_log::Migration),
        ]
    }
}
