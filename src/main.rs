use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use switchboard::config::{Config, ServeOptions};
use tracing_subscriber::EnvFilter;

/// Switchboard: WebRTC rooms, peer to peer first, through the server when needed.
#[derive(Parser)]
#[command(name = "switchboard", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server (signaling, browser client, metrics).
    ///
    /// Every option can also be set with its SWITCHBOARD_* environment
    /// variable or in a TOML file given with --config (keys are the option
    /// names with underscores, e.g. max_rooms = 500). Flags beat the
    /// environment, which beats the file, which beats the defaults.
    Serve {
        /// TOML file with options
        #[arg(long, env = "SWITCHBOARD_CONFIG", value_name = "FILE")]
        config: Option<PathBuf>,
        #[command(flatten)]
        options: ServeOptions,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { config, options } => {
            let options = match config {
                Some(path) => match ServeOptions::from_file(&path) {
                    Ok(file) => options.or(file),
                    Err(e) => return fail(&e),
                },
                None => options,
            };
            let config = match Config::resolve(options) {
                Ok(c) => c,
                Err(e) => return fail(&e),
            };
            init_logging(&config);
            let runtime = match tokio::runtime::Runtime::new() {
                Ok(r) => r,
                Err(e) => return fail(&e),
            };
            match runtime.block_on(serve(config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %e, "server failed");
                    fail(&e)
                }
            }
        }
    }
}

async fn serve(config: Config) -> Result<(), switchboard::server::ServeError> {
    // Handlers first: a signal that arrives once we have said we listen
    // must drain, not kill.
    let mut signals = Signals::new();
    let server = switchboard::server::start(config).await?;
    println!("switchboard listening on {}", server.http_url());
    let handle = server.handle();
    tokio::spawn(async move {
        // The first signal drains; a second one closes at once.
        let signal = signals.next().await;
        handle.drain();
        tracing::info!(signal, "draining; send the signal again to close at once");
        let signal = signals.next().await;
        handle.shutdown();
        tracing::info!(signal, "shutting down now");
    });
    server.wait().await
}

/// SIGINT and SIGTERM, registered once so none is missed between waits.
struct Signals {
    int: Option<tokio::signal::unix::Signal>,
    term: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    fn new() -> Signals {
        use tokio::signal::unix::{signal, SignalKind};
        Signals {
            int: signal(SignalKind::interrupt()).ok(),
            term: signal(SignalKind::terminate()).ok(),
        }
    }

    /// Waits for the next SIGINT or SIGTERM; returns its name.
    async fn next(&mut self) -> &'static str {
        async fn recv(s: &mut Option<tokio::signal::unix::Signal>) {
            match s {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending().await,
            }
        }
        tokio::select! {
            () = recv(&mut self.int) => "SIGINT",
            () = recv(&mut self.term) => "SIGTERM",
        }
    }
}

fn init_logging(config: &Config) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.log.filter))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    // A log line that cannot be written (stderr is a closed pipe) is lost,
    // never a panic: the default reports it with eprintln!, which panics on
    // that same broken stderr and took the signal handler down with it.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .log_internal_errors(false);
    if config.log.json {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn fail(e: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("switchboard: {e}");
    ExitCode::FAILURE
}
