//! The GraphQL schema: roots split by feature and merged.

pub mod documents;
mod events;
pub mod fanout;
mod inputs;
mod profiles;
mod runs;
mod subscriptions;
mod types;
mod workspace;

use crate::bus::EventBus;
use crate::service::Services;
use async_graphql::{MergedObject, MergedSubscription, Schema};
use std::sync::Arc;

pub use subscriptions::SubscriptionRoot;

#[derive(MergedObject, Default)]
pub struct QueryRoot(
    workspace::WorkspaceQuery,
    runs::RunQuery,
    profiles::ProfileQuery,
    events::HealthQuery,
);

#[derive(MergedObject, Default)]
pub struct MutationRoot(workspace::WorkspaceMutation, runs::RunMutation);

#[derive(MergedSubscription, Default)]
pub struct Subscriptions(subscriptions::SubscriptionRoot);

pub type AppSchema = Schema<QueryRoot, MutationRoot, Subscriptions>;

pub const MAX_DEPTH: usize = 16;
pub const MAX_COMPLEXITY: usize = 5_000;

pub fn build_schema(services: Option<Arc<Services>>, bus: Option<EventBus>) -> AppSchema {
    let mut builder = Schema::build(
        QueryRoot::default(),
        MutationRoot::default(),
        Subscriptions::default(),
    )
    .limit_depth(MAX_DEPTH)
    .limit_complexity(MAX_COMPLEXITY);
    if let Some(s) = services {
        builder = builder.data(s);
    }
    if let Some(b) = bus {
        builder = builder.data(b);
    }
    builder.finish()
}

/// The SDL written to `schema.graphql` (fields sorted, so diffs stay readable).
pub fn export_sdl() -> String {
    build_schema(None, None).sdl_with_options(
        async_graphql::SDLExportOptions::new()
            .sorted_fields()
            .sorted_arguments(),
    )
}

/// Caller identity from the `x-actor-id` header (a plain name; no authentication yet).
#[derive(Debug, Clone)]
pub struct ActorId(pub String);

pub(crate) fn services<'a>(ctx: &async_graphql::Context<'a>) -> &'a Arc<Services> {
    ctx.data_unchecked::<Arc<Services>>()
}

pub(crate) fn caller(ctx: &async_graphql::Context<'_>) -> crate::service::Caller {
    let id = ctx
        .data_opt::<ActorId>()
        .map(|a| a.0.clone())
        .unwrap_or_else(|| "anonymous".to_string());
    crate::service::Caller::user(id)
}
