//! The `apilb` command: argument parsing, logging set-up and exit codes (SPEC §1).
//!
//! No gateway logic lives here: each subcommand calls into the library and maps its result
//! to an exit code: 0 success, 1 runtime failure, 2 invalid config or arguments.

use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use apilb::config::{self, Config};

#[derive(Debug, Parser)]
#[command(
    name = "apilb",
    version = concat!(env!("CARGO_PKG_VERSION"), " (", env!("APILB_GIT_COMMIT"), ")"),
    about = "Layer-4 / TLS-passthrough load balancer for Kubernetes API servers"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log line format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Log filter: a level (error, warn, info, debug, trace) or tracing directives.
    #[arg(long, global = true, env = "RUST_LOG", default_value = "info")]
    log_level: String,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Output {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway.
    Run {
        /// The configuration file.
        #[arg(long, default_value = "/etc/apilb/apilb.toml")]
        config: PathBuf,
        /// Worker threads for the data path (default: the number of cores).
        #[arg(long)]
        threads: Option<NonZeroUsize>,
    },
    /// Validate a configuration file and every file it names, then print a summary.
    Check {
        /// The configuration file.
        #[arg(long, default_value = "/etc/apilb/apilb.toml")]
        config: PathBuf,
        /// Judge as `run` does: expired certificates are listed but do not fail the check
        /// (for ExecStartPre, so the unit starts whenever `run` would).
        #[arg(long)]
        allow_expired: bool,
    },
    /// Preflight every backend and certificate against the names clients use, without
    /// starting the gateway: exit 0 all good, 2 a problem found, 1 nothing reachable.
    Probe {
        /// The configuration file.
        #[arg(long, default_value = "/etc/apilb/apilb.toml")]
        config: PathBuf,
        /// text (one screen) or json (one document with the same facts).
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
        /// Time allowed for each step of each backend (connect, handshake, request).
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
    /// Print shell completions for SHELL on stdout.
    Completions {
        /// bash, zsh or fish (also elvish, powershell).
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff) on stdout; the Debian package ships it as apilb(1).
    #[command(hide = true)]
    Manpage,
    /// Start three simulated apiservers with a throwaway PKI and the gateway in front of them.
    Demo {
        /// Address of the gateway's passthrough listener (port 0: ephemeral).
        #[arg(long, default_value = "127.0.0.1:6443")]
        passthrough: std::net::SocketAddr,
        /// Address of the gateway's terminate listener (port 0: ephemeral).
        #[arg(long, default_value = "127.0.0.1:8443")]
        terminate: std::net::SocketAddr,
        /// Address of the admin server: /status, /metrics, /readyz (port 0: ephemeral).
        #[arg(long, default_value = "127.0.0.1:9090")]
        admin: std::net::SocketAddr,
        /// Keep the PKI, kubeconfig and gateway config in this folder (default: a temp folder
        /// removed on exit).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Worker threads for the data path (default: the number of cores).
        #[arg(long)]
        threads: Option<NonZeroUsize>,
    },
    /// Put kubelet-like watches and LIST load on apiservers (through apilb or directly) and
    /// report latency, errors, watch re-establishments and the spread over backends.
    Load(Box<LoadArgs>),
    /// Simulated apiservers alone, one per --listen address, with the PKI in --dir (reused
    /// when there, else written): for tests that run apiservers and gateways apart.
    #[command(hide = true)]
    DemoApiserver {
        /// An address to serve on (repeat for more servers).
        #[arg(long, required = true)]
        listen: Vec<std::net::SocketAddr>,
        /// The PKI folder (ca.crt, apiserver.crt, apiserver.key, client certificates).
        #[arg(long)]
        dir: PathBuf,
        /// Time between the events of a watch stream.
        #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
        watch_interval: std::time::Duration,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LoadProfile {
    /// Simulated kubelets: two watches, a Lease every 10 s, node status every 60 s.
    Kubelet,
    /// Open-loop LISTs at --qps over --connections.
    List,
    /// Both.
    Mixed,
}

/// `apilb load` (SPEC §12).
#[derive(Debug, clap::Args)]
struct LoadArgs {
    /// A kubeconfig: server, CA and credentials.
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// The kubeconfig context (default: its current-context).
    #[arg(long)]
    context: Option<String>,
    /// The server, https://HOST:PORT (instead of, or overriding, the kubeconfig's).
    #[arg(long)]
    server: Option<String>,
    /// The CA bundle the server's certificate chains to.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// A client certificate (with --key).
    #[arg(long)]
    cert: Option<PathBuf>,
    /// The client certificate's key.
    #[arg(long)]
    key: Option<PathBuf>,
    /// A bearer token.
    #[arg(long)]
    token: Option<String>,
    /// What load to put on.
    #[arg(long, value_enum, default_value_t = LoadProfile::Kubelet)]
    profile: LoadProfile,
    /// Simulated nodes (kubelet and mixed profiles), one HTTP/2 connection each.
    #[arg(long, default_value_t = 100)]
    nodes: usize,
    /// How long the load runs.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    duration: std::time::Duration,
    /// Nodes start evenly over this.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    ramp: std::time::Duration,
    /// LIST requests per second, open loop (list and mixed profiles).
    #[arg(long, default_value_t = 50.0)]
    qps: f64,
    /// Connections the LIST load is spread over.
    #[arg(long, default_value_t = 10)]
    connections: usize,
    /// A CA certificate to mint one node identity per simulated node with
    /// (CN=system:node:NAME, O=system:nodes); needs --node-ca-key.
    #[arg(long, requires = "node_ca_key")]
    node_ca_cert: Option<PathBuf>,
    /// The key of --node-ca-cert.
    #[arg(long, requires = "node_ca_cert")]
    node_ca_key: Option<PathBuf>,
    /// An apilb admin address (http://HOST:PORT): report the open connections per backend.
    #[arg(long)]
    admin: Option<String>,
    /// text (a summary to read) or json (one document with the same numbers).
    #[arg(long, value_enum, default_value_t = Output::Text)]
    output: Output,
    /// Node names are PREFIX-00000, PREFIX-00001, ...
    #[arg(long, default_value = "load-node")]
    node_prefix: String,
    /// Between Lease renewals (kubelets: 10 s).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration, hide = true)]
    lease_interval: std::time::Duration,
    /// Between node status updates (kubelets: 60 s).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration, hide = true)]
    status_interval: std::time::Duration,
    /// Worker threads of the generator (default: the number of cores).
    #[arg(long)]
    threads: Option<NonZeroUsize>,
}

/// `apilb load`: the run's summary on stdout, progress on stderr; 0 when the run finished
/// (whatever its errors), 2 for bad arguments, 1 when it could not start.
fn load(args: LoadArgs) -> ExitCode {
    use apilb::load::{LoadError, LoadOptions, Profile, Source};
    let opts = LoadOptions {
        source: Source {
            kubeconfig: args.kubeconfig,
            context: args.context,
            server: args.server,
            ca: args.ca,
            cert: args.cert,
            key: args.key,
            token: args.token,
        },
        profile: match args.profile {
            LoadProfile::Kubelet => Profile::Kubelet,
            LoadProfile::List => Profile::List,
            LoadProfile::Mixed => Profile::Mixed,
        },
        nodes: args.nodes,
        duration: args.duration,
        ramp: args.ramp,
        qps: args.qps,
        connections: args.connections,
        node_ca: args.node_ca_cert.zip(args.node_ca_key),
        admin: args.admin,
        node_prefix: args.node_prefix,
        lease_every: args.lease_interval,
        status_every: args.status_interval,
        ..LoadOptions::default()
    };
    let threads = args
        .threads
        .or_else(|| std::thread::available_parallelism().ok())
        .map_or(1, NonZeroUsize::get);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .thread_name("apilb-load")
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("apilb load: cannot start the runtime: {e}");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    let result = runtime.block_on(apilb::load::run(opts, |line| eprintln!("{line}")));
    match result {
        Ok(report) => {
            match args.output {
                Output::Text => print!("{}", report.text()),
                Output::Json => match serde_json::to_string_pretty(&report) {
                    Ok(j) => println!("{j}"),
                    Err(e) => {
                        eprintln!("apilb load: {e}");
                        return ExitCode::from(EXIT_RUNTIME);
                    }
                },
            }
            ExitCode::SUCCESS
        }
        Err(LoadError::Args(e)) => {
            eprintln!("apilb load: {e}");
            ExitCode::from(EXIT_CONFIG)
        }
        Err(LoadError::Start(e)) => {
            eprintln!("apilb load: {e}");
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}

/// mimalloc instead of glibc's malloc. The identity mode allocates per request (hyper's
/// request and response on both sides, the h2 stream), and tokio's tasks and I/O
/// registrations are cache-line aligned, which glibc serves from its slow `memalign` path:
/// with mimalloc the identity mode spends 14% less CPU per request (`benches/identity.py`,
/// 27.4 to 23.4 us) and an idle proxied connection 0.2 KiB less memory; passthrough, which
/// allocates nothing per read, is unchanged (docs/performance.md). Without transparent huge
/// pages (`no_thp`): with them the soak's RSS went from 35 to 61 MiB, without 19 to 27.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const EXIT_RUNTIME: u8 = 1;
const EXIT_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The commands that serve connections log from a thread of their own; the short ones
    // (check, probe, load's summary...) write directly, so nothing of theirs is queued when
    // they exit and nothing can be dropped.
    let serving = matches!(
        cli.command,
        Command::Run { .. } | Command::Demo { .. } | Command::DemoApiserver { .. }
    );
    let log = init_logging(cli.log_format, &cli.log_level, serving);
    let code = run_command(cli.command);
    if let Some((guard, dropped)) = log {
        // Flushes what is queued (tracing-appender waits up to a second for it).
        drop(guard);
        let n = dropped.dropped_lines();
        if n > 0 {
            eprintln!("apilb: {n} log lines were dropped because stderr did not keep up");
        }
    }
    code
}

fn run_command(command: Command) -> ExitCode {
    match command {
        Command::Check {
            config,
            allow_expired,
        } => check(&config, allow_expired),
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            // Into a buffer first: the generator panics on a write error (a closed pipe).
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut cmd, "apilb", &mut out);
            use std::io::Write as _;
            let _ = std::io::stdout().write_all(&out);
            ExitCode::SUCCESS
        }
        Command::Manpage => {
            let cmd = <Cli as clap::CommandFactory>::command();
            let mut out = Vec::new();
            if let Err(e) = clap_mangen::Man::new(cmd).render(&mut out) {
                eprintln!("apilb: cannot render the man page: {e}");
                return ExitCode::from(EXIT_RUNTIME);
            }
            use std::io::Write as _;
            let _ = std::io::stdout().write_all(&out);
            ExitCode::SUCCESS
        }
        Command::Probe {
            config,
            output,
            timeout,
        } => {
            let cfg = match config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("apilb probe: invalid configuration:\n{e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("apilb: cannot start the runtime: {e}");
                    return ExitCode::from(EXIT_RUNTIME);
                }
            };
            let report = runtime.block_on(apilb::probe::run(&cfg, timeout));
            match output {
                Output::Text => print!("{}", apilb::probe::text(&report)),
                Output::Json => match serde_json::to_string_pretty(&report) {
                    Ok(j) => println!("{j}"),
                    Err(e) => {
                        eprintln!("apilb probe: {e}");
                        return ExitCode::from(EXIT_RUNTIME);
                    }
                },
            }
            ExitCode::from(report.exit_code())
        }
        Command::Run { config, threads } => {
            let cfg = match config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("apilb: invalid configuration:\n{e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            with_runtime(threads, async move {
                // Handlers exist before READY. The first SIGTERM/SIGINT starts the shutdown
                // (grace, then drain); a second one skips what is left of both.
                let mut signals = apilb::signals::ShutdownSignals::install();
                let hangups = apilb::signals::Hangups::install();
                let (first, fired) = tokio::sync::oneshot::channel::<()>();
                let shutdown = async move {
                    let _ = fired.await;
                };
                let gateway =
                    apilb::Gateway::start(cfg, apilb::GatewayOptions::default(), shutdown)
                        .await
                        .map_err(|e| e.to_string())?;
                tokio::spawn(hangups.reload(gateway.reloader()));
                let hurry = gateway.hurrier();
                tokio::spawn(async move {
                    let name = signals.next().await;
                    tracing::info!(signal = name, "shutdown requested");
                    let _ = first.send(());
                    let name = signals.next().await;
                    tracing::warn!(signal = name, "second signal: closing every connection now");
                    hurry();
                });
                #[cfg(debug_assertions)]
                test_hook_block_on_sigusr2();
                let report = gateway.wait().await.map_err(|e| e.to_string())?;
                tracing::info!(forced = report.forced, "stopped");
                Ok(())
            })
        }
        Command::Demo {
            passthrough,
            terminate,
            admin,
            dir,
            threads,
        } => with_runtime(threads, async move {
            apilb::demo::run(
                apilb::demo::DemoOptions {
                    passthrough,
                    terminate,
                    admin,
                    dir,
                },
                apilb::signals::shutdown(),
            )
            .await
            .map_err(|e| e.to_string())
        }),
        Command::Load(args) => load(*args),
        Command::DemoApiserver {
            listen,
            dir,
            watch_interval,
        } => with_runtime(None, async move {
            apilb::demo::standalone::run(
                apilb::demo::standalone::StandaloneOptions {
                    listen,
                    dir,
                    watch_interval,
                },
                apilb::signals::shutdown(),
            )
            .await
            .map_err(|e| e.to_string())
        }),
    }
}

