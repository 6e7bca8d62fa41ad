//! Configuration: built-in defaults < `--config FILE` (TOML) < environment `HL7EDGE_*`.
//!
//! Layering is done with figment so that every value carries where it came from; an error names the
//! key and the file (or environment variable) that set it. Unknown keys are errors
//! (`deny_unknown_fields` everywhere): a misspelt `max_frame_bytes` must not silently fall back to
//! its default on a hospital appliance.
//!
//! Environment variables nest with a double underscore: `HL7EDGE_MQTT__URL=mqtt://broker:1883`
//! sets `mqtt.url`, `HL7EDGE_SITE__ODS_CODE=RRV` sets `site.ods_code`.
//!
//! Feeds (one per legacy source) are not in this file: they are declared in `adapters/`, one TOML
//! file per feed (see [`crate::ingest::adapter`]).

use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

use crate::fhir::profile::ProfileConfig;
use crate::forward::mqtt::MqttConfig;

/// Everything the daemon and the offline commands need, one section per stage.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Who this appliance is and which namespaces its identifiers live in.
    pub site: SiteConfig,
    /// Where durable state lives (outbox, signing key). Defaults to `$STATE_DIRECTORY` (set by
    /// systemd's `StateDirectory=`) or `./hl7-edge-data`.
    pub state_dir: PathBuf,
    /// A folder of feed definitions (`*.toml`). Unset: the feeds embedded in the binary
    /// (one MLLP feed on 127.0.0.1:2575).
    pub adapters_dir: Option<PathBuf>,
    /// A folder of YAML mappings. Unset: the mappings embedded in the binary.
    pub mappings_dir: Option<PathBuf>,
    /// A folder of site mappings loaded on top of `mappings_dir` (or the embedded set): new
    /// definitions and `overlays:` that change the base ones without copying them.
    pub site_mappings_dir: Option<PathBuf>,
    pub signing: SigningConfig,
    pub outbox: OutboxConfig,
    pub mqtt: MqttConfig,
    /// London overlay minimums checked before signing; each can be relaxed per site.
    pub profile: ProfileConfig,
    pub log: LogConfig,
    pub runtime: RuntimeConfig,
}

/// Site identity: used in identifier systems, deterministic ids, topics and provenance.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SiteConfig {
    /// The trust's ODS organisation code (e.g. `RRV` for UCLH). Keys local identifier namespaces
    /// and deterministic resource ids.
    pub ods_code: String,
    /// This appliance's id: `meta.source`, the Provenance device, the MQTT client id and topic.
    pub appliance_id: String,
    /// Base of the project's own identifier namespaces; local MRNs become
    /// `<identifier_base>/<ODS>/mrn`, visit numbers `<identifier_base>/<ODS>/visit-number`.
    pub identifier_base: String,
    /// `MessageHeader.destination.endpoint`: the exchange's message endpoint.
    pub exchange_endpoint: String,
    /// IANA time zone for HL7 timestamps that carry no offset.
    pub timezone: String,
    /// Site variables for mappings: `[site.variables] pas_system = "..."` is `${site.pas_system}`
    /// in a mapping value. A feed may override any of them in its adapter file (`[variables]`);
    /// the shipped mappings read the ones in [`BUILTIN_VARIABLES`], which have defaults.
    pub variables: std::collections::BTreeMap<String, String>,
    /// A local time without offset that the clock change makes ambiguous (the repeated hour in
    /// October) or impossible (the skipped hour in March): `earlier` (default: the first
    /// occurrence, BST), `later` (GMT), or `reject` (quarantine the message). Either way the
    /// resource is tagged and a warning logged. A feed may set its own (`clock_change`).
    pub clock_change: crate::fhir::time::AmbiguityPolicy,
}

/// A site variable the shipped mappings read, with its default and its allowed values.
pub struct BuiltinVariable {
    pub name: &'static str,
    pub default: &'static str,
    pub allowed: &'static [&'static str],
    pub meaning: &'static str,
}

/// Site variables the shipped mappings read. Set them in `[site.variables]`, or per feed in the
/// adapter's `[variables]`; a value outside `allowed` is an error at start.
pub const BUILTIN_VARIABLES: &[BuiltinVariable] = &[
    BuiltinVariable {
        name: "nhs_number_field",
        default: "PID-3",
        allowed: &["PID-3", "PID-2", "PID-19"],
        meaning: "where the feed sends the NHS number: a PID-3 repetition with CX.5 NH/NHS, PID-2 or PID-19",
    },
    BuiltinVariable {
        name: "a04_encounter_status",
        default: "arrived",
        allowed: &["arrived", "in-progress"],
        meaning: "Encounter.status for A04 (register a patient)",
    },
];

