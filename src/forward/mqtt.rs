//! The MQTT publisher (rumqttc 0.25): MQTT 5 when the broker speaks it, else MQTT 3.1.1;
//! QoS 1 (or 2); FIFO per feed; broker refusals dead-lettered; health topics.
//!
//! # One task, one connection, all feeds
//!
//! A single task owns the rumqttc client *and* its event loop (through [`super::link`], which
//! hides whether it is rumqttc's 3.1.1 or MQTT 5 client). Each feed has a cursor (the last id
//! handed to the client); the task round-robins over the feeds, publishing the next `Ready`
//! record of each (read from [`Outbox::next_ready`]) while the total in flight stays below
//! `max_inflight` (and each feed's below `max_inflight_per_feed`). A feed whose head is still
//! `Received` waits (order is kept), without holding up the other feeds. New work is noticed
//! through the outbox's change watch; nothing polls the store on a timer.
//!
//! # How a PUBACK finds its record
//!
//! rumqttc does not return the packet id from `publish`; it reports it later as
//! `Outgoing::Publish(pkid)`. From the 0.25 source (`state.rs`, `eventloop.rs`, and the same in
//! `v5/`):
//!
//! 1. requests leave the client's channel strictly FIFO, and `MqttState::outgoing_publish`
//!    assigns the pkid and queues the `Outgoing::Publish(pkid)` event for each one in that
//!    order. On a pkid collision (broker acking out of order) it queues `AwaitAck` instead, stops
//!    taking requests, and emits `Outgoing::Publish(pkid)` for the held publish right after the
//!    PUBACK that frees the pkid -- still the same order;
//! 2. so the k-th `Outgoing::Publish` of a connection is the k-th `try_publish` of that
//!    connection, *provided* every publish on the client goes through this task's bookkeeping
//!    (record publishes and the health messages alike: both enter `submitted`) and no request
//!    crosses a connection boundary.
//!
//! The task keeps a FIFO `submitted` of what it handed to `try_publish`; on
//! `Outgoing::Publish(pkid)` it pops the front into `inflight[pkid]`; on the final
//! acknowledgement (PUBACK for QoS 1, PUBCOMP for QoS 2, or an MQTT 5 refusal) it takes
//! `inflight[pkid]` and settles exactly that record: delivered (through the writer, i.e. a
//! durable commit), dead-lettered, or retried later. A pkid is never reused while in flight
//! (rumqttc holds a colliding publish back), so the map is unambiguous.
//!
//! Connection boundaries are where rumqttc would otherwise break rule 2: on error it moves
//! unacked publishes and still-queued requests to `EventLoop::pending` and replays them after
//! a reconnect that resumes a session. We never let it: the session is clean
//! (`clean_session` / `clean_start`: the outbox, not the broker's session, is the source of
//! truth for what is unacknowledged, and we have no subscriptions to keep), and after *any*
//! error the task first processes the events rumqttc had already buffered (PUBACKs read before
//! the failure are genuine), then drops `pending`, any held collision and leftover events, and
//! forgets its own `submitted`/`inflight`. Because the same task owns the client and the event
//! loop, nothing can be published between that reset and the next CONNACK. Each feed then
//! restarts from its first undelivered record: at-least-once, never lost, first appearance in
//! id order. A persistent broker session would only spare the duplicates of the (at most
//! `max_inflight`) messages in flight at the break, at the price of rumqttc replaying
//! publishes behind the correlation's back; the exchange deduplicates on `Bundle.identifier`.
//!
//! The event loop's `poll()` future is never cancelled (a cancelled poll can drop a publish
//! that rumqttc already counted as sent): the task moves the loop into a future that polls once
//! and hands it back, and `select!`s on that future by reference.
//!
//! # Protocol version
//!
//! `mqtt.protocol = "auto"` (default) connects with MQTT 5; a broker that answers in a way
//! only a 3.1.1 broker would (a 3.1.1 CONNACK, "unsupported protocol version", closing before
//! CONNACK) is tried with MQTT 3.1.1 at once. The first version that gets a CONNACK is kept for
//! the life of the process; while neither has, attempts alternate (a broker that was merely
//! down is not mistaken for a 3.1.1 broker). With MQTT 5 each Bundle carries content type
//! `application/fhir+json`, payload format "UTF-8" and user properties `message-id`
//! (`Bundle.identifier.value`), `feed`, `source-control-id` (MSH-10) and `signature-key-id`.
//!
//! # Refusals and the dead-letter state
//!
//! A Bundle that cannot be sent (larger than `mqtt.max_packet_bytes` or than the broker's
//! announced maximum packet size) or that the broker refuses for good (MQTT 5 PUBACK/PUBREC
//! reason codes such as 0x87 not authorised, 0x83 implementation specific -- mosquitto's answer
//! beyond `message_size_limit` --, 0x90 topic invalid, 0x99 payload format invalid) becomes
//! `DeadLettered` with the reason, and its feed moves on. A transient refusal (0x97 quota
//! exceeded, 0x91 packet id in use) blocks only its feed, with exponential backoff and jitter,
//! and the record is sent again. Over MQTT 3.1.1 a broker cannot refuse a publish except by
//! closing the connection (and mosquitto acknowledges a publish it drops for size or ACL to a
//! 3.1.1 client as if it had taken it): use MQTT 5 where refusals must be seen.
//!
//! # Health topics
//!
//! * `<health_topic_prefix>/<site>/status`, retained: `{"state":"online",...}` after every
//!   CONNACK; the Last Will (retained) says `{"state":"offline","reason":"connection lost"}` and
//!   a clean stop publishes `{"state":"offline","reason":"shutdown"}` before DISCONNECT.
//! * `<health_topic_prefix>/<site>/<feed>/heartbeat`, retained, every `heartbeat_secs`: counts
//!   (received, refused, delivered, quarantined, dead-lettered since start, pending now), last
//!   message times, and `silent`. When a feed has received nothing for its quiet time
//!   (`feed_silent_secs`, per feed in `feed_silent_secs_by_feed`) a heartbeat with
//!   `"silent":true` goes out at once and a warning is logged; the first message after that
//!   clears it the same way.
//!
//! Health topics live beside, not under, the data prefix, so a consumer of `hl7-edge/#` sees
//! only Bundles and a fleet monitor subscribes to `hl7-edge-health/#`.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

use super::link::{
    Client, Ev, LinkOptions, Loop, PollFuture, PublishMeta, Refusal, Version, poll_once,
};
use crate::ops::health::{FeedHeartbeat, Status};
use crate::outbox::{Outbox, RecordId, RecordState, StoreError, WriterHandle, now_ms};

