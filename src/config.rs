//! Typed configuration from flags and environment (SPEC §9).

use clap::{Args, ValueEnum};
use std::path::PathBuf;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Args)]
pub struct Config {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, env = "VM_BIND", default_value = "127.0.0.1:8766")]
    pub bind: String,
    /// Database URL: `sqlite://…` or `postgres://…`; default: a SQLite file in the data dir.
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: Option<String>,
    /// Data directory (SQLite file, run artifacts).
    #[arg(long, env = "VM_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,
    /// Workflow profiles file; default: the profiles shipped in the binary.
    #[arg(long, env = "VM_PROFILES_PATH")]
    pub profiles_path: Option<PathBuf>,
    /// Run every mode as the foundation mode.
    #[arg(long, env = "VM_WORKFLOW_FORCE_FOUNDATION_FALLBACK", default_value_t = true, action = clap::ArgAction::Set)]
    pub force_foundation_fallback: bool,
    /// The fallback (and forced) mode.
    #[arg(
        long,
        env = "VM_WORKFLOW_FOUNDATION_MODE",
        default_value = "foundation_stack"
    )]
    pub foundation_mode: String,
    /// Runs executed in parallel by this process (0 disables the runtime).
    #[arg(long, env = "VM_WORKERS", default_value_t = 8)]
    pub workers: usize,
    /// Lease on a claimed run; another worker takes the run over when it expires.
    #[arg(long, env = "VM_RUN_LEASE_SECONDS", default_value_t = 30.0)]
    pub lease_seconds: f64,
    /// Fault injection for tests and demos: `<stage_key>=<fault>,…` (off by default).
    #[arg(long, env = "VM_FAULT_INJECTION")]
    pub fault_injection: Option<String>,
    /// Seconds a WebSocket client has to send `connection_init`.
    #[arg(long, env = "VM_WS_INIT_TIMEOUT_SECONDS", default_value_t = 10)]
    pub ws_init_timeout_seconds: u64,
    /// Seconds between server pings on an idle WebSocket (`ping` / legacy `ka`).
    #[arg(long, env = "VM_WS_PING_INTERVAL_SECONDS", default_value_t = 15)]
    pub ws_ping_interval_seconds: u64,
    /// Seconds a write to a WebSocket may take before the connection is closed: a client that
    /// stops reading would otherwise hold its connection and task for ever.
    #[arg(long, env = "VM_WS_WRITE_TIMEOUT_SECONDS", default_value_t = 30)]
    pub ws_write_timeout_seconds: u64,
    /// Active subscriptions allowed on one WebSocket connection.
    #[arg(long, env = "VM_WS_MAX_OPERATIONS", default_value_t = 100)]
    pub ws_max_operations: usize,
    /// Largest accepted request body.
    #[arg(long, env = "VM_MAX_BODY_BYTES", default_value_t = 1_048_576)]
    pub max_body_bytes: usize,
    /// Database pool size.
    #[arg(long, env = "VM_DB_MAX_CONNECTIONS", default_value_t = 16)]
    pub db_max_connections: u32,
    /// Log format.
    #[arg(long, env = "VM_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

impl Config {
    pub fn database_url(&self) -> String {
        match &self.database_url {
            Some(url) if !url.trim().is_empty() => url.clone(),
            _ => format!(
                "sqlite://{}?mode=rwc",
                self.data_dir.join("vm-workflow.sqlite3").display()
            ),
        }
    }

    /// Defaults for embedding (tests): everything as the environment-free CLI would set it.
    pub fn for_data_dir(data_dir: PathBuf) -> Config {
        Config {
            bind: "127.0.0.1:0".into(),
            database_url: None,
            data_dir,
            profiles_path: None,
            force_foundation_fallback: true,
            foundation_mode: "foundation_stack".into(),
            workers: 4,
            lease_seconds: 30.0,
            fault_injection: None,
            ws_init_timeout_seconds: 10,
            ws_ping_interval_seconds: 15,
            ws_write_timeout_seconds: 30,
            ws_max_operations: 100,
            max_body_bytes: 1_048_576,
            db_max_connections: 16,
            log_format: LogFormat::Text,
        }
    }
}