/// Checks a variable's value against the built-in one of that name (if any).
pub fn check_variable(name: &str, value: &str) -> Result<(), String> {
    match BUILTIN_VARIABLES.iter().find(|b| b.name == name) {
        Some(b) if !b.allowed.contains(&value) => Err(format!(
            "variable `{name}` = {value:?} is not one of {} ({})",
            b.allowed.join(", "),
            b.meaning
        )),
        _ => Ok(()),
    }
}

impl Default for SiteConfig {
    fn default() -> Self {
        SiteConfig {
            ods_code: "XXX".into(),
            appliance_id: "hl7-edge".into(),
            identifier_base: "https://id.hl7-edge.invalid".into(),
            exchange_endpoint: "https://exchange.invalid/fhir/$process-message".into(),
            timezone: "Europe/London".into(),
            variables: Default::default(),
            clock_change: Default::default(),
        }
    }
}

impl SiteConfig {
    /// The appliance's own URI (`MessageHeader.source.endpoint`, `meta.source`, the Provenance
    /// device identifier). `source.endpoint` is a FHIR `url`, so this is an absolute URL in the
    /// site's identifier namespace rather than a `urn:`.
    pub fn appliance_uri(&self) -> String {
        format!(
            "{}/{}/device/{}",
            self.identifier_base.trim_end_matches('/'),
            self.ods_code,
            self.appliance_id
        )
    }

    /// The value of site variable `name`: configured, else the built-in default.
    pub fn variable(&self, name: &str) -> Option<&str> {
        self.variables.get(name).map(String::as_str).or_else(|| {
            BUILTIN_VARIABLES
                .iter()
                .find(|b| b.name == name)
                .map(|b| b.default)
        })
    }

    /// Every site variable name a mapping may use: configured ones and the built-in ones.
    pub fn variable_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.variables.keys().map(String::as_str).collect();
        for b in BUILTIN_VARIABLES {
            if !self.variables.contains_key(b.name) {
                names.push(b.name);
            }
        }
        names.sort_unstable();
        names
    }

    /// A local identifier system for `kind` (`mrn`, `visit-number`, `message-id`, ...).
    pub fn local_system(&self, kind: &str) -> String {
        let mut s = String::new();
        self.push_local_system(&mut s, kind);
        s
    }

    /// [`Self::local_system`] appended to `out` (mappings name these systems in many rules).
    pub fn push_local_system(&self, out: &mut String, kind: &str) {
        let base = self.identifier_base.trim_end_matches('/');
        out.reserve(base.len() + self.ods_code.len() + kind.len() + 2);
        out.push_str(base);
        out.push('/');
        out.push_str(&self.ods_code);
        out.push('/');
        out.push_str(kind);
    }
}

/// The Ed25519 key that signs every Bundle.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SigningConfig {
    /// PEM PKCS#8 key. Unset: `<state_dir>/signing-key.pem`, generated on first start.
    pub key_file: Option<PathBuf>,
}

/// Limits of the durable outbox.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutboxConfig {
    /// Refuse (negative ACK) new messages once stored, undelivered data reaches this size.
    pub max_bytes: u64,
    /// Refuse (negative ACK, "storage full") new messages while the state directory's
    /// filesystem has less free space than this; 0 disables the check.
    pub min_free_disk_bytes: u64,
    /// Refuse new messages once this many records are not yet delivered.
    pub max_records: u64,
    /// Refuse new messages while the oldest message waiting for delivery is older than this
    /// (seconds; 0: no age limit). The sender keeps them and its own alarms go off, instead of
    /// the appliance hoarding days of messages the exchange has not seen.
    pub max_age_secs: u64,
    /// How long the audit trail of delivered messages is kept, in days (pruned hourly).
    pub audit_retention_days: u32,
    /// Accepted messages are made durable in a journal (one small fsync per batch) and the
    /// database itself is made durable at most this many milliseconds later (a checkpoint).
    /// A crash never loses an accepted message; it only makes the appliance map and publish
    /// again what changed since the last checkpoint. 0: a full database commit per batch (no
    /// journal; slower ingest).
    pub checkpoint_interval_ms: u64,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        OutboxConfig {
            max_bytes: 1 << 30,
            min_free_disk_bytes: 128 << 20,
            max_records: 1_000_000,
            max_age_secs: 7 * 24 * 3600,
            audit_retention_days: 30,
            checkpoint_interval_ms: crate::outbox::DEFAULT_CHECKPOINT_INTERVAL_MS,
        }
    }
}

