//! The mapping stage: declarative YAML (in `mappings/`) compiled once into a [`plan::Plan`], then
//! run per message to produce the resources of a London-profile message Bundle.
//!
//! Authors write YAML; nothing here needs Rust to change. The language is documented for them in
//! `mappings/README.md`. Loading reports **every** error with `file:line:column`; a set with any
//! error is never used (the daemon keeps its previous set, the CLI exits non-zero).
//!
//! A set is built from layers: the base (a folder, or the mappings embedded in the binary), then
//! optionally a site folder whose files add definitions and `overlays:` that change base ones.

pub mod compile;
pub mod fhir_model;
pub mod golden;
pub mod model;
pub mod path;
pub mod plan;
pub mod run;
pub mod segments;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::config::SiteConfig;
use crate::hl7::Message;
pub use compile::LoadError;
pub use run::{BuiltResource, Explain, Explanation, MapResult, RunContext, RunError};

mod embedded {
    include!(concat!(env!("OUT_DIR"), "/embedded_mappings.rs"));
}

/// A loaded, compiled set of mappings.
#[derive(Debug)]
pub struct MappingSet {
    plan: plan::Plan,
    /// Where it came from (folders, or "embedded"), for logs.
    pub origin: String,
}

/// Why a message could not be mapped.
#[derive(Debug, thiserror::Error)]
pub enum MapError {
    #[error("no mapping handles {code}^{trigger}{} (version {version})", structure.as_ref().map(|s| format!("^{s}")).unwrap_or_default())]
    NoRoute {
        code: String,
        trigger: String,
        structure: Option<String>,
        version: String,
    },
    #[error("the mapping produced no resources for this message")]
    Empty,
    #[error("mapping defect: {0}")]
    Run(RunError),
    /// The message holds something the site's policy refuses (a local time in a clock change
    /// with `clock_change = "reject"`).
    #[error("refused by policy: {0}")]
    Refused(RunError),
}

impl From<RunError> for MapError {
    fn from(e: RunError) -> Self {
        if e.defect {
            MapError::Run(e)
        } else {
            MapError::Refused(e)
        }
    }
}

/// Where a set's files come from.
#[derive(Debug, Clone, Default)]
pub struct Sources<'a> {
    /// The base folder; `None`: the mappings embedded in the binary.
    pub base: Option<&'a Path>,
    /// A site folder loaded on top (new definitions and `overlays:`).
    pub site: Option<&'a Path>,
    /// Extra folders loaded on top, including their `tests/` (golden-test harness mappings).
    pub extra: Vec<&'a Path>,
}

/// The files of a set: (display name, text), YAML and CSV.
type Files = Vec<(String, String)>;

impl MappingSet {
    /// The mappings compiled into the binary.
    pub fn embedded() -> Result<MappingSet, Vec<LoadError>> {
        Self::load_sources(&Sources::default(), None)
    }

    /// Every `*.yaml` below `dir` (except `tests/`).
    pub fn load_dir(dir: &Path) -> Result<MappingSet, Vec<LoadError>> {
        Self::load_sources(
            &Sources {
                base: Some(dir),
                ..Sources::default()
            },
            None,
        )
    }

    /// Loads from `dir` if given, else the embedded set.
    pub fn load(dir: Option<&Path>) -> Result<MappingSet, Vec<LoadError>> {
        match dir {
            Some(d) => Self::load_dir(d),
            None => Self::embedded(),
        }
    }

    /// Loads every layer of `sources`. With `site`, `${site.NAME}` variables are checked
    /// against its `variables` at load time.
    pub fn load_sources(
        sources: &Sources<'_>,
        site: Option<&SiteConfig>,
    ) -> Result<MappingSet, Vec<LoadError>> {
        let mut files: Files = Vec::new();
        let mut errors = Vec::new();
        let mut origin = Vec::new();
        match sources.base {
            None => {
                files.extend(
                    embedded::EMBEDDED
                        .iter()
                        .map(|(n, t)| (n.to_string(), t.to_string())),
                );
                origin.push("embedded".to_string());
            }
            Some(d) => {
                read_layer(d, false, &mut files, &mut errors);
                origin.push(d.display().to_string());
            }
        }
        for (d, with_tests) in sources
            .site
            .iter()
            .map(|d| (*d, false))
            .chain(sources.extra.iter().map(|d| (*d, true)))
        {
            read_layer(d, with_tests, &mut files, &mut errors);
            origin.push(d.display().to_string());
        }
        let origin = origin.join(" + ");
        match Self::from_files(&files, &origin, site) {
            Ok(set) if errors.is_empty() => Ok(set),
            Ok(_) => Err(errors),
            Err(mut e) => {
                errors.append(&mut e);
                Err(errors)
            }
        }
    }

