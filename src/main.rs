//! The `tollgate` command: `serve`, `check`, `explain` and `healthcheck`.
#![deny(unsafe_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tokio::signal::unix::{SignalKind, signal};
use tollgate::config::{LogFormat, Problem, Secrets};
use tollgate::health::LiveState;
use tollgate::pipeline::admit::ExplainRequest;
use tollgate::server::GatewayOptions;
use tollgate::state::{AppState, Snapshot};

const DEFAULT_CONFIG: &str = "config/tollgate.toml";

// jemalloc rather than glibc's malloc. Each open stream holds hyper's fixed
// per-connection buffers, mostly untouched; jemalloc keeps their untouched
// pages out of memory and hands memory back after a spike of open streams,
// where glibc's malloc keeps it, and it costs less CPU per request. Its
// background thread (the `background_threads` feature) returns freed pages
// on schedule even to a gateway gone quiet, which allocates nothing that
// would make jemalloc purge them, and does it off the request path.
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    name = "tollgate",
    version,
    about = "An OpenAI-compatible gateway for Llama backends"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Serve {
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Overrides `server.listen` from the config.
        #[arg(long)]
        listen: Option<SocketAddr>,
    },
    /// Validate a config file and print every problem in it, and warnings
    /// for what is valid but probably wrong; with `--diff OLD NEW`,
    /// validate both and print what changes between them.
    Check {
        #[arg(long, default_value = DEFAULT_CONFIG, conflicts_with = "diff")]
        config: PathBuf,
        #[arg(long, num_args = 2, value_names = ["OLD", "NEW"])]
        diff: Option<Vec<PathBuf>>,
        /// Do not require the environment variables the config names
        /// (for CI without production secrets); only their names are checked.
        #[arg(long)]
        offline: bool,
        /// Fail (exit 1) on warnings too.
        #[arg(long)]
        strict: bool,
    },
    /// Print, as JSON, how a request would be routed: every deployment of
    /// its model, kept or dropped and why, and the one chosen. Live state
    /// (latency, load, circuits) is that of a gateway just started; `POST
    /// /admin/explain` asks a running one. Secrets need not be set.
    Explain {
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// A request body, as a client would send it.
        #[arg(long)]
        request: PathBuf,
        /// The API the body is written for (by default told by its
        /// members: `messages` chat, `prompt` completions, `input`
        /// embeddings).
        #[arg(long, value_parser = ["chat", "completions", "embeddings", "messages", "responses"])]
        api: Option<String>,
        /// The request's region (default: the key's, then the policy's).
        #[arg(long)]
        region: Option<String>,
        /// The name of the key the request would come with.
        #[arg(long)]
        key: Option<String>,
        /// The request's session, as its `x-session-id` header would give.
        #[arg(long)]
        session: Option<String>,
    },
    /// Print what a traffic profile would cost under the config: each
    /// deployment policy allows, the alias's strategy, all on the API, all
    /// self-hosted, and where self-hosting breaks even (docs/economics.md).
    Simulate {
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// The traffic per alias and the fixed costs (TOML); with
        /// `--from-ledger`, only its `days`, `max_utilisation` and fixed
        /// costs are read.
        #[arg(long, required_unless_present = "from_ledger")]
        profile: Option<PathBuf>,
        /// Take the traffic from the ledger's last DAYS days instead.
        #[arg(long, value_name = "DAYS")]
        from_ledger: Option<u32>,
        /// Print JSON rather than a table.
        #[arg(long)]
        json: bool,
    },
    /// Print, as JSON, the Llama licence's evidence per calendar month
    /// (UTC) from the ledger: the monthly active users of Llama
    /// deployments, what each licence served, the EU multimodal refusals.
    LicenceReport {
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// One month, as YYYY-MM (default: every month the ledger holds).
        #[arg(long, value_parser = tollgate::licence::parse_month)]
        month: Option<String>,
    },
    /// Exit 0 if the gateway answers `GET /healthz` with 200 within two
    /// seconds, else print why and exit 1: a container health check that
    /// needs no curl or shell in the image.
    Healthcheck {
        /// The address the gateway listens on, as given to `serve
        /// --listen`; an unspecified one (0.0.0.0, [::]) is checked on
        /// loopback.
        #[arg(long, default_value = tollgate::config::DEFAULT_LISTEN)]
        listen: SocketAddr,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // `serve` logs as its config says; the other commands print, and log
    // as text. Dropping the guard writes the lines still queued.
    let text_logs = || tollgate::logging::install(LogFormat::Text);
    match cli.command {
        Command::Serve { config, listen } => serve(&config, listen),
        Command::Check {
            diff: Some(paths),
            offline,
            ..
        } => {
            let _logs = text_logs();
            check_diff(&paths[0], &paths[1], secrets(offline))
        }
        Command::Check {
            config,
            diff: None,
            offline,
            strict,
        } => {
            let _logs = text_logs();
            check(&config, secrets(offline), strict)
        }
        Command::Explain {
            config,
            request,
            api,
            region,
            key,
            session,
        } => {
            let _logs = text_logs();
            explain(&config, &request, api, region, key, session)
        }
        Command::Simulate {
            config,
            profile,
            from_ledger,
            json,
        } => {
            let _logs = text_logs();
            simulate(&config, profile.as_deref(), from_ledger, json)
        }
        Command::LicenceReport { config, month } => {
            let _logs = text_logs();
            licence_report(&config, month.as_deref())
        }
        Command::Healthcheck { listen } => healthcheck(listen),
    }
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

fn secrets(offline: bool) -> Secrets<'static> {
    if offline {
        Secrets::Unread
    } else {
        Secrets::Read(&env)
    }
}