impl OutboxConfig {
    /// The store's limits.
    pub fn limits(&self) -> crate::outbox::OutboxLimits {
        crate::outbox::OutboxLimits {
            max_bytes: self.max_bytes,
            max_records: self.max_records,
            max_age_ms: self.max_age_secs.saturating_mul(1000),
            checkpoint_interval_ms: self.checkpoint_interval_ms,
        }
    }
}

/// Log output. Logs never carry patient data at info level or above.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `text` for people, `json` for log shippers.
    pub format: LogFormat,
    /// A tracing filter (`info`, `hl7_edge=debug`, ...). `RUST_LOG` overrides it.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

/// How the daemon's work is spread over threads.
///
/// The daemon has three kinds of busy threads: the async runtime's (MLLP and serial ingest, MQTT,
/// the admin socket), the mapping threads (map, validate, sign: one per CPU, at a lower
/// priority) and the outbox writer. Giving the runtime one thread per CPU as well puts two busy
/// threads on every core, and their hand-offs cost more than the runtime saves: on the 2-core
/// benchmark machine, one runtime thread instead of two cut the daemon's CPU per message by ~10%
/// and raised the end-to-end rate by ~8% (README, Performance). Hence half the CPUs by default.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    /// Threads of the async runtime. Unset: half the CPUs, at least 1.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub io_threads: Option<usize>,
}

impl RuntimeConfig {
    /// The number of runtime threads to start.
    pub fn io_threads(&self) -> usize {
        self.io_threads.unwrap_or_else(|| {
            let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
            (cpus / 2).max(1)
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            site: SiteConfig::default(),
            state_dir: default_state_dir(),
            adapters_dir: None,
            mappings_dir: None,
            site_mappings_dir: None,
            signing: SigningConfig::default(),
            outbox: OutboxConfig::default(),
            mqtt: MqttConfig::default(),
            profile: ProfileConfig::default(),
            log: LogConfig::default(),
            runtime: RuntimeConfig::default(),
        }
    }
}

fn default_state_dir() -> PathBuf {
    // systemd's StateDirectory= exports the absolute path(s), colon-separated.
    match std::env::var_os("STATE_DIRECTORY") {
        Some(v) if !v.is_empty() => {
            let s = v.to_string_lossy().into_owned();
            PathBuf::from(s.split(':').next().unwrap_or(&s))
        }
        _ => PathBuf::from("hl7-edge-data"),
    }
}

/// A configuration that could not be loaded; the text names the key and its source.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration file {0} does not exist")]
    Missing(PathBuf),
    #[error("invalid configuration:\n{}", .0.iter().map(|e| format!("  - {e}")).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<String>),
}