/// Which MQTT version to speak.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum MqttProtocol {
    /// MQTT 5, falling back to 3.1.1 when the broker does not speak 5.
    #[default]
    #[serde(rename = "auto")]
    Auto,
    #[serde(rename = "5")]
    V5,
    #[serde(rename = "3.1.1")]
    V311,
}

/// MQTT settings (`[mqtt]` in the configuration).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    /// `mqtt://host:port` (default port 1883) or `mqtts://host:port` (TLS, default port 8883).
    pub url: String,
    /// Must be unique per appliance: the broker disconnects the older of two equal ids.
    /// Unset: the appliance id (`site.appliance_id`).
    pub client_id: Option<String>,
    pub username: Option<String>,
    pub password: Option<String>,
    /// First level(s) of every data topic.
    pub topic_prefix: String,
    /// The site level of every topic. Unset: the appliance id (`site.appliance_id`).
    pub site: Option<String>,
    /// `auto` (MQTT 5, else 3.1.1), `5` or `3.1.1`.
    pub protocol: MqttProtocol,
    /// 1 (at least once, PUBACK) or 2 (PUBREC/PUBREL/PUBCOMP; still at-least-once end to end,
    /// since a clean session forgets the broker's duplicate detection at a reconnect).
    pub qos: u8,
    /// MQTT keep-alive in seconds, at least 5 (the broker detects a dead appliance, and
    /// publishes its Last Will, after 1.5 times this).
    pub keep_alive_secs: u64,
    /// Maximum unacknowledged publishes (over all feeds).
    pub max_inflight: u16,
    /// Maximum unacknowledged publishes of one feed; 0 means `max_inflight`. With 1, even a
    /// transient broker refusal cannot let a later message of the feed overtake an earlier one,
    /// at the price of one round trip per message.
    pub max_inflight_per_feed: u16,
    /// Largest MQTT packet we send; a Bundle that cannot fit is dead-lettered, not retried.
    pub max_packet_bytes: usize,
    pub connect_timeout_secs: u64,
    /// First reconnect delay; doubles per failure up to `reconnect_max_secs` (with jitter). The
    /// same schedule applies to one feed whose publish the broker refused for now.
    pub reconnect_initial_ms: u64,
    pub reconnect_max_secs: u64,
    /// PEM file of the CA(s) that sign the broker's certificate; required for `mqtts://`.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate chain and key, for brokers that require mutual TLS.
    pub client_cert_file: Option<PathBuf>,
    pub client_key_file: Option<PathBuf>,
    /// On shutdown, how long to wait for outstanding PUBACKs before disconnecting.
    pub shutdown_grace_secs: u64,
    /// First level(s) of the status and heartbeat topics.
    pub health_topic_prefix: String,
    /// Per-feed heartbeat period in seconds; 0 disables heartbeats.
    pub heartbeat_secs: u64,
    /// A feed that received nothing for this long is reported silent; 0 disables.
    pub feed_silent_secs: u64,
    /// Per-feed quiet times overriding `feed_silent_secs` (0 disables for that feed).
    pub feed_silent_secs_by_feed: BTreeMap<String, u64>,
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            url: "mqtt://127.0.0.1:1883".into(),
            client_id: None,
            username: None,
            password: None,
            topic_prefix: "hl7-edge".into(),
            site: None,
            protocol: MqttProtocol::Auto,
            qos: 1,
            keep_alive_secs: 30,
            max_inflight: 32,
            max_inflight_per_feed: 0,
            max_packet_bytes: 8 * 1024 * 1024,
            connect_timeout_secs: 10,
            reconnect_initial_ms: 500,
            reconnect_max_secs: 30,
            ca_file: None,
            client_cert_file: None,
            client_key_file: None,
            shutdown_grace_secs: 5,
            health_topic_prefix: "hl7-edge-health".into(),
            heartbeat_secs: 60,
            feed_silent_secs: 1800,
            feed_silent_secs_by_feed: BTreeMap::new(),
        }
    }
}

impl MqttConfig {
    /// Fills the unset identity settings (`client_id`, `site`) with the appliance id, so one
    /// setting names the appliance everywhere.
    pub fn with_appliance_id(mut self, appliance_id: &str) -> MqttConfig {
        if self.client_id.is_none() {
            self.client_id = Some(appliance_id.to_string());
        }
        if self.site.is_none() {
            self.site = Some(appliance_id.to_string());
        }
        self
    }

    fn quiet_time(&self, feed: &str) -> Option<Duration> {
        let secs = self
            .feed_silent_secs_by_feed
            .get(feed)
            .copied()
            .unwrap_or(self.feed_silent_secs);
        (secs > 0).then(|| Duration::from_secs(secs))
    }
}

impl fmt::Debug for MqttConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MqttConfig")
            .field("url", &self.url)
            .field("client_id", &self.client_id)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("topic_prefix", &self.topic_prefix)
            .field("site", &self.site)
            .field("protocol", &self.protocol)
            .field("qos", &self.qos)
            .field("keep_alive_secs", &self.keep_alive_secs)
            .field("max_inflight", &self.max_inflight)
            .field("max_packet_bytes", &self.max_packet_bytes)
            .field("ca_file", &self.ca_file)
            .field("client_cert_file", &self.client_cert_file)
            .field("client_key_file", &self.client_key_file)
            .field("health_topic_prefix", &self.health_topic_prefix)
            .finish_non_exhaustive()
    }
}

/// Live view of the forwarder, shared with the admin socket (`hl7-edge outbox stats`).
#[derive(Debug, Default)]
pub struct ForwardStatus {
    pub connected: AtomicBool,
    /// 5 or 4 (3.1.1) while connected, 0 before the first connection.
    pub protocol: std::sync::atomic::AtomicU8,
    pub connects: AtomicU64,
    pub published: AtomicU64,
    pub delivered: AtomicU64,
    pub dead_lettered: AtomicU64,
    pub refused_transient: AtomicU64,
    pub last_error: std::sync::Mutex<Option<String>>,
}

impl ForwardStatus {
    fn set_error(&self, e: Option<String>) {
        if let Ok(mut g) = self.last_error.lock() {
            *g = e;
        }
    }

    /// A JSON summary (no patient data).
    pub fn to_json(&self) -> serde_json::Value {
        let last_error = self.last_error.lock().ok().and_then(|g| g.clone());
        serde_json::json!({
            "connected": self.connected.load(Ordering::Relaxed),
            "protocol": match self.protocol.load(Ordering::Relaxed) { 5 => "5", 4 => "3.1.1", _ => "" },
            "connects": self.connects.load(Ordering::Relaxed),
            "published": self.published.load(Ordering::Relaxed),
            "delivered": self.delivered.load(Ordering::Relaxed),
            "dead_lettered": self.dead_lettered.load(Ordering::Relaxed),
            "refused_transient": self.refused_transient.load(Ordering::Relaxed),
            "last_error": last_error,
        })
    }
}