fn load(path: &std::path::Path, secrets: Secrets<'_>) -> Option<tollgate::config::Config> {
    tollgate::config::load(path, secrets)
        .map_err(|problems| report(path, &problems.0))
        .ok()
}

fn report(path: &std::path::Path, problems: &[Problem]) {
    eprintln!("{}: {} problem(s):", path.display(), problems.len());
    for problem in problems {
        eprintln!("  {problem}");
    }
}

/// Problems go to stderr and fail; warnings go there too, and fail only
/// with `strict`.
fn check(path: &std::path::Path, secrets: Secrets<'_>, strict: bool) -> ExitCode {
    let loaded = tollgate::config::read(path).and_then(|text| {
        let config = tollgate::config::parse_with(&text, secrets)?;
        Ok((text, config))
    });
    let (text, config) = match loaded {
        Ok(loaded) => loaded,
        Err(problems) => {
            report(path, &problems.0);
            return ExitCode::FAILURE;
        }
    };
    // What `serve` refuses on the file's own address, and, on the machine
    // that serves (so not offline), the ledger it could not write.
    let mut problems: Vec<Problem> =
        tollgate::config::open_to_network(&config, config.server.listen)
            .into_iter()
            .collect();
    if !config.offline {
        problems.extend(tollgate::ledger::unwritable(&config.ledger));
    }
    if !problems.is_empty() {
        tollgate::config::locate(&text, &mut problems);
        report(path, &problems);
        return ExitCode::FAILURE;
    }
    for warning in &config.warnings {
        eprintln!("warning: {warning}");
    }
    let deployments: usize = config.models.iter().map(|m| m.deployments.len()).sum();
    println!(
        "{}: ok ({} backends, {} models, {} deployments, {} keys)",
        path.display(),
        config.backends.len(),
        config.models.len(),
        deployments,
        config.keys.len()
    );
    if strict && !config.warnings.is_empty() {
        eprintln!(
            "{}: {} warning(s), and --strict fails on warnings",
            path.display(),
            config.warnings.len()
        );
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

/// `check --diff OLD NEW`: both must be valid; the diff goes to stdout
/// as JSON.
fn check_diff(old: &std::path::Path, new: &std::path::Path, secrets: Secrets<'_>) -> ExitCode {
    let (Some(old), Some(new)) = (load(old, secrets), load(new, secrets)) else {
        return ExitCode::FAILURE;
    };
    let diff = tollgate::config::diff(&old, &new);
    println!(
        "{}",
        serde_json::to_string_pretty(&diff).expect("diffs serialise")
    );
    ExitCode::SUCCESS
}

fn explain(
    path: &std::path::Path,
    request: &std::path::Path,
    api: Option<String>,
    region: Option<String>,
    key: Option<String>,
    session: Option<String>,
) -> ExitCode {
    // Explaining sends nothing upstream: the secrets are not needed.
    let Some(config) = load(path, Secrets::Unread) else {
        return ExitCode::FAILURE;
    };
    let request = match std::fs::read(request)
        .map_err(|e| e.to_string())
        .and_then(|bytes| serde_json::from_slice(&bytes).map_err(|e| e.to_string()))
    {
        Ok(request) => request,
        Err(e) => {
            eprintln!("cannot read the request {}: {e}", request.display());
            return ExitCode::FAILURE;
        }
    };
    let snapshot = match Snapshot::build(config, &LiveState::default()) {
        Ok(snapshot) => snapshot,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let ask = ExplainRequest {
        request,
        // One of the values clap allows, each a variant's name.
        api: api.map(|api| serde_json::from_value(api.into()).expect("a known API")),
        region,
        key,
        session,
    };
    match tollgate::pipeline::admit::explain(&snapshot, &ask) {
        Ok(explained) => {
            let json = serde_json::to_string_pretty(&explained).expect("plans serialise");
            println!("{json}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{}", e.message());
            ExitCode::FAILURE
        }
    }
}

fn simulate(
    path: &std::path::Path,
    profile: Option<&std::path::Path>,
    from_ledger: Option<u32>,
    json: bool,
) -> ExitCode {
    let config = if from_ledger.is_some() {
        load_for_ledger(path)
    } else {
        // Nothing is sent anywhere: the secrets are not needed.
        load(path, Secrets::Unread)
    };
    let Some(config) = config else {
        return ExitCode::FAILURE;
    };
    let text = match profile.map(std::fs::read_to_string).transpose() {
        Ok(text) => text.unwrap_or_default(),
        Err(e) => {
            let path = profile.map(|p| p.display().to_string()).unwrap_or_default();
            eprintln!("cannot read the profile {path}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let profile_name = profile.map_or_else(|| "the profile".into(), |p| p.display().to_string());
    let mut profile = match tollgate::economics::Profile::parse(&text, &config) {
        Ok(profile) => profile,
        Err(problems) => {
            eprintln!("{profile_name}: {} problem(s):", problems.len());
            for problem in problems {
                eprintln!("  {problem}");
            }
            return ExitCode::FAILURE;
        }
    };
    if let Some(days) = from_ledger {
        if !profile.traffic.is_empty() {
            eprintln!(
                "{profile_name}: --from-ledger takes the traffic from the ledger; remove the profile's [[traffic]] tables"
            );
            return ExitCode::FAILURE;
        }
        let traffic = current_thread()
            .map_err(|e| e.to_string())
            .and_then(|runtime| runtime.block_on(tollgate::economics::from_ledger(&config, days)));
        match traffic {
            Ok(traffic) => profile.traffic = traffic,
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let simulation = tollgate::economics::simulate(&config, &profile);
    if json {
        let json = serde_json::to_string_pretty(&simulation).expect("simulations serialise");
        println!("{json}");
    } else {
        print!("{simulation}");
    }
    ExitCode::SUCCESS
}

/// A runtime for a command that reads the ledger once.
fn current_thread() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

/// A config for a command that reads its ledger and sends nothing else
/// anywhere: of its secrets, only the ledger's PostgreSQL URL is read,
/// from the variable `[ledger] url_env` names.
fn load_for_ledger(path: &std::path::Path) -> Option<tollgate::config::Config> {
    use tollgate::config::{LedgerBackend, Secret};
    let mut config = load(path, Secrets::Unread)?;
    if let LedgerBackend::Postgres { url: url @ None } = &mut config.ledger.backend {
        let var = config.document["ledger"]["url_env"]
            .as_str()
            .unwrap_or_default();
        match env(var).filter(|value| !value.trim().is_empty()) {
            Some(value) => *url = Some(Secret::new(value.trim().to_owned())),
            None => {
                eprintln!(
                    "{}: ledger.url_env: environment variable {var} is not set (or is empty)",
                    path.display()
                );
                return None;
            }
        }
    }
    Some(config)
}

fn licence_report(path: &std::path::Path, month: Option<&str>) -> ExitCode {
    let Some(config) = load_for_ledger(path) else {
        return ExitCode::FAILURE;
    };
    let months = current_thread()
        .map_err(|e| e.to_string())
        .and_then(|runtime| {
            runtime.block_on(async {
                let mut reader = tollgate::ledger::Reader::open(&config.ledger).await?;
                reader.licence_months(month).await
            })
        });
    match months {
        Ok(mut months) => {
            if let Some(month) = month.filter(|_| months.is_empty()) {
                months.push(tollgate::ledger::LicenceMonth {
                    month: month.to_owned(),
                    ..Default::default()
                });
            }
            let report = tollgate::licence::Report::new(months, &config.licence);
            let json = serde_json::to_string_pretty(&report).expect("reports serialise");
            println!("{json}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn healthcheck(listen: SocketAddr) -> ExitCode {
    let mut addr = listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            SocketAddr::V4(_) => Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => Ipv6Addr::LOCALHOST.into(),
        });
    }
    match healthz_status(addr) {
        Ok(status) if status == "200" => ExitCode::SUCCESS,
        Ok(status) => {
            eprintln!("GET http://{addr}/healthz: HTTP {status}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("GET http://{addr}/healthz: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The status code of `GET /healthz` at `addr`, from the first line of
/// the answer; every step bounded, so a stuck gateway fails the check.
fn healthz_status(addr: SocketAddr) -> std::io::Result<String> {
    const TIMEOUT: Duration = Duration::from_secs(2);
    let mut stream = TcpStream::connect_timeout(&addr, TIMEOUT)?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.set_write_timeout(Some(TIMEOUT))?;
    let request = format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes())?;
    let mut line = String::new();
    BufReader::new(stream.take(256)).read_line(&mut line)?;
    // "HTTP/1.1 200 OK"
    line.split(' ')
        .nth(1)
        .map(str::to_owned)
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP answer: {line:?}")))
}

/// The async runtime for `serve`. With one CPU to run on (a pinned process,
/// or a container's CPU quota), a work-stealing scheduler has no one to
/// steal for, and its hand-offs cost about a quarter of a streamed
/// request's CPU: then everything runs on one thread.
/// `TOKIO_WORKER_THREADS` still picks the work-stealing scheduler's size,
/// whatever the CPU count.
fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    if cpus == 1 && std::env::var_os("TOKIO_WORKER_THREADS").is_none() {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Runtime::new()
    }
}

fn serve(path: &std::path::Path, listen: Option<SocketAddr>) -> ExitCode {
    let Some(mut config) = load(path, Secrets::Read(&env)) else {
        eprintln!("refusing to start on an invalid config");
        return ExitCode::FAILURE;
    };
    if let Some(listen) = listen {
        config.server.listen = listen;
    }
    if let Some(problem) = tollgate::config::open_to_network(&config, config.server.listen) {
        eprintln!("refusing to start: {problem}");
        return ExitCode::FAILURE;
    }
    // Log lines are buffered and written by a thread of their own, so a
    // request never waits on stderr; dropped last, this writes the rest.
    let _flush_logs = tollgate::logging::install(config.logging);
    let runtime = match runtime() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let addr = config.server.listen;
        if config.keys.is_empty() {
            tracing::warn!("no [[keys]] configured: anyone who can reach the gateway may use it");
        }
        let options = GatewayOptions {
            config_file: Some(path.to_owned()),
            ..GatewayOptions::default()
        };
        let gateway = match tollgate::Gateway::with_options(config, options) {
            Ok(gateway) => gateway,
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::FAILURE;
            }
        };
        let listener = match tollgate::server::bind(addr) {
            Ok(listener) => listener,
            Err(e) => {
                eprintln!("cannot listen on {addr}: {e}");
                return ExitCode::FAILURE;
            }
        };
        let bound = listener
            .local_addr()
            .map_or_else(|_| addr.to_string(), |a| a.to_string());
        let threads = tokio::runtime::Handle::current().metrics().num_workers();
        tracing::info!(addr = %bound, config = %path.display(), threads, "tollgate listening");
        tokio::spawn(reload_on_sighup(gateway.state()));
        match gateway.serve(listener, stop_signal()).await {
            Ok(()) => {
                tracing::info!("stopped");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("server error: {e}");
                ExitCode::FAILURE
            }
        }
    })
}

/// SIGHUP: read the config file again and swap it in if it is valid.
async fn reload_on_sighup(state: std::sync::Arc<AppState>) {
    let Ok(mut hangup) = signal(SignalKind::hangup()) else {
        tracing::error!("cannot install the SIGHUP handler; reload with POST /admin/reload");
        return;
    };
    while hangup.recv().await.is_some() {
        tracing::info!("SIGHUP received: reloading the config file");
        let state = state.clone();
        let _ = tokio::task::spawn_blocking(move || state.reload_file(true)).await;
    }
}

/// SIGTERM or SIGINT: stop accepting and drain.
async fn stop_signal() {
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop the process with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}
