//! Build the application: migrated store, profiles, bus, runtime, router, bound listener.

use crate::bus::{EventBus, BUS_CAPACITY};
use crate::config::Config;
use crate::domain::profiles::{ProfileSet, ResolveSettings};
use crate::error::AppError;
use crate::graphql::build_schema;
use crate::graphql::documents::ParsedDocuments;
use crate::graphql::fanout::Renders;
use crate::http::{router, HttpState, WsSettings};
use crate::runner::artifacts::ArtifactStore;
use crate::runner::faults::{self, FaultInjectingRunner};
use crate::runner::foundation::FoundationRunner;
use crate::runner::StageRunner;
use crate::runtime::{Runtime, RuntimeConfig, RuntimeHandle};
use crate::service::Services;
use crate::store::Store;
use anyhow::Context as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// The listener with `TCP_NODELAY` set on every accepted connection. Without it a small write
/// (a WebSocket message, a response) that follows another not yet acknowledged waits for the
/// client's delayed ACK, up to 40 ms on Linux: that was the p99 of transition delivery under load.
fn no_delay(
    listener: TcpListener,
) -> impl axum::serve::Listener<Io = tokio::net::TcpStream, Addr = SocketAddr> {
    use axum::serve::ListenerExt as _;
    listener.tap_io(|stream| {
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY not set on a connection");
        }
    })
}

/// The profiles shipped with the binary (used when `VM_PROFILES_PATH` is not set).
pub const SHIPPED_PROFILES: &str = include_str!("../profiles/workflow_profiles.yaml");

/// Load and validate the profiles; errors name the file, the profile and the field.
pub fn load_profiles(config: &Config) -> anyhow::Result<ProfileSet> {
    let (text, name) = match &config.profiles_path {
        Some(path) => (
            std::fs::read_to_string(path)
                .with_context(|| format!("cannot read profiles file {}", path.display()))?,
            path.display().to_string(),
        ),
        None => (
            SHIPPED_PROFILES.to_string(),
            "profiles/workflow_profiles.yaml (built in)".to_string(),
        ),
    };
    let set = ProfileSet::parse(&text, &name)?;
    set.check_settings(&settings(config))
        .map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
    Ok(set)
}

pub fn settings(config: &Config) -> ResolveSettings {
    ResolveSettings {
        force_foundation_fallback: config.force_foundation_fallback,
        foundation_mode: config.foundation_mode.clone(),
    }
}

pub async fn connect_store(config: &Config) -> anyhow::Result<Arc<Store>> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create data dir {}", config.data_dir.display()))?;
    let store = Store::connect(&config.database_url(), config.db_max_connections)
        .await
        .map_err(AppError::into_anyhow)
        .context("cannot connect to the database")?;
    store
        .migrate()
        .await
        .map_err(AppError::into_anyhow)
        .context("migrations failed")?;
    Ok(Arc::new(store))
}

fn build_runner(config: &Config) -> anyhow::Result<Arc<dyn StageRunner>> {
    let base: Arc<dyn StageRunner> = Arc::new(FoundationRunner);
    match config
        .fault_injection
        .as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        None => Ok(base),
        Some(spec) => {
            let plan =
                faults::parse(spec).map_err(|e| anyhow::anyhow!("VM_FAULT_INJECTION: {e}"))?;
            tracing::warn!(
                ?plan,
                "FAULT INJECTION IS ON: stages will fail, hang or slow down on purpose"
            );
            Ok(Arc::new(FaultInjectingRunner { inner: base, plan }))
        }
    }
}

/// Longest a graceful stop waits for the store to commit and empty its WAL.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(15);

pub struct Application {
    addr: SocketAddr,
    listener: TcpListener,
    router: axum::Router,
    runtime: Option<RuntimeHandle>,
    shutdown_tx: watch::Sender<bool>,
    feeder: tokio::task::JoinHandle<()>,
    pub services: Arc<Services>,
    /// Subscription renderings shared by WebSocket subscribers (see `graphql::fanout`).
    pub renders: Arc<Renders>,
    /// WebSocket connections open right now.
    pub ws_connections: Arc<std::sync::atomic::AtomicUsize>,
    /// GraphQL documents parsed for HTTP requests, kept by their text.
    pub documents: Arc<ParsedDocuments>,
}

impl Application {
    pub async fn build(config: Config) -> anyhow::Result<Application> {
        let profiles = Arc::new(load_profiles(&config)?);
        let runner = build_runner(&config)?;
        let store = connect_store(&config).await?;
        let services = Arc::new(Services::new(
            store.clone(),
            profiles,
            settings(&config),
            // SQLite: one process writes the database, and so the data directory.
            ArtifactStore::new(&config.data_dir).sole_writer(!store.is_postgres()),
        ));
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let bus = EventBus::new(
            BUS_CAPACITY,
            store.head_sequence().await.map_err(AppError::into_anyhow)?,
        );
        let feeder = bus.spawn_feeder(store.clone(), shutdown_rx);
        let runtime = (config.workers > 0).then(|| {
            Runtime::new(
                services.clone(),
                runner,
                RuntimeConfig {
                    workers: config.workers,
                    lease_seconds: config.lease_seconds,
                    poll_interval: Duration::from_millis(500),
                },
            )
            .spawn()
        });
        let schema = build_schema(Some(services.clone()), Some(bus));
        let renders = Arc::new(Renders::default());
        let ws_connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let documents = Arc::new(ParsedDocuments::default());
        let state = HttpState {
            schema,
            ws: WsSettings {
                init_timeout: Duration::from_secs(config.ws_init_timeout_seconds),
                ping_interval: Duration::from_secs(config.ws_ping_interval_seconds.max(1)),
                write_timeout: Duration::from_secs(config.ws_write_timeout_seconds.max(1)),
                max_operations: config.ws_max_operations.max(1),
                open_connections: ws_connections.clone(),
                max_message_bytes: config.max_body_bytes,
            },
            renders: renders.clone(),
            documents: documents.clone(),
        };
        let listener = TcpListener::bind(&config.bind)
            .await
            .with_context(|| format!("cannot listen on {}", config.bind))?;
        let addr = listener.local_addr()?;
        Ok(Application {
            addr,
            listener,
            router: router(state, config.max_body_bytes),
            runtime,
            shutdown_tx,
            feeder,
            services,
            renders,
            ws_connections,
            documents,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serve until `stop` resolves, then stop the runtime and the bus gracefully.
    pub async fn run_until(
        self,
        stop: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        tracing::info!(addr = %self.addr, "listening; GraphiQL at http://{}/graphql", self.addr);
        axum::serve(no_delay(self.listener), self.router)
            .with_graceful_shutdown(stop)
            .await?;
        if let Some(rt) = self.runtime {
            rt.shutdown().await;
        }
        let _ = self.shutdown_tx.send(true);
        let _ = self.feeder.await;
        // Bounded: a writer left over from a WebSocket the server no longer tracks could hold
        // the write turn, and an emptying checkpoint waits for readers.
        match tokio::time::timeout(CLOSE_TIMEOUT, self.services.store.close()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = ?e, "closing the store failed"),
            Err(_) => tracing::warn!("closing the store took too long; stopping without it"),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::serve::Listener as _;

    #[tokio::test]
    async fn accepted_connections_do_not_wait_for_acks() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut listener = no_delay(listener);
        let _client = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (accepted, _) = listener.accept().await;
        assert!(accepted.nodelay().expect("nodelay"), "TCP_NODELAY is set");
    }
}
