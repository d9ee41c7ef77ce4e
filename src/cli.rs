//! Command line: serve | migrate | export-schema | check-profiles | rebuild-projections |
//! seed-history.

use crate::config::Config;
use crate::error::AppError;
use crate::startup::{self, Application};
use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(
    name = "vm-workflow",
    version,
    about = "Event-sourced workflow server with a GraphQL API"
)]
pub struct Cli {
    #[command(flatten)]
    pub config: Config,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run migrations, then serve GraphQL and execute runs.
    Serve,
    /// Run the database migrations and exit.
    Migrate,
    /// Print the GraphQL SDL (or write it to a file).
    ExportSchema {
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
    /// Validate a profiles file (default: the configured one) and exit.
    CheckProfiles {
        #[arg(long)]
        path: Option<PathBuf>,
    },
    /// Replay the event log into empty read models.
    RebuildProjections,
    /// Benchmarks: append at least `--events` events of completed runs (fast, batched), so a
    /// server can be measured on a database with a long history. Run it with no server running.
    SeedHistory {
        /// Events to write (at least; whole runs are written).
        #[arg(long, default_value_t = 1_000_000)]
        events: u64,
        /// Threads the runs are spread over.
        #[arg(long, default_value_t = 100)]
        threads: usize,
        /// Runs per transaction.
        #[arg(long, default_value_t = 500)]
        runs_per_tx: usize,
        /// The requested mode of the seeded runs.
        #[arg(long, default_value = "content_calendar")]
        mode: String,
    },
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let Cli {
        mut config,
        command,
    } = cli;
    crate::telemetry::init(config.log_format);
    match command {
        Command::Serve => {
            let app = Application::build(config).await?;
            app.run_until(shutdown_signal()).await
        }
        Command::Migrate => {
            startup::connect_store(&config).await?;
            println!("migrations applied");
            Ok(())
        }
        Command::ExportSchema { output } => {
            let sdl = crate::graphql::export_sdl();
            match output {
                Some(path) => std::fs::write(&path, sdl)?,
                None => print!("{sdl}"),
            }
            Ok(())
        }
        Command::CheckProfiles { path } => {
            if path.is_some() {
                config.profiles_path = path;
            }
            let set = startup::load_profiles(&config)?;
            let modes: Vec<&str> = set.profiles.iter().map(|p| p.mode.as_str()).collect();
            println!(
                "profiles ok: version {}, modes {}",
                set.version,
                modes.join(", ")
            );
            Ok(())
        }
        Command::RebuildProjections => {
            let store = startup::connect_store(&config).await?;
            let n = store
                .rebuild_projections()
                .await
                .map_err(AppError::into_anyhow)?;
            store.close().await.map_err(AppError::into_anyhow)?;
            println!("rebuilt read models from {n} events");
            Ok(())
        }
        Command::SeedHistory {
            events,
            threads,
            runs_per_tx,
            mode,
        } => seed_history(&config, events, threads, runs_per_tx, &mode).await,
    }
}

async fn seed_history(
    config: &Config,
    events: u64,
    threads: usize,
    runs_per_tx: usize,
    mode: &str,
) -> anyhow::Result<()> {
    use crate::domain::profiles::SkillOverrides;
    use std::sync::Arc;
    let started = std::time::Instant::now();
    let profiles = Arc::new(startup::load_profiles(config)?);
    let store = startup::connect_store(config).await?;
    let services = crate::service::Services::new(
        store.clone(),
        profiles,
        startup::settings(config),
        crate::runner::artifacts::ArtifactStore::new(&config.data_dir),
    );
    let plan = services
        .preview(mode, &SkillOverrides::default())
        .map_err(AppError::into_anyhow)?;
    let threads = crate::store::seed::create_workspace(&services, threads)
        .await
        .map_err(AppError::into_anyhow)?;
    let mut last_print = std::time::Instant::now();
    let report = store
        .seed_completed_runs(&plan, &threads, events, runs_per_tx, |r| {
            if last_print.elapsed().as_secs() >= 2 {
                last_print = std::time::Instant::now();
                eprintln!(
                    "  {} events, {} runs, {:.1} s",
                    r.events,
                    r.runs,
                    started.elapsed().as_secs_f64()
                );
            }
        })
        .await
        .map_err(AppError::into_anyhow)?;
    let head = store.head_sequence().await.map_err(AppError::into_anyhow)?;
    store.close().await.map_err(AppError::into_anyhow)?;
    let secs = started.elapsed().as_secs_f64();
    println!(
        "seeded {} events ({} completed runs on {} threads) in {secs:.1} s ({:.0} events/s); the log now holds {head} events",
        report.events,
        report.runs,
        threads.len(),
        report.events as f64 / secs
    );
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            s.recv().await;
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutting down");
}
