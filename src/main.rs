use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use switchboard::auth::{Claims, Keys, VideoGrant};
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
        options: Box<ServeOptions>,
    },
    /// Print an access token for joining a room (signed with the same keys
    /// `serve` uses: --api-key/--api-secret, --keys-file, their
    /// SWITCHBOARD_* variables, or the --config file).
    Token(TokenArgs),
}

#[derive(clap::Args)]
struct TokenArgs {
    /// TOML file with options (its api_key/api_secret/keys_file are used)
    #[arg(long, env = "SWITCHBOARD_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    #[arg(long, env = "SWITCHBOARD_API_KEY", value_name = "KEY")]
    api_key: Option<String>,
    #[arg(
        long,
        env = "SWITCHBOARD_API_SECRET",
        value_name = "SECRET",
        hide_env_values = true
    )]
    api_secret: Option<String>,
    #[arg(long, env = "SWITCHBOARD_KEYS_FILE", value_name = "FILE")]
    keys_file: Option<PathBuf>,
    /// Room the token admits to (empty with --admin: every room)
    #[arg(long, default_value = "")]
    room: String,
    /// Identity of the participant (the JWT `sub`)
    #[arg(long)]
    identity: String,
    /// Display name (overrides the join's name)
    #[arg(long)]
    name: Option<String>,
    /// Lifetime, e.g. 90s, 30m, 6h, 2d
    #[arg(long, default_value = "6h", value_parser = parse_ttl)]
    ttl: u64,
    #[arg(long, value_name = "BOOL")]
    can_publish: Option<bool>,
    #[arg(long, value_name = "BOOL")]
    can_subscribe: Option<bool>,
    #[arg(long, value_name = "BOOL")]
    can_publish_data: Option<bool>,
    /// Invisible to the others; cannot publish
    #[arg(long)]
    hidden: bool,
    /// Also grant roomAdmin, roomCreate and roomList
    #[arg(long)]
    admin: bool,
}

/// `90s`, `30m`, `6h`, `2d` or plain seconds.
fn parse_ttl(s: &str) -> Result<u64, String> {
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num.parse().map_err(|_| format!("bad duration {s:?}"))?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("bad duration unit in {s:?} (s, m, h or d)")),
    };
    n.checked_mul(mult)
        .filter(|&t| t > 0)
        .ok_or_else(|| format!("bad duration {s:?}"))
}

fn token(args: TokenArgs) -> Result<String, String> {
    let file = match &args.config {
        Some(path) => ServeOptions::from_file(path).map_err(|e| e.to_string())?,
        None => ServeOptions::default(),
    };
    let api_key = args.api_key.or(file.api_key);
    let api_secret = args.api_secret.or(file.api_secret);
    let keys_file = args.keys_file.or(file.keys_file);
    let keys = Keys::load(
        api_key.as_deref(),
        api_secret.as_deref(),
        keys_file.as_deref(),
    )
    .map_err(|e| e.to_string())?;
    if keys.is_empty() {
        return Err("no API key: give --api-key and --api-secret, or --keys-file".to_owned());
    }
    if args.identity.is_empty() || args.identity.chars().count() > 128 {
        return Err("--identity must be 1-128 characters".to_owned());
    }
    if args.room.is_empty() && !args.admin {
        return Err("--room is required (or --admin for a token over every room)".to_owned());
    }
    let now = switchboard::auth::unix_now();
    let claims = Claims {
        sub: args.identity,
        name: args.name,
        nbf: Some(now),
        exp: now + args.ttl,
        video: VideoGrant {
            room: (!args.room.is_empty()).then_some(args.room),
            room_join: true,
            can_publish: args.can_publish,
            can_subscribe: args.can_subscribe,
            can_publish_data: args.can_publish_data,
            hidden: args.hidden,
            room_admin: args.admin,
            room_create: args.admin,
            room_list: args.admin,
        },
        ..Default::default()
    };
    keys.sign(claims).map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Token(args) => match token(args) {
            Ok(t) => {
                println!("{t}");
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e),
        },
        Command::Serve { config, options } => {
            let options = *options;
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
