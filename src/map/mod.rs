//! The mapping stage: declarative YAML (in `mappings/`) compiled once into a [`plan::Plan`], then
//! run per message to produce the resources of a London-profile message Bundle.
//!
//! Authors write YAML; nothing here needs Rust to change. The language is documented for them in
//! `mappings/README.md`. Loading reports **every** error with `file:line:column`; a set with any
//! error is never used (the daemon keeps its previous set, the CLI exits non-zero).

pub mod compile;
pub mod model;
pub mod path;
pub mod plan;
pub mod run;

use std::path::{Path, PathBuf};

use crate::hl7::Message;
pub use compile::LoadError;
pub use run::{BuiltResource, MapResult, RunContext, RunError};

mod embedded {
    include!(concat!(env!("OUT_DIR"), "/embedded_mappings.rs"));
}

/// A loaded, compiled set of mappings.
#[derive(Debug)]
pub struct MappingSet {
    plan: plan::Plan,
    /// Where it came from (a folder, or "embedded"), for logs.
    pub origin: String,
}

/// Why a message could not be mapped.
#[derive(Debug, thiserror::Error)]
pub enum MapError {
    #[error("no mapping handles {code}^{trigger}{}", structure.as_ref().map(|s| format!("^{s}")).unwrap_or_default())]
    NoRoute {
        code: String,
        trigger: String,
        structure: Option<String>,
    },
    #[error("the mapping produced no resources for this message")]
    Empty,
    #[error("mapping defect: {0}")]
    Run(#[from] RunError),
}

impl MappingSet {
    /// The mappings compiled into the binary.
    pub fn embedded() -> Result<MappingSet, Vec<LoadError>> {
        let texts: Vec<(String, String)> = embedded::EMBEDDED
            .iter()
            .map(|(n, t)| (n.to_string(), t.to_string()))
            .collect();
        Self::from_texts(&texts, "embedded")
    }

    /// Every `*.yaml` below `dir` (except `tests/`).
    pub fn load_dir(dir: &Path) -> Result<MappingSet, Vec<LoadError>> {
        let mut files = Vec::new();
        collect(dir, &mut files).map_err(|e| {
            vec![LoadError {
                file: dir.display().to_string(),
                line: 0,
                column: 0,
                message: format!("cannot read the mappings folder: {e}"),
            }]
        })?;
        files.sort();
        let mut texts = Vec::new();
        let mut errors = Vec::new();
        for f in files {
            match std::fs::read_to_string(&f) {
                Ok(t) => texts.push((f.display().to_string(), t)),
                Err(e) => errors.push(LoadError {
                    file: f.display().to_string(),
                    line: 0,
                    column: 0,
                    message: format!("cannot read: {e}"),
                }),
            }
        }
        if texts.is_empty() && errors.is_empty() {
            errors.push(LoadError {
                file: dir.display().to_string(),
                line: 0,
                column: 0,
                message: "no *.yaml mapping files found".into(),
            });
        }
        match Self::from_texts(&texts, &dir.display().to_string()) {
            Ok(set) if errors.is_empty() => Ok(set),
            Ok(_) => Err(errors),
            Err(mut e) => {
                errors.append(&mut e);
                Err(errors)
            }
        }
    }

    /// Loads from `dir` if given, else the embedded set.
    pub fn load(dir: Option<&Path>) -> Result<MappingSet, Vec<LoadError>> {
        match dir {
            Some(d) => Self::load_dir(d),
            None => Self::embedded(),
        }
    }

    fn from_texts(texts: &[(String, String)], origin: &str) -> Result<MappingSet, Vec<LoadError>> {
        let mut errors = Vec::new();
        let mut parsed = Vec::new();
        for (name, text) in texts {
            match compile::parse_file(name, text) {
                Ok(p) => parsed.push(p),
                Err(e) => errors.push(e),
            }
        }
        match compile::compile(&parsed) {
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

    /// The most specific mapping for a message type, among `allowed` (empty: all).
    pub fn route(
        &self,
        code: &str,
        trigger: &str,
        structure: Option<&str>,
        allowed: &[String],
    ) -> Option<&plan::MessagePlan> {
        self.plan
            .messages
            .iter()
            .filter(|m| allowed.is_empty() || allowed.contains(&m.name))
            .filter_map(|m| {
                m.matches
                    .iter()
                    .filter_map(|p| p.score(code, trigger, structure))
                    .max()
                    .map(|s| (s, m))
            })
            .max_by_key(|(s, _)| *s)
            .map(|(_, m)| m)
    }

    /// Maps one parsed message to the Bundle's resources.
    pub fn map(
        &self,
        msg: &Message,
        cx: &RunContext<'_>,
        allowed: &[String],
    ) -> Result<MapResult, MapError> {
        let h = msg.header();
        let mt = &h.message_type;
        let mp = self
            .route(&mt.code, &mt.trigger, mt.structure.as_deref(), allowed)
            .ok_or_else(|| MapError::NoRoute {
                code: mt.code.clone(),
                trigger: mt.trigger.clone(),
                structure: mt.structure.clone(),
            })?;
        let out = run::run(&self.plan, mp, msg, cx)?;
        if out.resources.is_empty() {
            return Err(MapError::Empty);
        }
        Ok(out)
    }
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_dir() {
            if p.file_name().is_some_and(|n| n == "tests") {
                continue;
            }
            collect(&p, out)?;
        } else if p.extension().is_some_and(|x| x == "yaml" || x == "yml") {
            out.push(p);
        }
    }
    Ok(())
}