fn with_runtime(
    threads: Option<NonZeroUsize>,
    main: impl std::future::Future<Output = Result<(), String>>,
) -> ExitCode {
    let threads = threads
        .or_else(|| std::thread::available_parallelism().ok())
        .map_or(1, NonZeroUsize::get);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .thread_name("apilb-worker")
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("apilb: cannot start the runtime: {e}");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    match runtime.block_on(main) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("apilb: {e}");
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}

/// Test hook: with `APILB_TEST_BLOCK_ON_SIGUSR2=SECONDS`, SIGUSR2 blocks a runtime worker
/// for that long, to show that a wedged runtime stops feeding the watchdog. Inert otherwise.
/// Debug builds only (what `cargo test` runs): blocks a runtime worker on SIGUSR2 so the
/// systemd test can show the watchdog is fed from the runtime. Release builds have no hook.
#[cfg(debug_assertions)]
fn test_hook_block_on_sigusr2() {
    #[cfg(unix)]
    if let Some(secs) = std::env::var("APILB_TEST_BLOCK_ON_SIGUSR2")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
    {
        tokio::spawn(async move {
            use tokio::signal::unix::{signal, SignalKind};
            let Ok(mut usr2) = signal(SignalKind::user_defined2()) else {
                return;
            };
            while usr2.recv().await.is_some() {
                tracing::warn!(seconds = secs, "test hook: blocking a runtime worker");
                std::thread::sleep(std::time::Duration::from_secs_f64(secs));
            }
        });
    }
}