/// Configuration problems found before connecting.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ForwardError {
    #[error("mqtt.url {url:?}: {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error("mqtt.{field}: {reason}")]
    InvalidConfig { field: &'static str, reason: String },
    #[error("mqtt TLS: {what} {path}: {detail}")]
    Tls {
        what: &'static str,
        path: PathBuf,
        detail: String,
    },
    #[error("mqtt TLS configuration: {0}")]
    TlsConfig(#[from] rustls::Error),
    #[error("no feeds to forward: the forwarder needs at least one feed name")]
    NoFeeds,
}

/// Builds `<prefix>/<site>/<feed>/<msg_type>` with every level sanitised (see the
/// [module documentation](super)).
pub fn topic(prefix: &str, site: &str, feed: &str, msg_type: &str) -> String {
    let mut levels: Vec<String> = prefix
        .split('/')
        .filter(|l| !l.is_empty())
        .map(sanitize_level)
        .collect();
    levels.extend([site, feed, msg_type].into_iter().map(sanitize_level));
    levels.join("/")
}

fn sanitize_level(level: &str) -> String {
    let mut out: String = level
        .chars()
        .map(|c| match c {
            '+' | '#' | '/' => '_',
            c if c.is_control() => '_',
            c => c,
        })
        .collect();
    if out.starts_with('$') {
        out.replace_range(0..1, "_");
    }
    if out.is_empty() {
        out.push('_');
    }
    out
}

/// Broker address parsed from `mqtt.url`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Broker {
    tls: bool,
    /// Host as given (IPv6 literals keep their brackets, which is what `host:port` needs).
    host: String,
    port: u16,
}

impl fmt::Display for Broker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "mqtts" } else { "mqtt" };
        write!(f, "{scheme}://{}:{}", self.host, self.port)
    }
}

fn parse_url(url: &str) -> Result<Broker, ForwardError> {
    let bad = |reason: &str| ForwardError::InvalidUrl {
        url: url.to_string(),
        reason: reason.to_string(),
    };
    let (tls, rest) = if let Some(r) = url.strip_prefix("mqtt://") {
        (false, r)
    } else if let Some(r) = url.strip_prefix("mqtts://") {
        (true, r)
    } else {
        return Err(bad("must start with mqtt:// or mqtts://"));
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.contains('@') {
        return Err(bad(
            "credentials in the URL are not supported; use mqtt.username / mqtt.password",
        ));
    }
    if rest.contains('/') || rest.contains('?') {
        return Err(bad("must be scheme://host[:port] with no path or query"));
    }
    let (host, port) = if rest.starts_with('[') {
        let end = rest
            .find(']')
            .ok_or_else(|| bad("unterminated IPv6 literal"))?;
        let host = &rest[..=end];
        match &rest[end + 1..] {
            "" => (host, None),
            p => (
                host,
                Some(
                    p.strip_prefix(':')
                        .ok_or_else(|| bad("garbage after IPv6 literal"))?,
                ),
            ),
        }
    } else {
        match rest.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (rest, None),
        }
    };
    if host.is_empty() || host == "[]" {
        return Err(bad("missing host"));
    }
    let port = match port {
        None => {
            if tls {
                8883
            } else {
                1883
            }
        }
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| bad("port must be a number from 1 to 65535"))?,
    };
    Ok(Broker {
        tls,
        host: host.to_string(),
        port,
    })
}

fn read_file(what: &'static str, path: &PathBuf) -> Result<Vec<u8>, ForwardError> {
    std::fs::read(path).map_err(|e| ForwardError::Tls {
        what,
        path: path.clone(),
        detail: e.to_string(),
    })
}

fn tls_config(cfg: &MqttConfig) -> Result<rustls::ClientConfig, ForwardError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};

    let ca_path = cfg.ca_file.as_ref().ok_or(ForwardError::InvalidConfig {
        field: "ca_file",
        reason: "mqtts:// needs the PEM file of the broker's CA".into(),
    })?;
    let ca_pem = read_file("CA file", ca_path)?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&ca_pem) {
        let cert = cert.map_err(|e| ForwardError::Tls {
            what: "CA file",
            path: ca_path.clone(),
            detail: e.to_string(),
        })?;
        roots.add(cert).map_err(|e| ForwardError::Tls {
            what: "CA file",
            path: ca_path.clone(),
            detail: e.to_string(),
        })?;
    }
    if roots.is_empty() {
        return Err(ForwardError::Tls {
            what: "CA file",
            path: ca_path.clone(),
            detail: "contains no PEM certificate".into(),
        });
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots);
    match (&cfg.client_cert_file, &cfg.client_key_file) {
        (None, None) => Ok(builder.with_no_client_auth()),
        (Some(cert_path), Some(key_path)) => {
            let cert_pem = read_file("client certificate", cert_path)?;
            let chain = CertificateDer::pem_slice_iter(&cert_pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| ForwardError::Tls {
                    what: "client certificate",
                    path: cert_path.clone(),
                    detail: e.to_string(),
                })?;
            let key_pem = read_file("client key", key_path)?;
            let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| ForwardError::Tls {
                what: "client key",
                path: key_path.clone(),
                detail: e.to_string(),
            })?;
            Ok(builder.with_client_auth_cert(chain, key)?)
        }
        _ => Err(ForwardError::InvalidConfig {
            field: "client_cert_file",
            reason: "client_cert_file and client_key_file must be set together".into(),
        }),
    }
}

fn link_options(
    cfg: &MqttConfig,
    broker: &Broker,
    site: &str,
) -> Result<LinkOptions, ForwardError> {
    let client_id = match cfg.client_id.as_deref() {
        Some(c) if !c.is_empty() => c.to_string(),
        _ => {
            return Err(ForwardError::InvalidConfig {
                field: "client_id",
                reason: "must not be empty (unset, it defaults to site.appliance_id)".into(),
            });
        }
    };
    if cfg.keep_alive_secs < 5 || cfg.keep_alive_secs > u64::from(u16::MAX) {
        return Err(ForwardError::InvalidConfig {
            field: "keep_alive_secs",
            reason: format!("{} must be from 5 to 65535", cfg.keep_alive_secs),
        });
    }
    if cfg.max_inflight == 0 {
        return Err(ForwardError::InvalidConfig {
            field: "max_inflight",
            reason: "must be at least 1".into(),
        });
    }
    if !matches!(cfg.qos, 1 | 2) {
        return Err(ForwardError::InvalidConfig {
            field: "qos",
            reason: format!("{} is not supported: use 1 or 2", cfg.qos),
        });
    }
    let tls = if broker.tls {
        Some(rumqttc::TlsConfiguration::Rustls(Arc::new(tls_config(
            cfg,
        )?)))
    } else {
        None
    };
    let will = Status::offline(site, "connection lost");
    Ok(LinkOptions {
        client_id,
        host: broker.host.clone(),
        port: broker.port,
        keep_alive: Duration::from_secs(cfg.keep_alive_secs),
        max_inflight: cfg.max_inflight,
        max_packet_bytes: cfg.max_packet_bytes,
        connect_timeout_secs: cfg.connect_timeout_secs,
        credentials: cfg
            .username
            .as_ref()
            .map(|u| (u.clone(), cfg.password.clone().unwrap_or_default())),
        tls,
        last_will: Some((status_topic(cfg, site), will.to_bytes())),
    })
}

