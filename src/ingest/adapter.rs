//! Feed definitions: one declarative TOML file per legacy feed in `adapters/`.
//!
//! A feed says how bytes arrive (transport and its settings), how to read them (charset fallback)
//! and which mappings may apply. The daemon starts one source per feed; the feed's name travels
//! with every message into the outbox, the MQTT topic and the logs.

use crate::config::SiteConfig;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Format, Toml};
use serde::{Deserialize, Serialize};

use super::mllp::MllpConfig;
use super::serial::SerialConfig;

/// The feeds compiled into the binary, used when `adapters_dir` is not configured.
pub const EMBEDDED: &[(&str, &str)] = &[(
    "adapters/default-mllp.toml",
    include_str!("../../adapters/default-mllp.toml"),
)];

/// One feed.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeedConfig {
    /// Stable short name: `[a-z0-9-]`, unique across feeds.
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    /// Encoding label (WHATWG names: `windows-1252`, `iso-8859-1`, `utf-8`) used when MSH-18 is
    /// absent or wrong.
    #[serde(default)]
    pub charset_fallback: Option<String>,
    /// Names of the mappings this feed may use; empty means all loaded mappings.
    #[serde(default)]
    pub mappings: Vec<String>,
    /// When the positive ACK is sent: after the durable commit (default) or after mapping and
    /// validation too.
    #[serde(default)]
    pub ack_after: AckAfter,
    /// The duplicates window (`[duplicates]`).
    #[serde(default)]
    pub duplicates: DuplicatesConfig,
    /// Mapping variables for this feed's messages, overriding `[site.variables]` of the same
    /// name (`nhs_number_field = "PID-19"` for a feed that sends the NHS number there). Names
    /// must be site variables (configured or built in), so a typo is an error at start.
    #[serde(default)]
    pub variables: std::collections::BTreeMap<String, String>,
    /// This feed's clock-change policy (`earlier`, `later`, `reject`), instead of the site's.
    #[serde(default)]
    pub clock_change: Option<crate::fhir::time::AmbiguityPolicy>,
    pub transport: Transport,
}

/// When a feed's messages are acknowledged positively.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AckAfter {
    /// `AA`/`CA` as soon as the message is durably stored; mapping runs afterwards and a
    /// mapping failure becomes a quarantine record (never lost). Fast: the ACK never waits for
    /// the CPU-bound mapping.
    #[default]
    Commit,
    /// Map and validate first: a message that cannot be mapped gets `AE`/`CE` with the reason
    /// and is not stored (the sender keeps it); one that maps is stored, then `AA`/`CA`.
    Mapping,
}

/// `[duplicates]` of a feed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DuplicatesConfig {
    /// `drop` (default): a message already accepted (same sender MSH-3/MSH-4, MSH-10 and
    /// content) is acknowledged again but not stored or forwarded again. `off`: store all.
    pub mode: DuplicatesMode,
    /// How long an accepted message is remembered.
    pub window_hours: u32,
    /// Same control id with different content: `accept` (store, log a warning) or `reject`
    /// (`AR`/`CR`, error 205).
    pub on_conflict: crate::outbox::ConflictPolicy,
}