    fn from_files(
        files: &Files,
        origin: &str,
        site: Option<&SiteConfig>,
    ) -> Result<MappingSet, Vec<LoadError>> {
        let mut errors = Vec::new();
        let mut parsed = Vec::new();
        let mut others = HashMap::new();
        for (name, text) in files {
            if is_yaml(Path::new(name)) {
                match compile::parse_file(name, text) {
                    Ok(p) => parsed.push(p),
                    Err(e) => errors.push(e),
                }
            } else {
                others.insert(name.clone(), text.clone());
            }
        }
        let opts = compile::Options {
            site,
            files: others,
        };
        match compile::compile(&parsed, &opts) {
            Ok(plan) if errors.is_empty() => Ok(MappingSet {
                plan,
                origin: origin.to_string(),
            }),
            Ok(_) => Err(errors),
            Err(mut e) => {
                errors.append(&mut e);
                Err(errors)
            }
        }
    }

    /// Names of the message mappings, for `check` output.
    pub fn message_mappings(&self) -> impl Iterator<Item = &str> {
        self.plan.messages.iter().map(|m| m.name.as_str())
    }

    /// The most specific mapping for a message type and version, among `allowed` (empty: all).
    ///
    /// Specificity: a structure match beats a trigger match, which beats a code-only match; a
    /// version match breaks ties. Equal scores go to the mapping whose name sorts first, so the
    /// choice never depends on file order.
    pub fn route(
        &self,
        code: &str,
        trigger: &str,
        structure: Option<&str>,
        version: &str,
        allowed: &[String],
    ) -> Option<&plan::MessagePlan> {
        let mut best: Option<(u8, &plan::MessagePlan)> = None;
        for m in self
            .plan
            .messages
            .iter()
            .filter(|m| allowed.is_empty() || allowed.contains(&m.name))
        {
            let Some(v) = plan::version_score(&m.versions, version) else {
                continue;
            };
            let Some(s) = m
                .matches
                .iter()
                .filter_map(|p| p.score(code, trigger, structure))
                .max()
            else {
                continue;
            };
            let score = s + v;
            if best.is_none_or(|(b, _)| score > b) {
                best = Some((score, m));
            }
        }
        best.map(|(_, m)| m)
    }

    /// Maps one parsed message to the Bundle's resources.
    pub fn map(
        &self,
        msg: &Message,
        cx: &RunContext<'_>,
        allowed: &[String],
    ) -> Result<MapResult, MapError> {
        self.map_explained(msg, cx, allowed, Explain::Off)
    }

    /// [`Self::map`], optionally recording where every element came from.
    pub fn map_explained(
        &self,
        msg: &Message,
        cx: &RunContext<'_>,
        allowed: &[String],
        explain: Explain,
    ) -> Result<MapResult, MapError> {
        let h = msg.header();
        let mt = &h.message_type;
        let mp = self
            .route(
                &mt.code,
                &mt.trigger,
                mt.structure.as_deref(),
                &h.version,
                allowed,
            )
            .ok_or_else(|| MapError::NoRoute {
                code: mt.code.clone(),
                trigger: mt.trigger.clone(),
                structure: mt.structure.clone(),
                version: h.version.clone(),
            })?;
        let out = run::run(&self.plan, mp, msg, cx, explain)?;
        if out.resources.is_empty() {
            return Err(MapError::Empty);
        }
        Ok(out)
    }
}

fn is_yaml(p: &Path) -> bool {
    p.extension().is_some_and(|x| x == "yaml" || x == "yml")
}

fn read_layer(dir: &Path, with_tests: bool, files: &mut Files, errors: &mut Vec<LoadError>) {
    let mut found = Vec::new();
    if let Err(e) = collect(dir, with_tests, &mut found) {
        errors.push(LoadError {
            file: dir.display().to_string(),
            line: 0,
            column: 0,
            message: format!("cannot read the mappings folder: {e}"),
        });
        return;
    }
    found.sort();
    if !found.iter().any(|f| is_yaml(f)) && !with_tests {
        errors.push(LoadError {
            file: dir.display().to_string(),
            line: 0,
            column: 0,
            message: "no *.yaml mapping files found".into(),
        });
    }
    for f in found {
        match std::fs::read_to_string(&f) {
            Ok(t) => files.push((f.display().to_string(), t)),
            Err(e) => errors.push(LoadError {
                file: f.display().to_string(),
                line: 0,
                column: 0,
                message: format!("cannot read: {e}"),
            }),
        }
    }
}

fn collect(dir: &Path, with_tests: bool, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_dir() {
            if !with_tests && p.file_name().is_some_and(|n| n == "tests") {
                continue;
            }
            collect(&p, with_tests, out)?;
        } else if is_yaml(&p) || p.extension().is_some_and(|x| x == "csv") {
            out.push(p);
        }
    }
    Ok(())
}
