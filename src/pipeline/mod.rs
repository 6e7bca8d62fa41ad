//! Wiring between stages: one stored message -> one signed Bundle (or a quarantine reason).
//!
//! [`Processor`] is the pure part (bytes in, Bundle out; also used offline by `hl7-edge map`).
//! [`run_mapper`] is the daemon's worker loop: it takes record ids from ingest (and, at start, every
//! record still `Received` from the store: crash recovery), runs the CPU-bound work on the blocking
//! pool, and records the result through the store writer.
//!
//! The mapping set can be replaced while the daemon runs ([`reload`]): each message takes the set
//! current when its mapping starts and keeps it to the end, so a reload never splits a message
//! between two sets and never drops one.

pub mod reload;
pub mod survey;
pub mod workers;

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use tokio::sync::mpsc::UnboundedReceiver;
use tokio::sync::{Semaphore, TryAcquireError};
use tokio::task::JoinSet;
use tracing::{debug, error, info, warn};

use crate::config::SiteConfig;
use crate::fhir::envelope::{self, EnvelopeInput};
use crate::fhir::profile::{self, ProfileConfig};
use crate::fhir::tree::{Json, obj};
use crate::fhir::validate;
use crate::hl7;
use crate::ingest::adapter::FeedConfig;
use crate::map::{Explain, Explanation, MapError, MappingSet, RunContext};
use crate::ops::shutdown::Shutdown;
use crate::outbox::{BundleInfo, Outbox, RecordId, RecordState, WriterHandle};
use crate::sign::{self, SigningKey};

