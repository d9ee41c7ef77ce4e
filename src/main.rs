use clap::Parser;

/// mimalloc instead of glibc's allocator: the server allocates and frees small buffers on two
/// kinds of threads (tokio's and sqlx's SQLite workers); glibc's malloc/free/consolidate were
/// ~12 % of its CPU under load (BENCHMARKS.md, "One writer connection, and mimalloc"). Built
/// without transparent huge pages (Cargo.toml): a first touch of memory zeroes 4 KiB, not 2 MiB.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = vm_workflow::cli::Cli::parse();
    match vm_workflow::cli::run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
