//! Command line: serve | migrate | export-schema | check-profiles | rebuild-projections.

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
            println!("rebuilt read models from {n} events");
            Ok(())
        }
    }
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