/// Why a stored message became a quarantine record instead of a Bundle. Texts carry no patient
/// data: segment and field names, control ids, rule locations.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("character set: {0}")]
    Charset(#[from] hl7::CharsetError),
    #[error("parse: {0}")]
    Parse(#[from] hl7::ParseError),
    #[error("map: {0}")]
    Map(#[from] MapError),
    #[error("validation: {0}")]
    Invalid(#[from] validate::Invalid),
    #[error("London profile: {}", .0.join("; "))]
    Profile(Vec<String>),
    #[error("signing: {0}")]
    Sign(#[from] sign::SignError),
    #[error("serialise: {0}")]
    Json(#[from] serde_json::Error),
}

/// A Bundle and what the mapping had to say about it.
#[derive(Debug)]
pub struct Produced {
    pub bundle: Json,
    pub warnings: Vec<String>,
    /// With [`Explain::On`]: which rule produced each element, and what no rule read.
    pub explain: Option<Explanation>,
}

/// Bytes -> validated, unsigned Bundle.
pub struct Processor {
    mappings: RwLock<Arc<MappingSet>>,
    pub site: SiteConfig,
    pub profile: ProfileConfig,
    pub tz: jiff::tz::TimeZone,
}

impl Processor {
    pub fn new(
        mappings: Arc<MappingSet>,
        site: SiteConfig,
        profile: ProfileConfig,
    ) -> Result<Processor, String> {
        let tz = jiff::tz::TimeZone::get(&site.timezone)
            .map_err(|e| format!("site.timezone {:?}: {e}", site.timezone))?;
        Ok(Processor {
            mappings: RwLock::new(mappings),
            site,
            profile,
            tz,
        })
    }

    /// The mapping set in use now.
    pub fn mappings(&self) -> Arc<MappingSet> {
        // A poisoned lock still holds a valid set (it is only ever replaced whole).
        match self.mappings.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Replaces the mapping set; messages already being mapped finish with the old one.
    pub fn replace_mappings(&self, set: Arc<MappingSet>) {
        match self.mappings.write() {
            Ok(mut g) => *g = set,
            Err(p) => *p.into_inner() = set,
        }
    }

    /// Decodes, parses, maps, assembles and validates one message.
    pub fn bundle(
        &self,
        raw: &[u8],
        feed: &FeedConfig,
        received_at: jiff::Timestamp,
    ) -> Result<Produced, ProcessError> {
        let produced = self.build(raw, feed, received_at, Explain::Off)?;
        self.validate(&produced.bundle)?;
        Ok(produced)
    }

    /// Decodes, parses, maps and assembles one message without validating the result (for
    /// `hl7-edge map`, which shows authors the Bundle *and* what is wrong with it), optionally
    /// recording where every element came from.
    pub fn build(
        &self,
        raw: &[u8],
        feed: &FeedConfig,
        received_at: jiff::Timestamp,
        explain: Explain,
    ) -> Result<Produced, ProcessError> {
        let (text, encoding) = hl7::decode_to_utf8(raw, feed.fallback_encoding())?;
        let msg = hl7::parse(&text)?;
        let cx = RunContext {
            site: &self.site,
            tz: &self.tz,
            feed: &feed.name,
            feed_variables: Some(&feed.variables),
            clock_change: feed.clock_change.unwrap_or(self.site.clock_change),
            encoding,
        };
        let mut mapped = self
            .mappings()
            .map_explained(&msg, &cx, &feed.mappings, explain)?;
        let mut warnings = mapped.warnings.clone();
        for flag in &mapped.clock_flags {
            // The rule's position and the flag only: never the time itself.
            warn!(feed = %feed.name, control_id = %msg.header().control_id, flag = %flag, "local time in a clock change; resolved by policy and tagged");
            warnings.push(format!("local time in a clock change: {flag}"));
        }
        let explain = mapped.explain.take();
        let digest = ring::digest::digest(&ring::digest::SHA256, raw);
        let mut raw_sha256 = [0u8; 32];
        raw_sha256.copy_from_slice(digest.as_ref());
        let input = EnvelopeInput {
            site: &self.site,
            tz: &self.tz,
            header: msg.header(),
            received_at,
            raw_sha256,
        };
        let bundle = envelope::assemble(&input, mapped);
        Ok(Produced {
            bundle,
            warnings,
            explain,
        })
    }

    /// FHIR R4 structure, then the London overlay's minimums.
    pub fn validate(&self, bundle: &Json) -> Result<(), ProcessError> {
        validate::validate(bundle)?;
        let misses = profile::check(bundle, &self.profile);
        if misses.is_empty() {
            Ok(())
        } else {
            Err(ProcessError::Profile(misses))
        }
    }

    /// [`Self::bundle`], then signs it; returns the bytes to store and forward.
    pub fn signed_bytes(
        &self,
        raw: &[u8],
        feed: &FeedConfig,
        received_at: jiff::Timestamp,
        key: &SigningKey,
    ) -> Result<(Vec<u8>, Vec<String>), ProcessError> {
        self.signed(raw, feed, received_at, key)
            .map(|s| (s.bytes, s.warnings))
    }

    /// [`Self::signed_bytes`], with what the forwarder needs besides the bytes.
    pub fn signed(
        &self,
        raw: &[u8],
        feed: &FeedConfig,
        received_at: jiff::Timestamp,
        key: &SigningKey,
    ) -> Result<Signed, ProcessError> {
        let Produced {
            mut bundle,
            warnings,
            ..
        } = self.bundle(raw, feed, received_at)?;
        let when = envelope::instant(jiff::Timestamp::now(), &self.tz);
        let who = obj([
            ("type", "Device".into()),
            (
                "identifier",
                obj([
                    ("system", "urn:ietf:rfc:3986".into()),
                    ("value", self.site.appliance_uri().into()),
                ]),
            ),
        ]);
        sign::sign_bundle(&mut bundle, key, &when, who)?;
        let info = BundleInfo {
            message_id: bundle["identifier"]["value"].as_str().map(str::to_string),
            key_id: Some(key.kid().to_string()),
        };
        Ok(Signed {
            bytes: crate::fhir::json::to_vec(&bundle),
            warnings,
            info,
        })
    }
}

/// A signed Bundle ready for the outbox.
#[derive(Debug)]
pub struct Signed {
    pub bytes: Vec<u8>,
    pub warnings: Vec<String>,
    /// `Bundle.identifier.value` and the signing key id, for MQTT 5 user properties.
    pub info: BundleInfo,
}

/// Messages in flight (queued for a mapping thread, being mapped, or waiting for their Bundle's
/// commit) per mapping thread.
///
/// A message spends part of its turn waiting for the outbox writer to commit its Bundle, and
/// the writer commits whatever is queued in one transaction. With 4 per thread the mapping
/// threads idled during those waits and the writer committed ~4 operations at a time; with 16,
/// commits carry ~9 and the end-to-end benchmark went from ~4,700 to ~5,600 messages/s at 8
/// connections, with ~12% less daemon CPU per message (README, Performance). The pool still
/// runs one message per thread at a time; [`IN_FLIGHT_BYTES`] bounds the memory the rest hold.
const IN_FLIGHT_PER_THREAD: usize = 16;

/// The most raw message bytes held by messages in flight (a message larger than this runs
/// alone). With large messages (a 2 MB ORU with embedded PDFs) the count above would otherwise
/// let dozens of them, and their Bundles, sit in memory at once.
const IN_FLIGHT_BYTES: usize = 4 * 1024 * 1024;

/// The daemon's mapping workers: until shutdown, turn `Received` records into `Ready` or
/// `Quarantined` ones.
pub async fn run_mapper(
    processor: Arc<Processor>,
    key: Arc<SigningKey>,
    feeds: HashMap<String, Arc<FeedConfig>>,
    outbox: Outbox,
    writer: WriterHandle,
    mut ids: UnboundedReceiver<RecordId>,
    mut shutdown: Shutdown,
) {
    let parallel = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2);
    let in_flight = parallel * IN_FLIGHT_PER_THREAD;
    let mut running: JoinSet<()> = JoinSet::new();
    let pool = match workers::CpuPool::new(parallel, workers::MAPPER_NICE) {
        Ok(p) => p,
        Err(e) => {
            // Nothing is lost: every record stays `Received` and is mapped at the next start.
            error!(error = %e, "cannot start the mapping threads; messages are stored but not mapped");
            return;
        }
    };
    let ctx = Arc::new(Worker {
        pool,
        bytes: Arc::new(Semaphore::new(IN_FLIGHT_BYTES)),
        processor,
        key,
        feeds,
        outbox: outbox.clone(),
        writer,
    });

    // Crash recovery: everything stored but not yet mapped, in id order.
    match outbox.pending_for_mapping() {
        Ok(pending) => {
            if !pending.is_empty() {
                info!(
                    count = pending.len(),
                    "resuming messages stored before the last stop"
                );
            }
            for id in pending {
                while running.len() >= in_flight {
                    running.join_next().await;
                }
                let c = ctx.clone();
                running.spawn(async move { c.process(id).await });
            }
        }
        Err(e) => error!(error = %e, "cannot list stored messages to resume"),
    }

    loop {
        tokio::select! {
            _ = shutdown.recv() => break,
            id = ids.recv() => {
                let Some(id) = id else { break };
                while running.len() >= in_flight {
                    running.join_next().await;
                }
                let c = ctx.clone();
                running.spawn(async move { c.process(id).await });
            }
        }
    }
    // Let in-flight work finish; anything not finished is still `Received` and resumes on start.
    while running.join_next().await.is_some() {}
}

struct Worker {
    pool: workers::CpuPool,
    /// Raw bytes of the messages in flight, in permits of one byte (see [`IN_FLIGHT_BYTES`]).
    bytes: Arc<Semaphore>,
    processor: Arc<Processor>,
    key: Arc<SigningKey>,
    feeds: HashMap<String, Arc<FeedConfig>>,
    outbox: Outbox,
    writer: WriterHandle,
}

impl Worker {
    /// Record `id` and its raw message, if it still waits for mapping.
    fn load(&self, id: RecordId) -> Option<(crate::outbox::Record, Vec<u8>)> {
        let mut record = match self.outbox.get(id) {
            Ok(Some(r)) => r,
            Ok(None) => return None,
            Err(e) => {
                error!(record = id.0, error = %e, "cannot read stored message");
                return None;
            }
        };
        if !matches!(record.state(), RecordState::Received) {
            return None;
        }
        let Some(raw) = record.raw.take() else {
            error!(record = id.0, "stored message has no body");
            return None;
        };
        Some((record, raw))
    }

    async fn process(self: Arc<Self>, id: RecordId) {
        let Some((mut record, mut raw)) = self.load(id) else {
            return;
        };
        // Held until the Bundle is stored (or the message quarantined): the raw bytes and the
        // Bundle live until then. A message larger than the whole budget waits for all of it.
        let want = u32::try_from(raw.len().clamp(1, IN_FLIGHT_BYTES)).unwrap_or(u32::MAX);
        let _budget = match self.bytes.clone().try_acquire_many_owned(want) {
            Ok(permit) => permit,
            Err(TryAcquireError::Closed) => return,
            Err(TryAcquireError::NoPermits) => {
                // Wait without the message in memory, then read it again: only the budget's
                // worth of raw bytes is ever held, however many large messages queue.
                drop(raw);
                debug!(
                    record = id.0,
                    bytes = want,
                    "waiting for the mappers' in-flight budget"
                );
                let Ok(permit) = self.bytes.clone().acquire_many_owned(want).await else {
                    return;
                };
                let Some(again) = self.load(id) else {
                    return;
                };
                (record, raw) = again;
                permit
            }
        };
        let Some(feed) = self.feeds.get(&record.meta.feed).cloned() else {
            let reason = format!("feed {:?} is no longer configured", record.meta.feed);
            let _ = self.writer.quarantine(id, reason).await;
            return;
        };
        let received_at = jiff::Timestamp::from_millisecond(record.meta.received_at_ms as i64)
            .unwrap_or_else(|_| jiff::Timestamp::now());
        let me = self.clone();
        let result = self
            .pool
            .run(move || me.processor.signed(&raw, &feed, received_at, &me.key))
            .await;
        let control_id = &record.meta.control_id;
        match result {
            Ok(Ok(signed)) => {
                for w in &signed.warnings {
                    debug!(record = id.0, control_id, warning = %w, "mapping note");
                }
                if let Err(e) = self
                    .writer
                    .set_ready_with(id, signed.bytes, signed.info)
                    .await
                {
                    error!(record = id.0, control_id, error = %e, "cannot store the Bundle; it will be retried at the next start");
                }
            }
            Ok(Err(e)) => {
                warn!(record = id.0, control_id, feed = %record.meta.feed, reason = %e, "quarantined");
                if let Err(e) = self.writer.quarantine(id, e.to_string()).await {
                    error!(record = id.0, error = %e, "cannot record the quarantine");
                }
            }
            Err(failed) => {
                // A panic in mapping is a defect; the quarantine keeps it from looping, and
                // `hl7-edge quarantine retry` maps it again once the defect is fixed.
                error!(record = id.0, control_id, error = %failed, "mapping task failed");
                let _ = self
                    .writer
                    .quarantine(
                        id,
                        "internal error while mapping (see the appliance log)".into(),
                    )
                    .await;
            }
        }
    }
}