fn status_topic(cfg: &MqttConfig, site: &str) -> String {
    health_topic(&cfg.health_topic_prefix, site, None, "status")
}

/// `<prefix>/<site>/status` or `<prefix>/<site>/<feed>/heartbeat`, every level sanitised.
pub fn health_topic(prefix: &str, site: &str, feed: Option<&str>, leaf: &str) -> String {
    let mut levels: Vec<String> = prefix
        .split('/')
        .filter(|l| !l.is_empty())
        .map(sanitize_level)
        .collect();
    levels.push(sanitize_level(site));
    if let Some(f) = feed {
        levels.push(sanitize_level(f));
    }
    levels.push(sanitize_level(leaf));
    levels.join("/")
}

/// Size of a PUBLISH packet as rumqttc encodes it (upper bound): fixed header, topic, pkid,
/// MQTT 5 properties, payload.
fn publish_packet_size(topic: &str, payload: usize, meta: Option<&PublishMeta>) -> usize {
    5 + 2 + topic.len() + 2 + meta.map_or(0, PublishMeta::encoded_len) + payload
}

/// Starts the publisher.
pub struct Forwarder;

impl Forwarder {
    /// Validates the configuration (URL, TLS files, identity) and spawns the publishing task on
    /// the current tokio runtime. Configuration errors are returned here, before any connection
    /// attempt; after that the task never gives up on the broker (it logs and backs off). It runs
    /// until `shutdown` becomes `true` (or its sender is dropped), then waits up to
    /// `shutdown_grace_secs` for outstanding PUBACKs, publishes the offline status and
    /// disconnects cleanly.
    pub fn spawn(
        cfg: MqttConfig,
        outbox: Outbox,
        writer: WriterHandle,
        feeds: Vec<String>,
        shutdown: watch::Receiver<bool>,
    ) -> Result<JoinHandle<()>, ForwardError> {
        Self::spawn_with_status(
            cfg,
            outbox,
            writer,
            feeds,
            shutdown,
            Arc::new(ForwardStatus::default()),
        )
    }

    /// [`Self::spawn`], reporting into `status`.
    pub fn spawn_with_status(
        cfg: MqttConfig,
        outbox: Outbox,
        writer: WriterHandle,
        feeds: Vec<String>,
        shutdown: watch::Receiver<bool>,
        status: Arc<ForwardStatus>,
    ) -> Result<JoinHandle<()>, ForwardError> {
        let broker = parse_url(&cfg.url)?;
        let site = match cfg.site.as_deref() {
            Some(s) if !s.is_empty() => s.to_string(),
            _ => {
                return Err(ForwardError::InvalidConfig {
                    field: "site",
                    reason: "must not be empty (unset, it defaults to site.appliance_id)".into(),
                });
            }
        };
        let opts = link_options(&cfg, &broker, &site)?;
        let mut feeds_dedup: Vec<String> = Vec::new();
        for f in feeds {
            if !feeds_dedup.contains(&f) {
                feeds_dedup.push(f);
            }
        }
        if feeds_dedup.is_empty() {
            return Err(ForwardError::NoFeeds);
        }
        let version = match cfg.protocol {
            MqttProtocol::Auto | MqttProtocol::V5 => Version::V5,
            MqttProtocol::V311 => Version::V311,
        };
        let (client, lp) = opts.open(version);
        let backoff = || {
            Backoff::new(
                Duration::from_millis(cfg.reconnect_initial_ms.max(10)),
                Duration::from_secs(cfg.reconnect_max_secs.max(1)),
            )
        };
        let started = Instant::now();
        let run = Run {
            backoff: backoff(),
            max_inflight: usize::from(cfg.max_inflight),
            max_per_feed: match cfg.max_inflight_per_feed {
                0 => usize::from(cfg.max_inflight),
                n => usize::from(n),
            },
            feeds: feeds_dedup
                .into_iter()
                .map(|name| Feed {
                    quiet: cfg.quiet_time(&name),
                    name,
                    cursor: None,
                    outstanding: 0,
                    rewind: false,
                    retry_at: None,
                    backoff: backoff(),
                    silent: false,
                    last_seen: None,
                })
                .collect(),
            cfg,
            site,
            broker,
            opts,
            outbox,
            writer,
            client,
            version,
            v5_confirmed: false,
            v311_confirmed: false,
            broker_max_packet: None,
            next_feed: 0,
            submitted: VecDeque::new(),
            inflight: HashMap::new(),
            settling: HashSet::new(),
            connected: false,
            needs_reset_after_refusal: false,
            tasks: JoinSet::new(),
            retry_epoch: 0,
            status,
            started,
            next_heartbeat: started,
        };
        Ok(tokio::spawn(run.run(lp, shutdown)))
    }
}

struct Feed {
    name: String,
    /// Last id handed to the client (or skipped); the next publish is the first id after it.
    cursor: Option<RecordId>,
    /// Records of this feed submitted or in flight on the current connection.
    outstanding: usize,
    /// Restart from the first undelivered record once nothing of this feed is outstanding.
    rewind: bool,
    /// Do not publish before this instant (store read error, transient broker refusal).
    retry_at: Option<Instant>,
    /// Schedule of `retry_at` after transient refusals (reset by the next success).
    backoff: Backoff,
    /// Quiet time after which the feed is reported silent.
    quiet: Option<Duration>,
    silent: bool,
    /// Last reception time seen in the outbox's counters (Unix ms).
    last_seen: Option<u64>,
}

/// What one `try_publish` was for.
#[derive(Clone, Debug)]
enum Sub {
    Record { id: RecordId, feed: usize },
    Health,
}

/// Result of a background store update started by the publisher.
enum TaskDone {
    Delivered { id: RecordId, ok: bool },
    DeadLettered { id: RecordId },
}