/// `apilb check`'s list of expired certificates or warnings, with a counted heading; nothing
/// when there are none.
fn list_findings(path: &std::path::Path, what: &str, prefix: &str, items: &[config::ConfigError]) {
    if items.is_empty() {
        return;
    }
    let n = items.len();
    eprintln!(
        "apilb check: {n} {what}{} in {}:",
        if n == 1 { "" } else { "s" },
        path.display()
    );
    for item in items {
        eprintln!("{prefix}{item}");
    }
}

fn check(path: &std::path::Path, allow_expired: bool) -> ExitCode {
    match config::load(path) {
        Ok(cfg) if !cfg.expired.is_empty() && !allow_expired => {
            list_findings(path, "expired certificate", "", &cfg.expired);
            ExitCode::from(EXIT_CONFIG)
        }
        Ok(cfg) => {
            // With --allow-expired, `run` would start and log these as errors: say so too.
            list_findings(
                path,
                "expired certificate",
                "error (run goes on): ",
                &cfg.expired,
            );
            list_findings(path, "warning", "warning: ", &cfg.warnings);
            print!("{}", summary(&cfg));
            ExitCode::SUCCESS
        }
        Err(e) => {
            let n = e.0.len();
            eprintln!(
                "apilb check: {} problem{} in {}:",
                n,
                if n == 1 { "" } else { "s" },
                path.display()
            );
            eprintln!("{e}");
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

/// The one-screen summary `check` prints for a good config.
fn summary(cfg: &Config) -> String {
    use std::fmt::Write as _;
    let mut s = format!("{}: configuration is valid\n", cfg.source.display());
    if let Some(a) = &cfg.admin {
        let _ = writeln!(s, "admin      {}", a.listen);
    }
    for l in &cfg.listeners {
        let addrs: Vec<String> = l.listen.iter().map(ToString::to_string).collect();
        let _ = writeln!(
            s,
            "listener   {} ({}{}) on {} -> pool {}, idle_timeout {}, max_connections {}",
            l.name,
            l.mode.as_str(),
            if l.proxy_protocol {
                ", PROXY protocol"
            } else {
                ""
            },
            addrs.join(", "),
            l.destination(),
            humantime::format_duration(l.idle_timeout),
            l.max_connections
        );
    }
    for p in &cfg.pools {
        let _ = writeln!(
            s,
            "pool       {} ({}, connect_timeout {}, {} attempts, drain {})",
            p.name,
            p.balance.as_str(),
            humantime::format_duration(p.connect_timeout),
            p.connect_attempts,
            humantime::format_duration(p.drain_timeout)
        );
        for b in &p.backends {
            let resolved = if b.address == b.addr.to_string() {
                String::new()
            } else {
                format!(" = {}", b.addr)
            };
            let _ = writeln!(
                s,
                "  backend  {} {}{} weight {}",
                b.name, b.address, resolved, b.weight
            );
        }
    }
    s
}

/// The log filter: the user's, with rustls silenced unless the user names it. rustls warns
/// once per connection about what clients send (an invalid SNI name, echoed whole; alerts), so
/// at the default level anyone who can reach a terminate listener could flood the log; those
/// failures are counted in `apilb_tls_handshake_errors_total` and summarised once a minute.
/// `RUST_LOG=info,rustls=debug` brings them back for debugging.
fn log_directives(level: &str) -> String {
    if level.contains("rustls") {
        level.to_string()
    } else {
        format!("{level},rustls=off")
    }
}

/// Log lines queued for the writer thread before new ones are dropped (and counted in
/// `apilb_log_lines_dropped_total`): minutes of access lines at a busy gateway's rate.
const LOG_QUEUE: usize = 64 * 1024;

/// The background log writer's guard (dropping it flushes the queue) and its count of
/// dropped lines.
type BackgroundLog = (
    tracing_appender::non_blocking::WorkerGuard,
    tracing_appender::non_blocking::ErrorCounter,
);

/// Installs the log. For the commands that serve connections (`background`), lines are
/// formatted where they happen and written to stderr by a thread of its own, so a slow
/// stderr (a journald that falls behind, a full pipe) can drop lines (counted) but never
/// stalls a worker that carries connections; the queue holds 65,536 lines, some 20 MiB at
/// most. Other commands write to stderr directly.
fn init_logging(format: LogFormat, level: &str, background: bool) -> Option<BackgroundLog> {
    use tracing_subscriber::fmt::writer::BoxMakeWriter;
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_new(log_directives(level)).unwrap_or_else(|e| {
        eprintln!("apilb: invalid --log-level {level:?} ({e}); using info");
        EnvFilter::new("info")
    });
    let (writer, log) = if background {
        let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
            .lossy(true)
            .buffered_lines_limit(LOG_QUEUE)
            .thread_name("apilb-log")
            .finish(std::io::stderr());
        let dropped = writer.error_counter();
        apilb::count_log_drops(dropped.clone());
        (BoxMakeWriter::new(writer), Some((guard, dropped)))
    } else {
        (BoxMakeWriter::new(std::io::stderr), None)
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
    log
}