impl Default for DuplicatesConfig {
    fn default() -> Self {
        DuplicatesConfig {
            mode: DuplicatesMode::Drop,
            window_hours: 48,
            on_conflict: crate::outbox::ConflictPolicy::Accept,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DuplicatesMode {
    Drop,
    Off,
}

/// How the bytes of a feed arrive.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum Transport {
    /// HL7 MLLP over TCP.
    Mllp(MllpConfig),
    /// A serial (RS-232) line; see [`super::serial`].
    Serial(SerialConfig),
}

impl FeedConfig {
    /// The fallback charset as an `encoding_rs` encoding (validated at load time).
    pub fn fallback_encoding(&self) -> Option<&'static encoding_rs::Encoding> {
        self.charset_fallback
            .as_deref()
            .and_then(|l| encoding_rs::Encoding::for_label(l.as_bytes()))
    }
}

/// Why the feeds could not be loaded (every problem found, each with its file).
#[derive(Debug, thiserror::Error)]
#[error("{}", .0.join("\n"))]
pub struct AdapterError(pub Vec<String>);

/// Loads every `*.toml` in `dir` (sorted by file name), or the embedded feeds when `dir` is None.
/// A feed's `[variables]` must name site variables of `site` (configured or built in).
pub fn load(dir: Option<&Path>, site: &SiteConfig) -> Result<Vec<FeedConfig>, AdapterError> {
    let mut errors = Vec::new();
    let mut feeds = Vec::new();
    match dir {
        None => {
            for (name, text) in EMBEDDED {
                match Figment::from(Toml::string(text)).extract::<FeedConfig>() {
                    Ok(f) => feeds.push((PathBuf::from(name), f)),
                    Err(e) => errors.push(format!("{name}: {e}")),
                }
            }
        }
        Some(dir) => {
            let entries = match std::fs::read_dir(dir) {
                Ok(e) => e,
                Err(e) => {
                    return Err(AdapterError(vec![format!(
                        "cannot read adapters folder {}: {e}",
                        dir.display()
                    )]));
                }
            };
            let mut paths: Vec<PathBuf> = entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "toml"))
                .collect();
            paths.sort();
            for path in paths {
                match Figment::from(Toml::file_exact(&path)).extract::<FeedConfig>() {
                    Ok(f) => feeds.push((path, f)),
                    Err(e) => errors.extend(e.into_iter().map(|e| e.to_string())),
                }
            }
        }
    }
    let mut seen = std::collections::HashMap::new();
    for (path, f) in &feeds {
        if f.name.is_empty()
            || !f
                .name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        {
            errors.push(format!(
                "{}: feed name {:?} must be lower-case letters, digits and '-'",
                path.display(),
                f.name
            ));
        }
        if let Some(other) = seen.insert(f.name.clone(), path.clone()) {
            errors.push(format!(
                "{}: feed name {:?} is already used by {}",
                path.display(),
                f.name,
                other.display()
            ));
        }
        match &f.transport {
            Transport::Mllp(m) => {
                if let Err(e) = m.validate() {
                    errors.push(format!("{}: {e}", path.display()));
                }
            }
            Transport::Serial(s) => {
                for e in s.validate() {
                    errors.push(format!("{}: transport: {e}", path.display()));
                }
            }
        }
        for (name, value) in &f.variables {
            if site.variable(name).is_none() {
                errors.push(format!(
                    "{}: variables: `{name}` is not a site variable; declare it in the configuration's [site.variables] (with the value for other feeds) or use one of: {}",
                    path.display(),
                    site.variable_names().join(", ")
                ));
            } else if let Err(e) = crate::config::check_variable(name, value) {
                errors.push(format!("{}: variables: {e}", path.display()));
            }
        }
        if let Some(label) = &f.charset_fallback
            && encoding_rs::Encoding::for_label(label.as_bytes()).is_none()
        {
            errors.push(format!(
                "{}: charset_fallback {label:?} is not a known encoding (try windows-1252, iso-8859-1, utf-8)",
                path.display()
            ));
        }
    }
    if feeds.is_empty() && errors.is_empty() {
        errors.push("no feeds are defined: add a *.toml file to the adapters folder".into());
    }
    if errors.is_empty() {
        Ok(feeds.into_iter().map(|(_, f)| f).collect())
    } else {
        Err(AdapterError(errors))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_feed_loads() {
        let feeds = load(None, &SiteConfig::default()).expect("embedded feeds are valid");
        assert_eq!(feeds.len(), 1);
        assert_eq!(feeds[0].name, "mllp-default");
        let Transport::Mllp(m) = &feeds[0].transport else {
            panic!("the embedded feed is MLLP");
        };
        assert_eq!(m.bind.to_string(), "127.0.0.1:2575");
    }

    #[test]
    fn errors_name_the_file_and_all_problems() {
        let dir = tempfile::tempdir().expect("tmp");
        std::fs::write(
            dir.path().join("a.toml"),
            "name = \"Bad Name\"\ncharset_fallback = \"klingon\"\n[transport]\nkind = \"mllp\"\nbind = \"127.0.0.1:1\"\n",
        )
        .expect("write");
        std::fs::write(
            dir.path().join("b.toml"),
            "name = \"b\"\n[transport]\nkind = \"mllp\"\nbind = \"127.0.0.1:2\"\nmax_frame = 3\n",
        )
        .expect("write");
        let err = load(Some(dir.path()), &SiteConfig::default())
            .expect_err("must fail")
            .to_string();
        assert!(err.contains("a.toml") && err.contains("Bad Name"), "{err}");
        assert!(err.contains("klingon"), "{err}");
        assert!(err.contains("b.toml") && err.contains("max_frame"), "{err}");
    }

    #[test]
    fn ingest_settings_parse_and_are_checked() {
        let dir = tempfile::tempdir().expect("tmp");
        std::fs::write(
            dir.path().join("a.toml"),
            "name = \"a\"\nack_after = \"mapping\"\n[duplicates]\nmode = \"off\"\non_conflict = \"reject\"\n\
             [transport]\nkind = \"mllp\"\nbind = \"127.0.0.1:1\"\nallow = [\"10.0.0.0/8\", \"127.0.0.1\"]\n\
             start_byte = 0x02\nend_bytes = [0x03]\nframe_timeout_secs = 5\n",
        )
        .expect("write");
        let feeds = load(Some(dir.path()), &SiteConfig::default()).expect("valid");
        assert_eq!(feeds[0].ack_after, AckAfter::Mapping);
        assert_eq!(feeds[0].duplicates.mode, DuplicatesMode::Off);
        let Transport::Mllp(m) = &feeds[0].transport else {
            panic!("mllp");
        };
        assert_eq!(m.allow.len(), 2);
        assert_eq!(m.framing().trailer, None);
        assert_eq!(m.framing().start, 0x02);

        std::fs::write(
            dir.path().join("a.toml"),
            "name = \"a\"\n[transport]\nkind = \"mllp\"\nbind = \"127.0.0.1:1\"\nallow = [\"10.0.0.0/33\"]\n",
        )
        .expect("write");
        let err = load(Some(dir.path()), &SiteConfig::default())
            .expect_err("bad cidr")
            .to_string();
        assert!(err.contains("10.0.0.0/33"), "{err}");
        std::fs::write(
            dir.path().join("a.toml"),
            "name = \"a\"\n[transport]\nkind = \"mllp\"\nbind = \"127.0.0.1:1\"\nend_bytes = [1, 2, 3]\n",
        )
        .expect("write");
        let err = load(Some(dir.path()), &SiteConfig::default())
            .expect_err("bad framing")
            .to_string();
        assert!(err.contains("a.toml") && err.contains("end_bytes"), "{err}");
    }

    #[test]
    fn the_documented_serial_examples_load() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("adapters/examples");
        let feeds = load(Some(&dir), &SiteConfig::default()).expect("every example is valid");
        let modes: Vec<_> = feeds
            .iter()
            .filter_map(|f| match &f.transport {
                Transport::Serial(s) => Some(s.framing_name()),
                Transport::Mllp(_) => None,
            })
            .collect();
        for m in ["mllp", "stx", "astm", "timeout"] {
            assert!(modes.contains(&m), "an example for {m}: {modes:?}");
        }
    }

    #[test]
    fn serial_feeds_load_and_are_checked() {
        let dir = tempfile::tempdir().expect("tmp");
        std::fs::write(
            dir.path().join("lab.toml"),
            "name = \"lab\"\n[transport]\nkind = \"serial\"\ndevice = \"/dev/serial/by-id/usb-x\"\nbaud = 19200\n[transport.framing]\nmode = \"astm\"\n",
        )
        .expect("write");
        let feeds = load(Some(dir.path()), &SiteConfig::default()).expect("valid serial feed");
        let Transport::Serial(s) = &feeds[0].transport else {
            panic!("serial");
        };
        assert_eq!(s.baud, 19200);
        std::fs::write(
            dir.path().join("bad.toml"),
            "name = \"bad\"\n[transport]\nkind = \"serial\"\ndevice = \"/dev/x\"\nbaud = 0\n[transport.framing]\nmode = \"timeout\"\n",
        )
        .expect("write");
        let err = load(Some(dir.path()), &SiteConfig::default())
            .expect_err("baud 0")
            .to_string();
        assert!(err.contains("bad.toml") && err.contains("baud"), "{err}");
    }
}