struct Run {
    cfg: MqttConfig,
    site: String,
    broker: Broker,
    opts: LinkOptions,
    outbox: Outbox,
    writer: WriterHandle,
    client: Client,
    version: Version,
    /// Connected with MQTT 5 at least once: never fall back after that.
    v5_confirmed: bool,
    /// Connected with MQTT 3.1.1 after falling back: stay with it.
    v311_confirmed: bool,
    /// The broker's maximum packet size (MQTT 5 CONNACK), if announced.
    broker_max_packet: Option<u32>,
    feeds: Vec<Feed>,
    next_feed: usize,
    max_inflight: usize,
    max_per_feed: usize,
    /// Handed to `try_publish`, pkid not yet known (FIFO, see module docs).
    submitted: VecDeque<Sub>,
    /// Published with this pkid, waiting for its final acknowledgement.
    inflight: HashMap<u16, Sub>,
    /// Acknowledged or refused, the store update (delivered / dead-lettered) not finished:
    /// never republish these.
    settling: HashSet<RecordId>,
    connected: bool,
    /// A refusal was just handled: reset if rumqttc was left holding a publish back.
    needs_reset_after_refusal: bool,
    backoff: Backoff,
    tasks: JoinSet<TaskDone>,
    retry_epoch: u64,
    status: Arc<ForwardStatus>,
    started: Instant,
    next_heartbeat: Instant,
}

impl Run {
    async fn run(mut self, lp: Loop, mut shutdown: watch::Receiver<bool>) {
        let mut changes = self.outbox.subscribe_changes();
        let mut poll = poll_once(lp, Duration::ZERO);
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tracing::info!(broker = %self.broker, feeds = self.feeds.len(), protocol = ?self.cfg.protocol,
            qos = self.cfg.qos, "MQTT forwarder starting");
        loop {
            if *shutdown.borrow_and_update() {
                break;
            }
            self.fill();
            let wake = self.next_retry();
            tokio::select! {
                (mut lp, res) = &mut poll => {
                    let delay = self.on_poll(&mut lp, res);
                    poll = poll_once(lp, delay);
                }
                r = changes.changed() => {
                    if r.is_err() {
                        // The outbox is gone (only at teardown): nothing more will change.
                        changes = self.outbox.subscribe_changes();
                    }
                }
                Some(done) = self.tasks.join_next(), if !self.tasks.is_empty() => {
                    self.on_task(done);
                }
                _ = sleep_until_opt(wake), if wake.is_some() => {}
                _ = tick.tick() => self.on_tick(),
                r = shutdown.changed() => {
                    if r.is_err() {
                        break;
                    }
                }
            }
        }
        self.shut_down(poll).await;
    }

    /// Handles one poll result; returns the delay before the next poll.
    fn on_poll(&mut self, lp: &mut Loop, res: Result<Ev, super::link::LinkError>) -> Duration {
        match res {
            Ok(ev) => {
                let refusal_reset = self.needs_reset_after_refusal
                    && (lp.has_collision() || (self.cfg.qos == 2 && lp.version() == Version::V5));
                if !self.on_event(ev) || refusal_reset {
                    // Correlation can no longer be trusted, or rumqttc holds a publish back
                    // that only a PUBACK it will never see would release: start afresh.
                    self.needs_reset_after_refusal = false;
                    self.reset(lp);
                    return self.backoff.next();
                }
                self.needs_reset_after_refusal = false;
                Duration::ZERO
            }
            Err(e) => {
                let lost = self.submitted.len() + self.inflight.len();
                let was_connected = self.connected;
                self.reset(lp);
                let probing = self.cfg.protocol == MqttProtocol::Auto
                    && !was_connected
                    && !self.v5_confirmed
                    && !self.v311_confirmed;
                if probing && e.v5_unsupported && self.version == Version::V5 {
                    tracing::info!(broker = %self.broker, error = %e.text,
                        "MQTT broker does not speak MQTT 5; using MQTT 3.1.1");
                    self.switch_version(lp, Version::V311);
                    return Duration::ZERO;
                }
                if probing && self.version == Version::V311 {
                    // 3.1.1 did not work either: the broker was not refusing MQTT 5, it was
                    // unavailable. Next attempt: MQTT 5 again.
                    self.switch_version(lp, Version::V5);
                }
                let delay = self.backoff.next();
                self.status.set_error(Some(e.text.clone()));
                tracing::warn!(
                    broker = %self.broker,
                    error = %e.text,
                    retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                    attempt = self.backoff.attempt,
                    unacked_to_republish = lost,
                    "MQTT broker {} {}; reconnecting",
                    self.broker,
                    if was_connected { "connection lost" } else { "unreachable" },
                );
                delay
            }
        }
    }

    fn switch_version(&mut self, lp: &mut Loop, version: Version) {
        let (client, new_lp) = self.opts.open(version);
        self.client = client;
        *lp = new_lp;
        self.version = version;
    }

    /// Returns false when an event cannot be matched (the connection must be reset).
    fn on_event(&mut self, ev: Ev) -> bool {
        match ev {
            Ev::ConnAck { max_packet } => {
                self.connected = true;
                self.broker_max_packet = max_packet;
                match self.version {
                    Version::V5 => self.v5_confirmed = true,
                    Version::V311 => self.v311_confirmed = true,
                }
                self.backoff.reset();
                self.status.connected.store(true, Ordering::Relaxed);
                self.status.protocol.store(
                    if self.version == Version::V5 { 5 } else { 4 },
                    Ordering::Relaxed,
                );
                self.status.connects.fetch_add(1, Ordering::Relaxed);
                self.status.set_error(None);
                tracing::info!(broker = %self.broker, protocol = %self.version, "MQTT connected");
                let online = Status::online(&self.site, &self.version.to_string());
                self.publish_health(status_topic(&self.cfg, &self.site), online.to_bytes());
                // Heartbeats right away, so a monitor sees counts as soon as we are back.
                self.next_heartbeat = Instant::now();
            }
            Ev::Sent(pkid) => {
                let Some(sub) = self.submitted.pop_front() else {
                    tracing::error!(
                        broker = %self.broker,
                        pkid,
                        "MQTT: publish event without a submitted record; resetting the connection"
                    );
                    return false;
                };
                if let Some(prev) = self.inflight.insert(pkid, sub) {
                    tracing::error!(
                        broker = %self.broker,
                        pkid,
                        previous = ?prev,
                        "MQTT: packet id reused while in flight; resetting the connection"
                    );
                    return false;
                }
            }
            Ev::Done { pkid, refusal } => match self.inflight.remove(&pkid) {
                Some(Sub::Record { id, feed }) => match refusal {
                    None => self.on_acked(id, feed),
                    Some(r) => self.on_refused(id, feed, r),
                },
                Some(Sub::Health) => {
                    if let Some(r) = refusal {
                        tracing::warn!(broker = %self.broker, reason = %r,
                            "MQTT broker refused a status/heartbeat message; check its ACL for mqtt.health_topic_prefix");
                        self.needs_reset_after_refusal = true;
                    }
                }
                None => {
                    tracing::debug!(pkid, "MQTT: acknowledgement for an unknown packet id");
                }
            },
            Ev::Disconnected | Ev::Other => {}
        }
        true
    }

