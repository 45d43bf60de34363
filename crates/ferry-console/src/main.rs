//! `ferry-console`: serves the web console, or manages its users.

use std::io::BufRead;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use ferry_console::alerts::delivery::WebhookAllow;
use ferry_console::alerts::Alerter;
use ferry_console::config::Config;
use ferry_console::hosts::Poller;
use ferry_console::store::Store;
use ferry_console::web::{self, AppState};
use ferry_console::{auth, config};

#[derive(Parser)]
#[command(
    name = "ferry-console",
    version,
    about = "One web console and replication monitor for many ferryd hosts"
)]
struct Cli {
    /// The config file.
    #[arg(
        long,
        default_value = "/etc/ferry/console.toml",
        env = "FERRY_CONSOLE_CONFIG"
    )]
    config: PathBuf,
    /// Log lines as `text` (for people) or `json` (one object a line, for log collectors).
    #[arg(long, default_value = "text", env = "FERRY_LOG_FORMAT")]
    log_format: String,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve the console (the default).
    Serve,
    /// Create a user or set its password; the password is read from stdin (one line).
    SetPassword {
        /// The user name.
        user: String,
    },
    /// Hidden: `completions SHELL` and `man DIR`, for packaging.
    #[command(flatten)]
    Docs(ferry_docgen::DocsCmd),
}

fn main() -> ExitCode {
    // The console's store, logs and screenshots belong to it alone.
    // SAFETY: umask(2) only changes this process's file-creation mask.
    unsafe { libc::umask(0o077) };
    let cli = Cli::parse();
    if let Err(e) = init_logging(&cli.log_format) {
        eprintln!("ferry-console: error: {e}");
        return ExitCode::from(2);
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferry-console: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    if let Some(Cmd::Docs(docs)) = &cli.cmd {
        return Ok(ferry_docgen::run(
            <Cli as clap::CommandFactory>::command(),
            docs,
        )?);
    }
    let config = Config::load(&cli.config)?;
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create {}", config.data_dir.display()))?;
    // The store holds host tokens and the SMTP password: only the console's user reads it.
    std::fs::set_permissions(
        &config.data_dir,
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .with_context(|| format!("cannot restrict {}", config.data_dir.display()))?;
    let store = Arc::new(Store::open(&config.data_dir)?);
    match cli.cmd.unwrap_or(Cmd::Serve) {
        Cmd::SetPassword { user } => {
            if user.is_empty() || user.len() > 64 || user.chars().any(char::is_control) {
                bail!("user name {user:?}: use 1 to 64 printable characters");
            }
            let mut line = String::new();
            std::io::stdin().lock().read_line(&mut line)?;
            let password = line.trim_end_matches(['\r', '\n']);
            if password.chars().count() < 8 {
                bail!("the password must have at least 8 characters");
            }
            store.set_user(&user, &auth::hash_password(password))?;
            // A new password ends the old sessions: a stolen cookie or a browser left
            // signed in is why passwords get changed.
            let ended = store.delete_user_sessions(&user)?;
            println!("password of {user} set; {ended} session(s) ended");
            Ok(())
        }
        Cmd::Serve => serve(config, store),
        Cmd::Docs(_) => unreachable!("handled above"),
    }
}

fn serve(config: Config, store: Arc<Store>) -> anyhow::Result<()> {
    if config.auth == config::AuthMode::Password && store.user_count()? == 0 {
        bail!("no users yet: create one with `ferry-console --config FILE set-password NAME` (password on stdin)");
    }
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let webhook_allow = WebhookAllow(config.webhook_allow.clone());
        let alerter = Arc::new(Alerter::new(store.clone(), webhook_allow.clone()));
        let poller = Arc::new(Poller::new(store.clone(), alerter, config.poll_interval));
        tokio::spawn(poller.clone().run());
        let state = Arc::new(AppState {
            store,
            novnc_dir: config.novnc_dir.clone(),
            poller,
            auth: config.auth.clone(),
            access: web::Access::from_config(&config),
            webhook_allow,
        });
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        tracing::info!("ferry-console listening on http://{}", config.listen);
        // The peer's address decides whether proxy headers are believed.
        let app = web::router(state).into_make_service_with_connect_info::<std::net::SocketAddr>();
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await?;
        Ok(())
    })
}

fn init_logging(format: &str) -> Result<(), String> {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        "text" => fmt.with_ansi(ansi).init(),
        "json" => fmt
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .init(),
        other => return Err(format!("unknown --log-format {other:?}: use text or json")),
    }
    Ok(())
}
