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

/// mimalloc: see Cargo.toml for why (allocation-heavy per-message work).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use hl7_edge::forward;
use hl7_edge::ingest::adapter::{self, FeedConfig, Transport};
use hl7_edge::ingest::serial::SerialSource;
use hl7_edge::ingest::{Intake, mllp};
use hl7_edge::map::{self, Explain, MappingSet, Sources};
use hl7_edge::ops::{admin, logging, shutdown};
use hl7_edge::outbox::{Outbox, Writer};
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
        /// A file holding an HL7 v2 message; several (a batch, or messages one after another)
        /// are mapped one by one.
        file: PathBuf,
        /// Mappings folder (default: the configured one, else the embedded set).
        #[arg(long, value_name = "DIR")]
        mappings: Option<PathBuf>,
        /// Site mappings loaded on top (new definitions and overlays).
        #[arg(long, value_name = "DIR")]
        site_mappings: Option<PathBuf>,
        /// The feed whose settings apply (default: the first feed).
        #[arg(long)]
        feed: Option<String>,
        /// Also list (on stderr) which rule produced each element and what no rule read.
        #[arg(long)]
        explain: bool,
    },
    /// Map many messages (files, or folders of `*.hl7`) as the daemon would, and report which
    /// would be forwarded and why the others would be quarantined, with counts per message type.
    /// For judging a feed from its sample messages before it goes live. Exit 0 unless
    /// --strict and a message would be quarantined.
    Survey {
        /// Files or folders.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        #[arg(long, value_name = "DIR")]
        mappings: Option<PathBuf>,
        #[arg(long, value_name = "DIR")]
        site_mappings: Option<PathBuf>,
        /// The feed whose settings apply (default: the first feed).
        #[arg(long)]
        feed: Option<String>,
        /// Write each valid Bundle as JSON Lines to this file.
        #[arg(long, value_name = "FILE")]
        bundles: Option<PathBuf>,
        /// Exit 1 if any message would be quarantined.
        #[arg(long)]
        strict: bool,
    },
    /// Load configuration, adapters and mappings; list every error found.
    Check {
        #[arg(long, value_name = "DIR")]
        mappings: Option<PathBuf>,
        #[arg(long, value_name = "DIR")]
        site_mappings: Option<PathBuf>,
    },
    /// Run the mappings' golden tests: every `*.hl7` below the tests folder against the `*.json`
    /// beside it (exit 0: all pass; 1: a failure).
    TestMappings {
        #[arg(long, value_name = "DIR")]
        mappings: Option<PathBuf>,
        #[arg(long, value_name = "DIR")]
        site_mappings: Option<PathBuf>,
        /// The tests folder (default: `tests/` in the mappings folder, else `./mappings/tests`).
        #[arg(long, value_name = "DIR")]
        tests: Option<PathBuf>,
        /// Write the current output as the expectation (review the change with git diff).
        #[arg(long)]
        update: bool,
        /// The feed whose settings apply (default: the first feed).
        #[arg(long)]
        feed: Option<String>,
    },
    /// Write a new Ed25519 signing key (PEM, mode 0600) and its public JWK beside it.
    Keygen {
        /// Where to write the key (default: the configured key path).
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Inspect and repair the outbox, of a running daemon (through its admin socket) or of a
    /// stopped one (directly).
    Outbox {
        #[command(subcommand)]
        cmd: OutboxCmd,
        /// Print the daemon's JSON answer instead of text.
        #[arg(long, global = true)]
        json: bool,
    },
    /// Messages that could not be mapped or whose Bundle failed validation: list them with the
    /// reason, look at one, and map them again once the mapping is fixed (and the daemon
    /// reloaded with `kill -HUP`). Works on a running or a stopped daemon, as `outbox` does.
    Quarantine {
        #[command(subcommand)]
        cmd: QuarantineCmd,
        /// Print the daemon's JSON answer instead of text.
        #[arg(long, global = true)]
        json: bool,
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

#[derive(Subcommand)]
enum OutboxCmd {
    /// Counts per state, bytes, limits, per-feed counters and the forwarder's state.
    Stats,
    /// Records in id order (at most --limit, after --after).
    List {
        /// received, ready, delivered, quarantined or dead-lettered.
        #[arg(long)]
        state: Option<String>,
        #[command(flatten)]
        page: Page,
    },
    /// One record's metadata (and with --payload its raw message and Bundle: patient data).
    Show(ShowArgs),
    /// Send a record on again: quarantined -> mapped again, dead-lettered -> published again.
    Retry { id: u64 },
    /// Remove the audit rows of delivered records (undelivered records are never purged).
    Purge {
        /// Required: what to purge.
        #[arg(long, required = true)]
        delivered: bool,
    },
}

/// Which records of a listing: one feed's, after an id, at most so many.
#[derive(clap::Args, Clone)]
struct Page {
    #[arg(long)]
    feed: Option<String>,
    /// Only ids greater than this (paging).
    #[arg(long)]
    after: Option<u64>,
    #[arg(long, default_value_t = 100)]
    limit: usize,
}

#[derive(clap::Args, Clone)]
struct ShowArgs {
    id: u64,
    /// Also the raw message and the Bundle (patient data, to this terminal only).
    #[arg(long)]
    payload: bool,
}

#[derive(Subcommand)]
enum QuarantineCmd {
    /// Quarantined records with their reasons, in id order.
    List(Page),
    /// One record's metadata and reason (with --payload its raw message: patient data).
    Show(ShowArgs),
    /// Map records again with the mappings in use now; each is then signed and forwarded, or
    /// quarantined again with its new reason.
    Retry {
        /// Record ids.
        ids: Vec<u64>,
        /// Every quarantined record (of --feed, if given), oldest first.
        #[arg(long, conflicts_with = "ids")]
        all: bool,
        #[arg(long, requires = "all")]
        feed: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run => run(cli.config.as_deref()),
        Command::Map {
            ref file,
            ref mappings,
            ref site_mappings,
            ref feed,
            explain,
        } => cmd_map(
            cli.config.as_deref(),
            file,
            (mappings.as_deref(), site_mappings.as_deref()),
            feed.as_deref(),
            explain,
        ),
        Command::Survey {
            ref paths,
            ref mappings,
            ref site_mappings,
            ref feed,
            ref bundles,
            strict,
        } => cmd_survey(
            cli.config.as_deref(),
            paths,
            (mappings.as_deref(), site_mappings.as_deref()),
            feed.as_deref(),
            bundles.as_deref(),
            strict,
        ),
        Command::Check {
            ref mappings,
            ref site_mappings,
        } => cmd_check(
            cli.config.as_deref(),
            mappings.as_deref(),
            site_mappings.as_deref(),
        ),
        Command::TestMappings {
            ref mappings,
            ref site_mappings,
            ref tests,
            update,
            ref feed,
        } => cmd_test_mappings(
            cli.config.as_deref(),
            (mappings.as_deref(), site_mappings.as_deref()),
            tests.as_deref(),
            update,
            feed.as_deref(),
        ),
        Command::Keygen { ref out } => cmd_keygen(cli.config.as_deref(), out.as_deref()),
        Command::Verify { ref file, ref keys } => cmd_verify(cli.config.as_deref(), file, keys),
        Command::Outbox { ref cmd, json } => cmd_outbox(cli.config.as_deref(), cmd, json),
        Command::Quarantine { ref cmd, json } => cmd_quarantine(cli.config.as_deref(), cmd, json),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("hl7-edge: {}", error_text(&e));
            ExitCode::from(2)
        }
    }
}

/// `e` and its causes, `outer: inner`, each said once. Many of the crate's errors already show
/// their cause in their own text (`parse: MSH-9 is missing`, which is also a quarantine
/// record's reason); printing the chain after it repeated every such message.
fn error_text(e: &anyhow::Error) -> String {
    let mut text = e.to_string();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if !text.ends_with(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
    }
    text
}

/// Mapping folders given on the command line: (base, site).
type MappingDirs<'a> = (Option<&'a Path>, Option<&'a Path>);

fn mapping_sources<'a>(config: &'a Config, over: MappingDirs<'a>) -> Sources<'a> {
    Sources {
        base: over.0.or(config.mappings_dir.as_deref()),
        site: over.1.or(config.site_mappings_dir.as_deref()),
        extra: Vec::new(),
    }
}

fn load_mappings(config: &Config, over: MappingDirs<'_>) -> Result<MappingSet> {
    load_sources(config, &mapping_sources(config, over))
}

fn load_sources(config: &Config, sources: &Sources<'_>) -> Result<MappingSet> {
    MappingSet::load_sources(sources, Some(&config.site)).map_err(|errs| {
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

/// What `map` and `survey` work with: the configured site, the chosen feed and the mappings,
/// without state, network or key.
fn offline_processor(
    config: Option<&Path>,
    mappings: MappingDirs<'_>,
    feed: Option<&str>,
) -> Result<(Processor, FeedConfig)> {
    let config = Config::load(config)?;
    let feeds = adapter::load(config.adapters_dir.as_deref(), &config.site)?;
    let feed = pick_feed(&feeds, feed)?.clone();
    let set = load_mappings(&config, mappings)?;
    let processor = Processor::new(Arc::new(set), config.site.clone(), config.profile.clone())
        .map_err(anyhow::Error::msg)?;
    Ok((processor, feed))
}

fn cmd_map(
    config: Option<&Path>,
    file: &Path,
    mappings: MappingDirs<'_>,
    feed: Option<&str>,
    explain: bool,
) -> Result<ExitCode> {
    let (processor, feed) = offline_processor(config, mappings, feed)?;
    let feed = &feed;
    let raw = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    let mode = if explain { Explain::On } else { Explain::Off };
    // A sample file often holds several messages (a batch, or messages one after another):
    // each is mapped on its own, as the daemon would take them one frame at a time.
    let batch = hl7_edge::hl7::batch::is_batch(&raw);
    let frame = hl7_edge::hl7::batch::split_batch(&raw);
    if let Some(e) = &frame.error {
        // A batch whose envelope the daemon would refuse says why; anything else that does not
        // split is left to the parser to explain.
        if batch {
            bail!(e.clone());
        }
        return map_one(&processor, feed, &raw, mode);
    }
    let messages: Vec<&[u8]> = frame.messages().collect();
    if messages.len() < 2 {
        // One message in a batch envelope is that message; a lone message is read as it is.
        let one = match messages.as_slice() {
            [one] if batch => one,
            _ => raw.as_slice(),
        };
        return map_one(&processor, feed, one, mode);
    }
    let mut worst = 0u8;
    for (i, message) in messages.iter().enumerate() {
        eprintln!("== message {} of {}", i + 1, messages.len());
        let code = match map_one(&processor, feed, message, mode) {
            Ok(code) if code == ExitCode::SUCCESS => 0,
            Ok(_) => 1,
            Err(e) => {
                eprintln!("error: {}", error_text(&e));
                2
            }
        };
        worst = worst.max(code);
    }
    Ok(ExitCode::from(worst))
}

/// Maps one message and prints its Bundle (stdout), notes and `--explain` (stderr); exit 1 if
/// the Bundle would be quarantined.
fn map_one(
    processor: &Processor,
    feed: &FeedConfig,
    raw: &[u8],
    mode: Explain,
) -> Result<ExitCode> {
    let produced = processor.build(raw, feed, jiff::Timestamp::now(), mode)?;
    println!("{}", serde_json::to_string_pretty(&produced.bundle)?);
    for w in &produced.warnings {
        eprintln!("note: {w}");
    }
    if let Some(x) = &produced.explain {
        eprint!("{}", explain_text(x, &produced.bundle.to_value()));
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

/// `--explain` output: no values, only element paths, rule positions and segment/field names.
fn explain_text(x: &map::Explanation, bundle: &serde_json::Value) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "explain: message mapping `{}` ({})",
        x.mapping, x.mapping_origin
    );
    // Entry 0 is the MessageHeader; mapped resources follow in order.
    let entries = bundle["entry"].as_array().cloned().unwrap_or_default();
    for (i, elements) in x.elements.iter().enumerate() {
        let r = entries.get(i + 1).map(|e| &e["resource"]);
        let rtype = r.and_then(|r| r["resourceType"].as_str()).unwrap_or("?");
        let id = r.and_then(|r| r["id"].as_str()).unwrap_or("?");
        let _ = writeln!(out, "{rtype} {id}");
        let width = elements.iter().map(|(p, _)| p.len()).max().unwrap_or(0);
        for (path, origin) in elements {
            let _ = writeln!(out, "  {path:width$}  <- {origin}");
        }
    }
    if x.unused_segments.is_empty() && x.unused_fields.is_empty() {
        let _ = writeln!(
            out,
            "every segment and field of the message was read by a rule"
        );
    } else {
        let _ = writeln!(out, "not read by any rule:");
        for (seg, line) in &x.unused_segments {
            let _ = writeln!(out, "  segment {seg} (line {line})");
        }
        for (field, line) in &x.unused_fields {
            let _ = writeln!(out, "  field {field} (line {line})");
        }
    }
    out
}

fn cmd_test_mappings(
    config: Option<&Path>,
    mappings: MappingDirs<'_>,
    tests: Option<&Path>,
    update: bool,
    feed: Option<&str>,
) -> Result<ExitCode> {
    let config = Config::load(config)?;
    let feeds = adapter::load(config.adapters_dir.as_deref(), &config.site)?;
    let mut feed = pick_feed(&feeds, feed)?.clone();
    feed.name = map::golden::FEED.to_string();
    let mut sources = mapping_sources(&config, mappings);
    let default_tests = match sources.base {
        Some(b) => b.join("tests"),
        None => PathBuf::from("mappings/tests"),
    };
    let tests = tests.map(Path::to_path_buf).unwrap_or(default_tests);
    if !tests.is_dir() {
        bail!("no golden tests folder at {}", tests.display());
    }
    // Harness mappings that only the tests use live in the tests folder.
    sources.extra.push(&tests);
    // The golden site: the tests root's `site.toml`, with a sub-folder's `site.toml` merged over it
    // for the cases below that folder. The set is checked against the root site (its
    // `[variables]` are what `${site.NAME}` in the mappings is checked against), not the
    // appliance's configuration: golden results must not depend on the machine's config.
    let golden_site = |files: &[PathBuf]| -> Result<hl7_edge::config::SiteConfig> {
        let mut fig = figment::Figment::from(figment::providers::Serialized::defaults(
            hl7_edge::config::SiteConfig::default(),
        ));
        for f in files {
            fig = fig.merge(<figment::providers::Toml as figment::providers::Format>::file(f));
        }
        fig.extract::<hl7_edge::config::SiteConfig>()
            .with_context(|| {
                files
                    .iter()
                    .map(|f| f.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            })
    };
    let root_site_file: Vec<PathBuf> = Some(tests.join("site.toml"))
        .filter(|f| f.is_file())
        .into_iter()
        .collect();
    let root_site = if root_site_file.is_empty() {
        config.site.clone()
    } else {
        golden_site(&root_site_file)?
    };
    let set = Arc::new(
        MappingSet::load_sources(&sources, Some(&root_site)).map_err(|errs| {
            anyhow::anyhow!(
                "{} mapping error(s):\n{}",
                errs.len(),
                errs.iter()
                    .map(|e| format!("  {e}"))
                    .collect::<Vec<_>>()
                    .join("\n")
            )
        })?,
    );
    let mut processors: std::collections::HashMap<Vec<PathBuf>, Processor> =
        std::collections::HashMap::new();
    let received: jiff::Timestamp = map::golden::RECEIVED_AT
        .parse()
        .context("golden received time")?;
    let cases = map::golden::discover(&tests)
        .with_context(|| format!("cannot read {}", tests.display()))?;
    if cases.is_empty() {
        bail!("no *.hl7 golden tests below {}", tests.display());
    }
    let (mut passed, mut failed, mut written) = (0, 0, 0);
    for case in &cases {
        let name = case.input.display();
        let raw = std::fs::read(&case.input).with_context(|| format!("cannot read {name}"))?;
        let site_files = map::golden::site_files(&tests, &case.input);
        if !processors.contains_key(&site_files) {
            let site = if site_files.is_empty() {
                config.site.clone()
            } else {
                golden_site(&site_files)?
            };
            let p = Processor::new(set.clone(), site, config.profile.clone())
                .map_err(anyhow::Error::msg)?;
            processors.insert(site_files.clone(), p);
        }
        let processor = &processors[&site_files];
        // Golden tests check the mapping and FHIR R4 validity; the London overlay's minimums are
        // a site policy (see `[profile]`), checked by `map` and the daemon.
        let built = processor
            .build(&raw, &feed, received, Explain::Off)
            .and_then(|p| {
                hl7_edge::fhir::validate::validate(&p.bundle)?;
                Ok(p)
            });
        let actual = match built {
            Ok(p) => {
                let mut bundle = p.bundle.to_value();
                map::golden::normalise(&mut bundle);
                map::golden::render(&bundle)
            }
            Err(e) => format!(
                "{{\n  \"error\": {}\n}}\n",
                serde_json::to_string(&e.to_string())?
            ),
        };
        let expected = std::fs::read_to_string(&case.expected).ok();
        if expected.as_deref() == Some(actual.as_str()) {
            passed += 1;
            continue;
        }
        if update {
            std::fs::write(&case.expected, &actual)
                .with_context(|| format!("cannot write {}", case.expected.display()))?;
            println!("updated {}", case.expected.display());
            written += 1;
            continue;
        }
        failed += 1;
        match expected {
            None => println!(
                "FAIL {name}: no {} (run with --update to create it)",
                case.expected.display()
            ),
            Some(exp) => {
                println!("FAIL {name} (- expected, + actual):");
                print!("{}", map::golden::diff(&exp, &actual));
            }
        }
    }
    println!(
        "{passed} passed, {failed} failed, {written} updated ({} cases)",
        cases.len()
    );
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
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

fn cmd_check(
    config: Option<&Path>,
    mappings: Option<&Path>,
    site_mappings: Option<&Path>,
) -> Result<ExitCode> {
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
    match adapter::load(cfg.adapters_dir.as_deref(), &cfg.site) {
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
    match MappingSet::load_sources(
        &mapping_sources(cfg, (mappings, site_mappings)),
        Some(&cfg.site),
    ) {
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

fn cmd_survey(
    config: Option<&Path>,
    paths: &[PathBuf],
    mappings: MappingDirs<'_>,
    feed: Option<&str>,
    bundles_out: Option<&Path>,
    strict: bool,
) -> Result<ExitCode> {
    use hl7_edge::pipeline::survey;
    use std::io::Write;
    let (processor, feed) = offline_processor(config, mappings, feed)?;
    let feed = &feed;
    let files = survey::collect(paths).context("cannot list the messages")?;
    if files.is_empty() {
        bail!("no *.hl7 files found in the paths given");
    }
    let mut out = match bundles_out {
        Some(p) => Some(std::io::BufWriter::new(
            std::fs::File::create(p).with_context(|| format!("cannot create {}", p.display()))?,
        )),
        None => None,
    };
    let now = jiff::Timestamp::now();
    let mut outcomes = Vec::new();
    for file in &files {
        let raw = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
        for o in survey::survey_file(&processor, feed, file, &raw, now) {
            let name = match o.index {
                Some(i) => format!("{}#{i}", o.file.display()),
                None => o.file.display().to_string(),
            };
            match &o.result {
                Ok(bundle) => {
                    println!("ok           {name}  {}", o.message_type);
                    if let Some(w) = out.as_mut() {
                        writeln!(w, "{bundle}")?;
                    }
                }
                Err(e) => println!("quarantined  {name}  {}  {e}", o.message_type),
            }
            outcomes.push(o);
        }
    }
    if let Some(mut w) = out {
        w.flush()?;
    }
    let counts = survey::count(&outcomes);
    println!(
        "\n{:<16} {:>6} {:>12}",
        "message type", "valid", "quarantined"
    );
    let (mut ok, mut bad) = (0, 0);
    for (t, (o, q)) in &counts {
        println!("{t:<16} {o:>6} {q:>12}");
        ok += o;
        bad += q;
    }
    println!("{:<16} {ok:>6} {bad:>12}", "total");
    Ok(if strict && bad > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn cmd_outbox(config: Option<&Path>, cmd: &OutboxCmd, json: bool) -> Result<ExitCode> {
    use hl7_edge::ops::admin::Request;
    let config = Config::load(config)?;
    let req = match cmd {
        OutboxCmd::Stats => Request::Stats,
        OutboxCmd::List { state, page } => Request::List {
            state: state.clone(),
            feed: page.feed.clone(),
            after: page.after,
            limit: page.limit,
        },
        OutboxCmd::Show(show) => Request::Show {
            id: show.id,
            payload: show.payload,
        },
        OutboxCmd::Retry { id } => Request::Retry { id: *id },
        OutboxCmd::Purge { delivered } => {
            if !delivered {
                bail!("say what to purge: --delivered");
            }
            Request::PurgeDelivered
        }
    };
    match outbox_request(&config, req)? {
        Ok(v) => {
            print_outbox(cmd, &v, json);
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("hl7-edge outbox: {e}");
            Ok(ExitCode::FAILURE)
        }
    }
}

/// Runs one outbox command on the running daemon (admin socket), else on the stored file.
/// The outer error is "could not ask"; the inner one is the command's own refusal.
fn outbox_request(
    config: &Config,
    req: hl7_edge::ops::admin::Request,
) -> Result<std::result::Result<serde_json::Value, String>> {
    use hl7_edge::ops::admin;
    let socket = admin::socket_path(&config.state_dir);
    match admin::request(&socket, &req) {
        Ok(Some(v)) => Ok(Ok(v)),
        Err(admin::AdminError::Command(e)) => Ok(Err(e)),
        Err(e) => Err(e.into()),
        Ok(None) => offline_outbox(config, req),
    }
}

fn cmd_quarantine(config: Option<&Path>, cmd: &QuarantineCmd, json: bool) -> Result<ExitCode> {
    use hl7_edge::ops::admin::Request;
    const QUARANTINED: &str = "quarantined";
    let ids = match cmd {
        QuarantineCmd::List(page) => {
            let as_outbox = OutboxCmd::List {
                state: Some(QUARANTINED.into()),
                page: page.clone(),
            };
            return cmd_outbox(config, &as_outbox, json);
        }
        QuarantineCmd::Show(show) => {
            return cmd_outbox(config, &OutboxCmd::Show(show.clone()), json);
        }
        QuarantineCmd::Retry { ids, all, feed } => {
            if ids.is_empty() && !all {
                bail!("say which records to map again: their ids, or --all");
            }
            (!*all).then(|| ids.clone()).ok_or_else(|| feed.clone())
        }
    };
    let config = Config::load(config)?;
    let ids = match ids {
        Ok(ids) => ids,
        Err(feed) => {
            // Every quarantined record, paged by id, collected before any retry so records
            // that fail again are not retried twice in this run.
            let mut ids = Vec::new();
            let mut after = None;
            loop {
                let page = outbox_request(
                    &config,
                    Request::List {
                        state: Some(QUARANTINED.into()),
                        feed: feed.clone(),
                        after,
                        limit: 1000,
                    },
                )?
                .map_err(anyhow::Error::msg)?;
                let got: Vec<u64> = page
                    .as_array()
                    .map(Vec::as_slice)
                    .unwrap_or_default()
                    .iter()
                    .filter_map(|m| m["id"].as_u64())
                    .collect();
                match got.last() {
                    Some(last) => after = Some(*last),
                    None => break,
                }
                ids.extend(got);
            }
            ids
        }
    };
    let mut failed = 0usize;
    for id in &ids {
        match outbox_request(&config, Request::Retry { id: *id })? {
            Ok(v) if json => println!("{v}"),
            Ok(v) => println!(
                "#{id} is now {}",
                v["state"].as_str().unwrap_or("(unknown state)")
            ),
            Err(e) => {
                failed += 1;
                eprintln!("hl7-edge quarantine: #{id}: {e}");
            }
        }
    }
    if ids.is_empty() && !json {
        println!("no quarantined records");
    }
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// No daemon answers on the admin socket: open the database directly (we are then its only
/// user) and run the same command code.
fn offline_outbox(
    config: &Config,
    req: hl7_edge::ops::admin::Request,
) -> Result<std::result::Result<serde_json::Value, String>> {
    use hl7_edge::ops::admin;
    let path = config.outbox_path();
    if !path.exists() {
        bail!(
            "no outbox at {} (state_dir {}); is --config the daemon's configuration?",
            path.display(),
            config.state_dir.display()
        );
    }
    let outbox = match Outbox::open(&path, config.outbox.limits()) {
        Ok(o) => o,
        Err(e) if e.is_locked() => bail!(
            "{} is held by a running hl7-edge but its admin socket {} does not answer; \
             is the daemon starting or stopping? try again",
            path.display(),
            admin::socket_path(&config.state_dir).display()
        ),
        Err(e) => return Err(e.into()),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(async move {
        let writer = Writer::spawn(outbox.clone())?;
        let cx = admin::Context {
            outbox,
            writer: writer.clone(),
            mapper: None,
            forward: None,
        };
        let r = admin::execute(&cx, req).await;
        writer.shutdown().await;
        Ok(r)
    })
}

fn print_outbox(cmd: &OutboxCmd, v: &serde_json::Value, json: bool) {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
        );
        return;
    }
    let s = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "-".into(),
        other => other.to_string(),
    };
    match cmd {
        OutboxCmd::List { .. } => {
            println!(
                "{:>10}  {:<14} {:<16} {:<10} {:<20} reason",
                "id", "state", "feed", "type", "control id"
            );
            for m in v.as_array().map(Vec::as_slice).unwrap_or_default() {
                println!(
                    "{:>10}  {:<14} {:<16} {:<10} {:<20} {}",
                    s(&m["id"]),
                    s(&m["state"]),
                    s(&m["feed"]),
                    s(&m["message_type"]),
                    s(&m["control_id"]),
                    if m["reason"].is_null() {
                        String::new()
                    } else {
                        s(&m["reason"])
                    }
                );
            }
        }
        OutboxCmd::Stats => {
            if let Some(obj) = v.as_object() {
                for (k, val) in obj {
                    match val {
                        serde_json::Value::Object(_) => println!(
                            "{k}: {}",
                            serde_json::to_string_pretty(val).unwrap_or_default()
                        ),
                        other => println!("{k}: {}", s(other)),
                    }
                }
            }
        }
        OutboxCmd::Show(_) => {
            if let Some(obj) = v.as_object() {
                for (k, val) in obj {
                    match (k.as_str(), val) {
                        ("raw", serde_json::Value::String(raw)) => println!("raw:\n{raw}"),
                        ("bundle", b) => println!(
                            "bundle:\n{}",
                            serde_json::to_string_pretty(b).unwrap_or_default()
                        ),
                        (k, other) => println!("{k}: {}", s(other)),
                    }
                }
            }
        }
        OutboxCmd::Retry { id } => println!("#{id} is now {}", s(&v["state"])),
        OutboxCmd::Purge { .. } => {
            println!("removed {} audit rows", s(&v["removed_audit_rows"]))
        }
    }
}

/// Opens the outbox, waiting a little if another process holds it (an `hl7-edge outbox`
/// command working on the stopped daemon's store finishes in well under a second).
async fn open_outbox(config: &Config) -> Result<Outbox> {
    let path = config.outbox_path();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        match Outbox::open(&path, config.outbox.limits()) {
            Ok(o) => return Ok(o),
            Err(e) if e.is_locked() && tokio::time::Instant::now() < deadline => {
                info!(path = %path.display(), "outbox held by another process; waiting");
                tokio::time::sleep(std::time::Duration::from_millis(250)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

fn run(config_path: Option<&Path>) -> Result<ExitCode> {
    let config = Config::load(config_path)?;
    logging::init(&config.log);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.runtime.io_threads())
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(daemon(config))?;
    Ok(ExitCode::SUCCESS)
}

async fn daemon(config: Config) -> Result<()> {
    let feeds = adapter::load(config.adapters_dir.as_deref(), &config.site)?;
    let mappings = load_mappings(&config, (None, None))?;
    info!(origin = %mappings.origin, "mappings loaded");
    create_state_dir(&config.state_dir)?;

    let key_path = config.signing_key_path();
    let (key, generated) = SigningKey::load_or_generate(&key_path)
        .with_context(|| format!("signing key {}", key_path.display()))?;
    if generated {
        // The key module logs the generation itself; this says what the operator must do next.
        info!(public_jwk = %hl7_edge::sign::key::public_jwk_path(&key_path).display(), "give the exchange this public key to verify Bundles");
    }
    let key = Arc::new(key);

    let outbox = open_outbox(&config).await?;
    let writer = Writer::spawn(outbox.clone())?;
    let admin_path = admin::socket_path(&config.state_dir);
    let admin_listener = admin::bind(&admin_path)?;
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
    let admin_ids_tx = ids_tx.clone();
    drop(ids_tx);

    let reloader = Arc::new(pipeline::reload::Reloader::new(
        processor.clone(),
        config.mappings_dir.clone(),
        config.site_mappings_dir.clone(),
    ));
    let mapper = tokio::spawn(pipeline::run_mapper(
        processor,
        key,
        feed_map.clone(),
        outbox.clone(),
        writer.clone(),
        ids_rx,
        trigger.subscribe(),
    ));
    let forward_status = Arc::new(forward::ForwardStatus::default());
    let forwarder = forward::mqtt::Forwarder::spawn_with_status(
        config.mqtt_effective(),
        outbox.clone(),
        writer.clone(),
        feed_map.keys().cloned().collect(),
        shutdown.receiver(),
        forward_status.clone(),
    )?;
    let admin_task = tokio::spawn(admin::serve(
        admin_listener,
        admin_path,
        admin::Context {
            outbox: outbox.clone(),
            writer: writer.clone(),
            mapper: Some(admin_ids_tx),
            forward: Some(forward_status),
        },
        trigger.subscribe(),
    ));
    let pruner = tokio::spawn(prune_audit(
        writer.clone(),
        config.outbox.audit_retention_days,
        trigger.subscribe(),
    ));
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

    wait_for_signal(&reloader).await;
    info!("stopping: finishing in-flight messages");
    trigger.fire();
    for s in serving {
        let _ = s.await;
    }
    let _ = mapper.await;
    let _ = forwarder.await;
    let _ = admin_task.await;
    let _ = pruner.await;
    writer.shutdown().await;
    info!("stopped");
    Ok(())
}

/// Removes audit rows older than the retention time: at start, then hourly.
async fn prune_audit(
    writer: hl7_edge::outbox::WriterHandle,
    retention_days: u32,
    mut shutdown: shutdown::Shutdown,
) {
    let retention = std::time::Duration::from_secs(u64::from(retention_days) * 24 * 3600);
    let mut every = tokio::time::interval(std::time::Duration::from_secs(3600));
    loop {
        tokio::select! {
            _ = shutdown.recv() => return,
            _ = every.tick() => {}
        }
        match writer.prune_audit(retention).await {
            Ok(0) => {}
            Ok(n) => info!(
                removed = n,
                retention_days, "outbox: pruned audit rows of delivered messages"
            ),
            Err(e) => error!(error = %e, "outbox: cannot prune audit rows; retrying in an hour"),
        }
    }
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

/// Waits for SIGTERM or SIGINT; on SIGHUP reloads the mappings (a broken set is refused and the
/// running one kept; see `pipeline::reload`).
async fn wait_for_signal(reloader: &Arc<pipeline::reload::Reloader>) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        error!("cannot install signal handlers; stopping on Ctrl-C only");
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    loop {
        tokio::select! {
            _ = term.recv() => return,
            _ = int.recv() => return,
            _ = hup.recv() => {
                info!("SIGHUP: reloading mappings");
                let r = reloader.clone();
                // Loading reads files and compiles: off the async threads.
                let _ = tokio::task::spawn_blocking(move || r.reload()).await;
            }
        }
    }
}
