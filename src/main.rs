//! `hl7-edge`: the command line and the daemon's edge. Library code lives in `hl7_edge`; this file
//! only parses arguments, turns errors into messages and exit codes, and wires the daemon.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use tracing::{error, info};

use hl7_edge::config::Config;
use hl7_edge::forward;
use hl7_edge::ingest::adapter::{self, FeedConfig, Transport};
use hl7_edge::ingest::serial::SerialSource;
use hl7_edge::ingest::{Intake, mllp};
use hl7_edge::map::MappingSet;
use hl7_edge::ops::{logging, shutdown};
use hl7_edge::outbox::{Outbox, OutboxLimits, Writer};
use hl7_edge::pipeline::{self, Processor};
use hl7_edge::sign::{self, SigningKey, VerifyingKey};

#[derive(Parser)]
#[command(
    name = "hl7-edge",
    version,
    about = "HL7 v2 in, signed FHIR R4 (London profile) out."
)]
struct Cli {
    /// Configuration file (TOML). Without it, built-in defaults apply; HL7EDGE_* variables
    /// override either (nested keys with `__`, e.g. HL7EDGE_MQTT__URL).
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon: listen on every feed, map, sign, store and forward.
    Run,
    /// Print the Bundle a message would produce, without any network or state (exit 1 if it
    /// would be quarantined: the reasons go to stderr).
    Map {
        /// A file holding one HL7 v2 message.
        file: PathBuf,
        /// Mappings folder (default: the configured one, else the embedded set).
        #[arg(long, value_name = "DIR")]
        mappings: Option<PathBuf>,
        /// The feed whose settings apply (default: the first feed).
        #[arg(long)]
        feed: Option<String>,
    },
    /// Load configuration, adapters and mappings; list every error found.
    Check {
        #[arg(long, value_name = "DIR")]
        mappings: Option<PathBuf>,
    },
    /// Write a new Ed25519 signing key (PEM, mode 0600) and its public JWK beside it.
    Keygen {
        /// Where to write the key (default: the configured key path).
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Verify the signature of a Bundle (exit 0: valid; 1: invalid).
    Verify {
        /// A Bundle as JSON.
        file: PathBuf,
        /// Public key(s) as JWK files (default: the public half of the configured key).
        #[arg(long = "key", value_name = "JWK")]
        keys: Vec<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run => run(cli.config.as_deref()),
        Command::Map {
            ref file,
            ref mappings,
            ref feed,
        } => cmd_map(
            cli.config.as_deref(),
            file,
            mappings.as_deref(),
            feed.as_deref(),
        ),
        Command::Check { ref mappings } => cmd_check(cli.config.as_deref(), mappings.as_deref()),
        Command::Keygen { ref out } => cmd_keygen(cli.config.as_deref(), out.as_deref()),
        Command::Verify { ref file, ref keys } => cmd_verify(cli.config.as_deref(), file, keys),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("hl7-edge: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn load_mappings(config: &Config, over: Option<&Path>) -> Result<MappingSet> {
    let dir = over.or(config.mappings_dir.as_deref());
    MappingSet::load(dir).map_err(|errs| {
        anyhow::anyhow!(
            "{} mapping error(s):\n{}",
            errs.len(),
            errs.iter()
                .map(|e| format!("  {e}"))
                .collect::<Vec<_>>()
                .join("\n")
        )
    })
}

fn cmd_map(
    config: Option<&Path>,
    file: &Path,
    mappings: Option<&Path>,
    feed: Option<&str>,
) -> Result<ExitCode> {
    let config = Config::load(config)?;
    let feeds = adapter::load(config.adapters_dir.as_deref())?;
    let feed = pick_feed(&feeds, feed)?;
    let set = load_mappings(&config, mappings)?;
    let processor = Processor::new(Arc::new(set), config.site.clone(), config.profile.clone())
        .map_err(anyhow::Error::msg)?;
    let raw = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    let produced = processor.build(&raw, feed, jiff::Timestamp::now())?;
    println!("{}", serde_json::to_string_pretty(&produced.bundle)?);
    for w in &produced.warnings {
        eprintln!("note: {w}");
    }
    // The Bundle is shown even when invalid: the author needs to see both.
    match processor.validate(&produced.bundle) {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e) => {
            eprintln!("error: this Bundle would be quarantined: {e}");
            Ok(ExitCode::FAILURE)
        }
    }
}

fn pick_feed<'a>(feeds: &'a [FeedConfig], name: Option<&str>) -> Result<&'a FeedConfig> {
    match name {
        None => feeds.first().context("no feeds are configured"),
        Some(n) => feeds.iter().find(|f| f.name == n).with_context(|| {
            format!(
                "no feed named {n:?} (configured: {})",
                feeds
                    .iter()
                    .map(|f| f.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        }),
    }
}

fn cmd_check(config: Option<&Path>, mappings: Option<&Path>) -> Result<ExitCode> {
    let mut problems = Vec::new();
    let config = match Config::load(config) {
        Ok(c) => Some(c),
        Err(e) => {
            problems.push(e.to_string());
            None
        }
    };
    let default = Config::default();
    let cfg = config.as_ref().unwrap_or(&default);
    match adapter::load(cfg.adapters_dir.as_deref()) {
        Ok(feeds) => println!(
            "feeds: {}",
            feeds
                .iter()
                .map(|f| f.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Err(e) => problems.push(format!("adapters:\n{e}")),
    }
    match MappingSet::load(mappings.or(cfg.mappings_dir.as_deref())) {
        Ok(set) => println!(
            "mappings ({}): {}",
            set.origin,
            set.message_mappings().collect::<Vec<_>>().join(", ")
        ),
        Err(errs) => {
            for e in errs {
                problems.push(e.to_string());
            }
        }
    }
    if problems.is_empty() {
        println!("ok");
        Ok(ExitCode::SUCCESS)
    } else {
        for p in &problems {
            eprintln!("error: {p}");
        }
        eprintln!("{} error(s)", problems.len());
        Ok(ExitCode::FAILURE)
    }
}

fn cmd_keygen(config: Option<&Path>, out: Option<&Path>) -> Result<ExitCode> {
    let config = Config::load(config)?;
    let path = out
        .map(Path::to_path_buf)
        .unwrap_or_else(|| config.signing_key_path());
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let key = SigningKey::write_new(&path)?;
    println!("wrote {} (kid {})", path.display(), key.kid());
    Ok(ExitCode::SUCCESS)
}

fn cmd_verify(config: Option<&Path>, file: &Path, key_files: &[PathBuf]) -> Result<ExitCode> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let bundle: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", file.display()))?;
    let mut keys = Vec::new();
    if key_files.is_empty() {
        let config = Config::load(config)?;
        let path = config.signing_key_path();
        let key = SigningKey::load(&path)
            .with_context(|| format!("no --key given and cannot load {}", path.display()))?;
        keys.push(VerifyingKey::from_jwk(&key.public_jwk())?);
    }
    for f in key_files {
        let jwk: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(f).with_context(|| format!("cannot read {}", f.display()))?,
        )
        .with_context(|| format!("{} is not a JWK", f.display()))?;
        keys.push(VerifyingKey::from_jwk(&jwk).with_context(|| format!("{}", f.display()))?);
    }
    match sign::verify_bundle(&bundle, &keys) {
        Ok(kid) => {
            println!("valid: signed by key {}", kid.kid);
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            println!("INVALID: {e}");
            Ok(ExitCode::FAILURE)
        }
    }
}

fn run(config_path: Option<&Path>) -> Result<ExitCode> {
    let config = Config::load(config_path)?;
    logging::init(&config.log);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(daemon(config))?;
    Ok(ExitCode::SUCCESS)
}

async fn daemon(config: Config) -> Result<()> {
    let feeds = adapter::load(config.adapters_dir.as_deref())?;
    let mappings = load_mappings(&config, None)?;
    info!(origin = %mappings.origin, "mappings loaded");
    create_state_dir(&config.state_dir)?;

    let key_path = config.signing_key_path();
    let (key, generated) = SigningKey::load_or_generate(&key_path)
        .with_context(|| format!("signing key {}", key_path.display()))?;
    if generated {
        info!(path = %key_path.display(), kid = %key.kid(), "generated a new signing key; give the exchange its public JWK");
    }
    let key = Arc::new(key);

    let outbox = Outbox::open(
        &config.outbox_path(),
        OutboxLimits {
            max_bytes: config.outbox.max_bytes,
            ..OutboxLimits::default()
        },
    )?;
    let writer = Writer::spawn(outbox.clone())?;
    let (trigger, shutdown) = shutdown::channel();
    let (ids_tx, ids_rx) = tokio::sync::mpsc::unbounded_channel();

    let processor = Arc::new(
        Processor::new(
            Arc::new(mappings),
            config.site.clone(),
            config.profile.clone(),
        )
        .map_err(anyhow::Error::msg)?,
    );
    // Ingest refuses messages while the state directory's disk is nearly full.
    let disk = Arc::new(hl7_edge::ingest::disk::DiskGuard::new(
        config.state_dir.clone(),
        config.outbox.min_free_disk_bytes,
    ));
    let mut feed_map = HashMap::new();
    let mut listeners = Vec::new();
    let mut serial_sources = Vec::new();
    for feed in feeds {
        let feed = Arc::new(feed);
        feed_map.insert(feed.name.clone(), feed.clone());
        let intake = Arc::new(
            Intake::new(feed.clone(), writer.clone(), ids_tx.clone())
                .with_disk_guard(disk.clone())
                .with_check(processor.clone()),
        );
        match &feed.transport {
            Transport::Mllp(m) => listeners.push(mllp::Listener::bind(m.clone(), intake).await?),
            // A serial device may be missing at start: its source retries in the background.
            Transport::Serial(s) => serial_sources.push(SerialSource::new(s.clone(), intake)),
        }
    }
    drop(ids_tx);

    let mapper = tokio::spawn(pipeline::run_mapper(
        processor,
        key,
        feed_map.clone(),
        outbox.clone(),
        writer.clone(),
        ids_rx,
        trigger.subscribe(),
    ));
    let forwarder = forward::mqtt::Forwarder::spawn(
        config.mqtt_effective(),
        outbox.clone(),
        writer.clone(),
        feed_map.keys().cloned().collect(),
        shutdown.receiver(),
    )?;
    let mut serving: Vec<_> = listeners
        .into_iter()
        .map(|l| tokio::spawn(l.serve(trigger.subscribe())))
        .collect();
    serving.extend(
        serial_sources
            .into_iter()
            .map(|s| tokio::spawn(s.serve(trigger.subscribe()))),
    );
    info!(state_dir = %config.state_dir.display(), broker = %config.mqtt.url, "hl7-edge running");

    wait_for_signal().await;
    info!("stopping: finishing in-flight messages");
    trigger.fire();
    for s in serving {
        let _ = s.await;
    }
    let _ = mapper.await;
    let _ = forwarder.await;
    writer.shutdown().await;
    info!("stopped");
    Ok(())
}

fn create_state_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("cannot create state directory {}", dir.display()))?;
    }
    if !dir.is_dir() {
        bail!("state directory {} is not a directory", dir.display());
    }
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        error!("cannot install signal handlers; stopping on Ctrl-C only");
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
}
