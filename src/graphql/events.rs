//! Health.

use super::services;
use async_graphql::{Context, Object, SimpleObject};

#[derive(SimpleObject)]
pub struct Health {
    pub status: String,
    pub database: String,
    pub version: String,
}

#[derive(Default)]
pub struct HealthQuery;

#[Object]
impl HealthQuery {
    async fn health(&self, ctx: &Context<'_>) -> Health {
        let s = services(ctx);
        let db_ok = s.store.ping().await.is_ok();
        Health {
            status: if db_ok { "ok" } else { "degraded" }.into(),
            database: if s.store.is_postgres() {
                "postgres"
            } else {
                "sqlite"
            }
            .into(),
            version: env!("CARGO_PKG_VERSION").into(),
        }
    }
}