    fn on_acked(&mut self, id: RecordId, feed: usize) {
        if let Some(f) = self.feeds.get_mut(feed) {
            f.outstanding = f.outstanding.saturating_sub(1);
            f.backoff.reset();
        }
        self.status.delivered.fetch_add(1, Ordering::Relaxed);
        self.settling.insert(id);
        let writer = self.writer.clone();
        self.tasks.spawn(async move {
            let mut delay = Duration::from_millis(200);
            for attempt in 1..=5 {
                match writer.mark_delivered(id).await {
                    Ok(()) => return TaskDone::Delivered { id, ok: true },
                    Err(StoreError::Closed) => break,
                    Err(e @ (StoreError::NotFound { .. } | StoreError::InvalidTransition { .. })) => {
                        // Someone else changed the record (operator action, prune):
                        // nothing to retry and nothing to republish.
                        tracing::warn!(record = %id, error = %e, "outbox: PUBACK for a record no longer ready");
                        return TaskDone::Delivered { id, ok: true };
                    }
                    Err(e) => {
                        tracing::error!(record = %id, attempt, error = %e,
                            "outbox: cannot mark a PUBACKed record delivered; retrying");
                        tokio::time::sleep(delay).await;
                        delay *= 2;
                    }
                }
            }
            TaskDone::Delivered { id, ok: false }
        });
    }

    fn on_refused(&mut self, id: RecordId, feed: usize, r: Refusal) {
        // rumqttc 0.25 does not release a held (colliding) publish, nor a QoS 2 in-flight slot,
        // on a refusing acknowledgement: reset the connection if that is what it left behind.
        self.needs_reset_after_refusal = true;
        let Some(f) = self.feeds.get_mut(feed) else {
            return;
        };
        f.outstanding = f.outstanding.saturating_sub(1);
        if r.permanent {
            self.status.dead_lettered.fetch_add(1, Ordering::Relaxed);
            tracing::error!(broker = %self.broker, feed = %f.name, record = %id, reason = %r,
                "MQTT broker refused a Bundle; dead-lettering it (see `hl7-edge outbox list --state dead-lettered`)");
            let reason = format!("broker {} refused the publish: {r}", self.broker);
            self.dead_letter(id, reason);
        } else {
            self.status
                .refused_transient
                .fetch_add(1, Ordering::Relaxed);
            let delay = f.backoff.next();
            f.retry_at = Some(Instant::now() + delay);
            f.rewind = true;
            tracing::warn!(broker = %self.broker, feed = %f.name, record = %id, reason = %r,
                retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                "MQTT broker refused a Bundle for now; holding this feed and retrying");
        }
    }

    fn dead_letter(&mut self, id: RecordId, reason: String) {
        self.settling.insert(id);
        let writer = self.writer.clone();
        self.tasks.spawn(async move {
            if let Err(e) = writer.dead_letter(id, reason).await {
                tracing::error!(record = %id, error = %e, "outbox: cannot dead-letter a refused Bundle; it will be sent again");
            }
            TaskDone::DeadLettered { id }
        });
    }

    fn on_task(&mut self, done: Result<TaskDone, tokio::task::JoinError>) {
        match done {
            Ok(TaskDone::Delivered { id, ok }) => {
                self.settling.remove(&id);
                if !ok {
                    // Not recorded as delivered: publish it again (at-least-once) by rewinding
                    // its feed once nothing of it is in flight.
                    self.rewind_feed_of(id);
                }
            }
            Ok(TaskDone::DeadLettered { id }) => {
                self.settling.remove(&id);
                // If the store update failed the record is still Ready: send it again.
                if let Ok(Some(meta)) = self.outbox.get_meta(id)
                    && meta.state == RecordState::Ready
                {
                    self.rewind_feed_of(id);
                }
            }
            Err(e) => tracing::error!(error = %e, "MQTT forwarder: store update task failed"),
        }
    }

    fn rewind_feed_of(&mut self, id: RecordId) {
        if let Ok(Some(meta)) = self.outbox.get_meta(id)
            && let Some(feed) = self.feeds.iter_mut().find(|f| f.name == meta.feed)
        {
            feed.rewind = true;
        }
    }

    /// Forgets everything in flight and makes sure rumqttc will not replay anything.
    fn reset(&mut self, lp: &mut Loop) {
        // Events rumqttc read before failing are genuine (a PUBACK read is a PUBACK received).
        for ev in lp.take_buffered() {
            if !self.on_event(ev) {
                break;
            }
        }
        lp.reset();
        self.submitted.clear();
        self.inflight.clear();
        self.connected = false;
        self.status.connected.store(false, Ordering::Relaxed);
        for feed in &mut self.feeds {
            feed.cursor = None;
            feed.outstanding = 0;
            feed.rewind = false;
        }
    }

    fn next_retry(&self) -> Option<Instant> {
        self.feeds.iter().filter_map(|f| f.retry_at).min()
    }

    /// Queues a status or heartbeat message (QoS 1, retained) through the same bookkeeping as
    /// records, so the pkid correlation stays exact.
    fn publish_health(&mut self, topic: String, payload: Vec<u8>) {
        if !self.connected {
            return;
        }
        let meta = PublishMeta {
            content_type: Some("application/json"),
            user_properties: Vec::new(),
        };
        if self.client.try_publish(topic, 1, true, payload, &meta) {
            self.submitted.push_back(Sub::Health);
        }
    }

    /// Once a second: feed silence transitions and due heartbeats.
    fn on_tick(&mut self) {
        let counters = self.outbox.feed_counters();
        let now_unix = now_ms();
        let up_ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let mut changed = Vec::new();
        for (i, feed) in self.feeds.iter_mut().enumerate() {
            let c = counters.get(&feed.name);
            let last = c.and_then(|c| c.last_received_ms);
            feed.last_seen = last;
            let Some(quiet) = feed.quiet else { continue };
            let quiet_ms = u64::try_from(quiet.as_millis()).unwrap_or(u64::MAX);
            // Before the first message since start, the start is the reference.
            let since = match last {
                Some(t) => now_unix.saturating_sub(t),
                None => up_ms,
            };
            let silent = since >= quiet_ms;
            if silent != feed.silent {
                feed.silent = silent;
                if silent {
                    tracing::warn!(feed = %feed.name, quiet_secs = since / 1000,
                        "feed silent: no message received for longer than its quiet time");
                } else {
                    tracing::info!(feed = %feed.name, "feed active again");
                }
                changed.push(i);
            }
        }
        let heartbeat_due = self.cfg.heartbeat_secs > 0 && Instant::now() >= self.next_heartbeat;
        if heartbeat_due {
            self.next_heartbeat = Instant::now() + Duration::from_secs(self.cfg.heartbeat_secs);
            changed = (0..self.feeds.len()).collect();
        }
        if !self.connected {
            return;
        }
        for i in changed {
            let Some(feed) = self.feeds.get(i) else {
                continue;
            };
            let c = counters.get(&feed.name).cloned().unwrap_or_default();
            let hb = FeedHeartbeat {
                appliance: self.site.clone(),
                feed: feed.name.clone(),
                at_ms: now_unix,
                silent: feed.silent,
                quiet_secs: feed
                    .last_seen
                    .map(|t| now_unix.saturating_sub(t) / 1000)
                    .unwrap_or(up_ms / 1000),
                pending: self.outbox.pending_count(&feed.name).unwrap_or(0),
                counters: c,
            };
            let topic = health_topic(
                &self.cfg.health_topic_prefix,
                &self.site,
                Some(&feed.name),
                "heartbeat",
            );
            self.publish_health(topic, hb.to_bytes());
        }
    }

