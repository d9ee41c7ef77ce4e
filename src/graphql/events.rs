//! Health and the head of the event log.

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

    /// The sequence of the last committed event. A client that loads state and then subscribes
    /// reads this first (its own request), then the state, then subscribes with it as
    /// `afterSequence`: nothing in between is missed (a change already in the state may arrive
    /// once more).
    async fn event_head(&self, ctx: &Context<'_>) -> async_graphql::Result<i64> {
        Ok(services(ctx).store.head_sequence().await?)
    }
}