impl Config {
    /// Defaults, then `file` if given, then the `HL7EDGE_*` environment.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        Self::load_with_env(file, Env::prefixed("HL7EDGE_").split("__"))
    }

    fn load_with_env(file: Option<&Path>, env: Env) -> Result<Config, ConfigError> {
        let mut fig = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = file {
            if !path.exists() {
                return Err(ConfigError::Missing(path.to_path_buf()));
            }
            fig = fig.merge(Toml::file_exact(path));
        }
        fig = fig.merge(env);
        let config: Config = fig
            .extract()
            .map_err(|e| ConfigError::Invalid(e.into_iter().map(|e| e.to_string()).collect()))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks that serde cannot express (each error names its key).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut errors = Vec::new();
        if self.site.ods_code.trim().is_empty()
            || !self
                .site
                .ods_code
                .chars()
                .all(|c| c.is_ascii_alphanumeric())
        {
            errors.push(format!(
                "site.ods_code {:?} is not an ODS code (letters and digits only)",
                self.site.ods_code
            ));
        }
        if self.site.appliance_id.trim().is_empty() {
            errors.push("site.appliance_id must not be empty".to_string());
        }
        if self.runtime.io_threads == Some(0) {
            errors.push("runtime.io_threads must be at least 1 (or unset: half the CPUs)".into());
        }
        for (name, value) in &self.site.variables {
            if let Err(e) = check_variable(name, value) {
                errors.push(format!("site.variables: {e}"));
            }
        }
        if jiff::tz::TimeZone::get(&self.site.timezone).is_err() {
            errors.push(format!(
                "site.timezone {:?} is not an IANA time zone (e.g. Europe/London)",
                self.site.timezone
            ));
        }
        if self.outbox.max_bytes < 1 << 20 {
            errors.push(format!(
                "outbox.max_bytes {} is below the 1 MiB minimum",
                self.outbox.max_bytes
            ));
        }
        if self.outbox.max_records == 0 {
            errors.push("outbox.max_records must be at least 1".to_string());
        }
        if !matches!(self.mqtt.qos, 1 | 2) {
            errors.push(format!(
                "mqtt.qos {} is not supported: use 1 or 2",
                self.mqtt.qos
            ));
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(errors))
        }
    }

    /// The signing key path (configured, or inside the state directory).
    pub fn signing_key_path(&self) -> PathBuf {
        self.signing
            .key_file
            .clone()
            .unwrap_or_else(|| self.state_dir.join("signing-key.pem"))
    }

    /// MQTT settings with the unset identity (`mqtt.site`, `mqtt.client_id`) filled in with
    /// the appliance id, so one setting names the appliance everywhere.
    pub fn mqtt_effective(&self) -> MqttConfig {
        self.mqtt.clone().with_appliance_id(&self.site.appliance_id)
    }

    /// The outbox database path.
    pub fn outbox_path(&self) -> PathBuf {
        self.state_dir.join("outbox.redb")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn no_env() -> Env {
        Env::prefixed("HL7EDGE_TEST_NEVER_SET_").split("__")
    }

    #[test]
    fn defaults_are_valid() {
        let c = Config::load_with_env(None, no_env()).expect("defaults load");
        assert_eq!(c.mqtt.url, "mqtt://127.0.0.1:1883");
        assert_eq!(c.site.timezone, "Europe/London");
        let m = c.mqtt_effective();
        assert_eq!(m.client_id.as_deref(), Some(c.site.appliance_id.as_str()));
        assert_eq!(m.site.as_deref(), Some(c.site.appliance_id.as_str()));
    }

    #[test]
    fn runtime_threads_default_to_half_the_cpus_and_zero_is_refused() {
        let c = Config::load_with_env(None, no_env()).expect("defaults load");
        let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
        assert_eq!(c.runtime.io_threads(), (cpus / 2).max(1));

        let mut f = tempfile::NamedTempFile::new().expect("tmp");
        writeln!(f, "[runtime]\nio_threads = 3").expect("write");
        let c = Config::load_with_env(Some(f.path()), no_env()).expect("load");
        assert_eq!(c.runtime.io_threads(), 3);

        let mut f = tempfile::NamedTempFile::new().expect("tmp");
        writeln!(f, "[runtime]\nio_threads = 0").expect("write");
        let err = Config::load_with_env(Some(f.path()), no_env()).expect_err("0 threads");
        assert!(err.to_string().contains("runtime.io_threads"), "{err}");
    }

    #[test]
    fn explicit_mqtt_identity_wins_over_the_appliance_id() {
        let mut f = tempfile::NamedTempFile::new().expect("tmp");
        writeln!(
            f,
            "[site]\nappliance_id = \"edge-7\"\n[mqtt]\nclient_id = \"cid\"\nprotocol = \"3.1.1\""
        )
        .expect("write");
        let c = Config::load_with_env(Some(f.path()), no_env()).expect("load");
        let m = c.mqtt_effective();
        assert_eq!(m.client_id.as_deref(), Some("cid"));
        assert_eq!(m.site.as_deref(), Some("edge-7"));
        assert_eq!(m.protocol, crate::forward::MqttProtocol::V311);
    }

    #[test]
    fn unknown_key_is_an_error_naming_key_and_file() {
        let mut f = tempfile::NamedTempFile::new().expect("tmp");
        writeln!(f, "[site]\nods_cod = \"RRV\"").expect("write");
        let err = Config::load_with_env(Some(f.path()), no_env()).expect_err("must fail");
        let text = err.to_string();
        assert!(text.contains("ods_cod"), "{text}");
        // figment shows the path relative to the working directory when it can: match the name.
        let name = f
            .path()
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        assert!(!name.is_empty() && text.contains(&name), "{text}");
    }

    #[test]
    fn file_overrides_defaults_and_bad_ods_is_reported() {
        let mut f = tempfile::NamedTempFile::new().expect("tmp");
        writeln!(f, "[site]\nods_code = \"R-V\"").expect("write");
        let err = Config::load_with_env(Some(f.path()), no_env()).expect_err("must fail");
        assert!(err.to_string().contains("site.ods_code"), "{err}");
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail API returns its own large error type
    fn environment_overrides_file() {
        // figment's Jail isolates the environment for this test.
        figment::Jail::expect_with(|jail| {
            jail.create_file("c.toml", "[site]\nods_code = \"RRV\"\n")?;
            jail.set_env("HL7EDGE_SITE__ODS_CODE", "RAL");
            jail.set_env("HL7EDGE_MQTT__URL", "mqtt://10.0.0.1:1884");
            let c = Config::load(Some(Path::new("c.toml"))).map_err(|e| e.to_string())?;
            assert_eq!(c.site.ods_code, "RAL");
            assert_eq!(c.mqtt.url, "mqtt://10.0.0.1:1884");
            Ok(())
        });
    }
}