    /// Submits the next records of each feed, round robin, while there is room in flight.
    fn fill(&mut self) {
        if !self.connected {
            return;
        }
        let epoch = self.outbox.retry_epoch();
        if epoch != self.retry_epoch {
            // An operator retried a record: it may lie behind a feed's cursor.
            self.retry_epoch = epoch;
            for f in &mut self.feeds {
                f.rewind = true;
            }
        }
        let now = Instant::now();
        let n = self.feeds.len();
        loop {
            let mut progress = false;
            for k in 0..n {
                if self.submitted.len() + self.inflight.len() >= self.max_inflight {
                    return;
                }
                let i = (self.next_feed + k) % n;
                match self.step_feed(i, now) {
                    Step::Progress => progress = true,
                    Step::Idle => {}
                    Step::Stop => return,
                }
            }
            self.next_feed = (self.next_feed + 1) % n;
            if !progress {
                return;
            }
        }
    }

    fn step_feed(&mut self, i: usize, now: Instant) -> Step {
        let Some(feed) = self.feeds.get_mut(i) else {
            return Step::Idle;
        };
        if feed.retry_at.is_some_and(|t| t > now) {
            return Step::Idle;
        }
        feed.retry_at = None;
        if feed.rewind && feed.outstanding == 0 {
            feed.rewind = false;
            feed.cursor = None;
        }
        if feed.rewind || feed.outstanding >= self.max_per_feed {
            return Step::Idle;
        }
        let record = match self.outbox.next_ready(&feed.name, feed.cursor) {
            Ok(Some(r)) => r,
            Ok(None) => return Step::Idle,
            Err(e) => {
                tracing::error!(feed = %feed.name, error = %e,
                    "MQTT forwarder: cannot read the outbox; retrying this feed in 5 s");
                feed.retry_at = Some(now + Duration::from_secs(5));
                return Step::Idle;
            }
        };
        let id = record.id();
        if self.settling.contains(&id) {
            feed.cursor = Some(id);
            return Step::Progress;
        }
        if record.meta.state != RecordState::Ready {
            // Head still Received (being mapped): the feed waits, keeping its order.
            return Step::Idle;
        }
        let Some(bundle) = record.bundle else {
            return Step::Idle;
        };
        let topic = topic(
            &self.cfg.topic_prefix,
            &self.site,
            &feed.name,
            &record.meta.message_type,
        );
        let meta = PublishMeta {
            content_type: Some("application/fhir+json"),
            user_properties: [
                ("message-id", record.meta.message_id.as_deref()),
                ("feed", Some(feed.name.as_str())),
                ("source-control-id", Some(record.meta.control_id.as_str())),
                ("signature-key-id", record.meta.key_id.as_deref()),
            ]
            .into_iter()
            .filter_map(|(k, v)| v.map(|v| (k.to_string(), v.to_string())))
            .collect(),
        };
        let size = publish_packet_size(
            &topic,
            bundle.len(),
            (self.version == Version::V5).then_some(&meta),
        );
        let broker_max = self
            .broker_max_packet
            .map_or(usize::MAX, |m| usize::try_from(m).unwrap_or(usize::MAX));
        if size > self.cfg.max_packet_bytes || size > broker_max {
            let (limit, what) = if size > self.cfg.max_packet_bytes {
                (self.cfg.max_packet_bytes, "mqtt.max_packet_bytes")
            } else {
                (broker_max, "the broker's maximum packet size")
            };
            tracing::error!(feed = %feed.name, record = %id, size, limit, what,
                "MQTT forwarder: Bundle too large to publish; dead-lettering it");
            feed.cursor = Some(id);
            let reason = format!(
                "Bundle of {} bytes (MQTT packet of {size}) does not fit {what} = {limit}",
                bundle.len()
            );
            self.status.dead_lettered.fetch_add(1, Ordering::Relaxed);
            self.dead_letter(id, reason);
            return Step::Progress;
        }
        if self
            .client
            .try_publish(topic, self.cfg.qos, false, bundle, &meta)
        {
            feed.cursor = Some(id);
            feed.outstanding += 1;
            self.submitted.push_back(Sub::Record { id, feed: i });
            self.status.published.fetch_add(1, Ordering::Relaxed);
            Step::Progress
        } else {
            // The request channel is sized to max_inflight, so this means the event loop is
            // behind; the next event will call fill() again.
            Step::Stop
        }
    }

    async fn shut_down(mut self, mut poll: PollFuture) {
        let grace = Duration::from_secs(self.cfg.shutdown_grace_secs);
        let deadline = Instant::now() + grace;
        if self.connected {
            // Stop publishing; let outstanding PUBACKs arrive, say "offline", then goodbye.
            let mut offline_sent = false;
            let mut disconnect_sent = false;
            loop {
                let drained = self.submitted.is_empty() && self.inflight.is_empty();
                if drained && !offline_sent {
                    offline_sent = true;
                    let offline = Status::offline(&self.site, "shutdown");
                    self.publish_health(status_topic(&self.cfg, &self.site), offline.to_bytes());
                    continue;
                }
                if drained && !disconnect_sent {
                    disconnect_sent = self.client.try_disconnect();
                    if !disconnect_sent {
                        break;
                    }
                }
                tokio::select! {
                    (mut lp, res) = &mut poll => {
                        match res {
                            Ok(Ev::Disconnected) => break,
                            Ok(ev) => {
                                if !self.on_event(ev) {
                                    break;
                                }
                            }
                            Err(_) => {
                                // Take the PUBACKs rumqttc had buffered, then stop.
                                for ev in lp.take_buffered() {
                                    if !self.on_event(ev) {
                                        break;
                                    }
                                }
                                break;
                            }
                        }
                        poll = poll_once(lp, Duration::ZERO);
                    }
                    Some(done) = self.tasks.join_next(), if !self.tasks.is_empty() => self.on_task(done),
                    _ = tokio::time::sleep_until(deadline) => break,
                }
            }
        }
        drop(poll);
        // Let the Delivered commits for PUBACKs already received finish.
        while !self.tasks.is_empty() {
            match tokio::time::timeout_at(deadline, self.tasks.join_next()).await {
                Ok(Some(done)) => self.on_task(done),
                Ok(None) => break,
                Err(_) => {
                    self.tasks.abort_all();
                    break;
                }
            }
        }
        self.status.connected.store(false, Ordering::Relaxed);
        let unacked = self
            .submitted
            .iter()
            .chain(self.inflight.values())
            .filter(|s| matches!(s, Sub::Record { .. }))
            .count();
        tracing::info!(broker = %self.broker, unacked_left_in_outbox = unacked, "MQTT forwarder stopped");
    }
}

