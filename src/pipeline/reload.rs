//! Hot reload of the mapping set (the daemon calls [`Reloader::reload`] on SIGHUP).
//!
//! Why all-or-nothing: a half-edited mapping folder is the normal state while an analyst works.
//! The new set is loaded and compiled completely off to the side; only a set with no error at all
//! replaces the running one. Otherwise the running set stays, every error is logged with its
//! `file:line:column`, and the failure is counted. Messages are never paused or dropped: each one
//! maps with whichever set was current when its mapping began.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tracing::{error, info};

use super::Processor;
use crate::map::{LoadError, MappingSet, Sources};

/// Reloads the mappings a [`Processor`] uses, from where they were first loaded.
pub struct Reloader {
    processor: Arc<Processor>,
    base: Option<PathBuf>,
    site: Option<PathBuf>,
    reloads: AtomicU64,
    failures: AtomicU64,
}

impl Reloader {
    /// `base`: the mappings folder (`None`: the embedded set, which cannot change, but a site
    /// folder on top of it can). `site`: the site folder, if any.
    pub fn new(processor: Arc<Processor>, base: Option<PathBuf>, site: Option<PathBuf>) -> Self {
        Reloader {
            processor,
            base,
            site,
            reloads: AtomicU64::new(0),
            failures: AtomicU64::new(0),
        }
    }

    /// Loads and compiles the set again; swaps it in only if it has no error.
    pub fn reload(&self) -> Result<(), Vec<LoadError>> {
        let sources = Sources {
            base: self.base.as_deref(),
            site: self.site.as_deref(),
            extra: Vec::new(),
        };
        match MappingSet::load_sources(&sources, Some(&self.processor.site)) {
            Ok(set) => {
                let n = self.reloads.fetch_add(1, Ordering::Relaxed) + 1;
                info!(origin = %set.origin, reloads = n, "mappings reloaded");
                self.processor.replace_mappings(Arc::new(set));
                Ok(())
            }
            Err(errors) => {
                let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
                for e in &errors {
                    error!(error = %e, "mapping error");
                }
                error!(
                    errors = errors.len(),
                    failed_reloads = n,
                    "mapping reload failed; the previous mappings stay in use"
                );
                Err(errors)
            }
        }
    }

    /// Reloads that succeeded so far.
    pub fn reloads(&self) -> u64 {
        self.reloads.load(Ordering::Relaxed)
    }

    /// Reloads refused because the new set had errors.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }
}
