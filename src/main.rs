use clap::Parser;

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