enum Step {
    Progress,
    Idle,
    Stop,
}

async fn sleep_until_opt(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// Exponential backoff with jitter: delay n is uniformly drawn from [base/2, base] with
/// base = min(initial * 2^n, max), so a fleet of appliances does not reconnect in lockstep after
/// a broker restart.
struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
    rng: ring::rand::SystemRandom,
}

impl Backoff {
    fn new(initial: Duration, max: Duration) -> Self {
        Backoff {
            initial,
            max,
            attempt: 0,
            rng: ring::rand::SystemRandom::new(),
        }
    }

    fn reset(&mut self) {
        self.attempt = 0;
    }

    fn next(&mut self) -> Duration {
        use ring::rand::SecureRandom;
        let factor = 1u32 << self.attempt.min(16);
        let base = self.initial.saturating_mul(factor).min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let mut bytes = [0u8; 4];
        let unit = match self.rng.fill(&mut bytes) {
            Ok(()) => f64::from(u32::from_le_bytes(bytes)) / f64::from(u32::MAX),
            Err(_) => 1.0,
        };
        base / 2 + base.mul_f64(unit / 2.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_levels_are_sanitised() {
        assert_eq!(
            topic("hl7-edge", "st-thomas", "lab", "ORU_R01"),
            "hl7-edge/st-thomas/lab/ORU_R01"
        );
        assert_eq!(
            topic("region//hl7-edge/", "a+b", "c#d/e", "ADT\u{0}A01\n"),
            "region/hl7-edge/a_b/c_d_e/ADT_A01_"
        );
        assert_eq!(topic("$SYS", "", "$feed", "X"), "_SYS/_/_feed/X");
        assert_eq!(topic("", "s", "f", "t"), "s/f/t");
    }

    #[test]
    fn urls_parse_with_defaults_and_errors() {
        let b = parse_url("mqtt://127.0.0.1:1884").expect("parse");
        assert_eq!((b.tls, b.host.as_str(), b.port), (false, "127.0.0.1", 1884));
        let b = parse_url("mqtts://broker.example.nhs.uk").expect("parse");
        assert_eq!((b.tls, b.port), (true, 8883));
        let b = parse_url("mqtt://[::1]:1999/").expect("parse");
        assert_eq!((b.host.as_str(), b.port), ("[::1]", 1999));
        assert_eq!(b.to_string(), "mqtt://[::1]:1999");
        for bad in [
            "http://x",
            "mqtt://",
            "mqtt://h:0",
            "mqtt://h:99999",
            "mqtt://u:p@h",
            "mqtt://h/topic",
        ] {
            assert!(parse_url(bad).is_err(), "{bad} must be refused");
        }
    }

    #[test]
    fn config_defaults_and_strictness() {
        let cfg: MqttConfig = serde_json::from_str("{}").expect("defaults");
        assert_eq!(cfg.url, "mqtt://127.0.0.1:1883");
        assert_eq!(cfg.topic_prefix, "hl7-edge");
        assert!(serde_json::from_str::<MqttConfig>(r#"{"urll":"x"}"#).is_err());
        let dbg = format!(
            "{:?}",
            MqttConfig {
                password: Some("hunter2".into()),
                ..MqttConfig::default()
            }
        );
        assert!(!dbg.contains("hunter2"), "{dbg}");
    }

    #[test]
    fn mqtts_requires_a_ca_file() {
        let cfg = MqttConfig {
            url: "mqtts://broker:8883".into(),
            client_id: Some("c".into()),
            ..MqttConfig::default()
        };
        let broker = parse_url(&cfg.url).expect("parse");
        let err = link_options(&cfg, &broker, "s")
            .err()
            .expect("no CA must be an error");
        assert!(err.to_string().contains("ca_file"), "{err}");
    }

    #[test]
    fn backoff_grows_to_the_cap_with_jitter() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let first = b.next();
        assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
        for _ in 0..20 {
            let d = b.next();
            assert!(d <= Duration::from_secs(2), "{d:?}");
        }
        assert!(b.next() >= Duration::from_secs(1));
        b.reset();
        assert!(b.next() <= Duration::from_millis(100));
    }

    #[test]
    fn packet_size_bound_matches_rumqttc() {
        let mut p = rumqttc::Publish::new("a/b/c", rumqttc::QoS::AtLeastOnce, vec![0u8; 70_000]);
        p.pkid = 1;
        assert!(publish_packet_size("a/b/c", 70_000, None) >= p.size());

        let meta = PublishMeta {
            content_type: Some("application/fhir+json"),
            user_properties: vec![
                ("message-id".into(), "MSG00001".into()),
                ("feed".into(), "pas".into()),
            ],
        };
        let props = rumqttc::v5::mqttbytes::v5::PublishProperties {
            payload_format_indicator: Some(1),
            content_type: meta.content_type.map(str::to_string),
            user_properties: meta.user_properties.clone(),
            ..Default::default()
        };
        let mut p5 = rumqttc::v5::mqttbytes::v5::Publish::new(
            "a/b/c",
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            vec![0u8; 70_000],
            Some(props),
        );
        p5.pkid = 1;
        assert!(publish_packet_size("a/b/c", 70_000, Some(&meta)) >= p5.size());
    }

    #[test]
    fn identity_defaults_to_the_appliance_id_and_health_topics_are_sanitised() {
        let cfg = MqttConfig::default().with_appliance_id("edge-1");
        assert_eq!(cfg.client_id.as_deref(), Some("edge-1"));
        assert_eq!(cfg.site.as_deref(), Some("edge-1"));
        assert_eq!(
            health_topic("hl7-edge-health", "edge-1", Some("p#s"), "heartbeat"),
            "hl7-edge-health/edge-1/p_s/heartbeat"
        );
        assert_eq!(
            health_topic("hl7-edge-health", "edge-1", None, "status"),
            "hl7-edge-health/edge-1/status"
        );
    }
}
