//! The MQTT publisher (rumqttc 0.25, MQTT 3.1.1, QoS 1).
//!
//! # One task, one connection, all feeds
//!
//! A single task owns the rumqttc `AsyncClient` *and* its `EventLoop`. Each feed has a cursor
//! (the last id handed to the client); the task round-robins over the feeds, publishing the next
//! `Ready` record of each (read from [`Outbox::next_ready`]) while the total in flight stays
//! below `max_inflight`. A feed whose head is still `Received` waits (order is kept), without
//! holding up the other feeds. New work is noticed through the outbox's change watch; nothing
//! polls the store on a timer.
//!
//! # How a PUBACK finds its record
//!
//! rumqttc does not return the packet id from `publish`; it reports it later as
//! `Event::Outgoing(Outgoing::Publish(pkid))`. From the 0.25 source (`state.rs`, `eventloop.rs`):
//!
//! 1. requests leave the client's channel strictly FIFO, and `MqttState::outgoing_publish`
//!    assigns the pkid and queues the `Outgoing::Publish(pkid)` event for each one in that
//!    order. On a pkid collision (broker acking out of order) it queues `AwaitAck` instead, stops
//!    taking requests, and emits `Outgoing::Publish(pkid)` for the held publish right after the
//!    PUBACK that frees the pkid -- still the same order;
//! 2. so the k-th `Outgoing::Publish` of a connection is the k-th `try_publish` of that
//!    connection, *provided* nothing else is published on the client (we only publish, QoS 1)
//!    and no request crosses a connection boundary.
//!
//! The task keeps a FIFO `submitted` of records handed to `try_publish`; on
//! `Outgoing::Publish(pkid)` it pops the front into `inflight[pkid]`; on `Incoming::PubAck(pkid)`
//! it takes `inflight[pkid]` and marks exactly that record delivered (through the writer, i.e.
//! a durable commit). A pkid is never reused while in flight (rumqttc holds a colliding publish
//! back), so the map is unambiguous.
//!
//! Connection boundaries are where rumqttc would otherwise break rule 2: on error it moves
//! unacked publishes and still-queued requests to `EventLoop::pending` and replays them after
//! a reconnect that resumes a session. We never let it: the session is clean
//! (`clean_session = true`, we have no subscriptions to keep and the broker keeps no state for
//! inbound QoS 1), and after *any* error the task first processes the events rumqttc had
//! already buffered (PUBACKs read before the failure are genuine), then calls
//! `EventLoop::clean()`, drops `pending`, any held collision and leftover events, and forgets its
//! own `submitted`/`inflight`. Because the same task owns the client and the event loop,
//! nothing can be published between that reset and the next CONNACK. Each feed then restarts
//! from its first undelivered record: at-least-once, never lost, first appearance in id order.
//!
//! The event loop's `poll()` future is never cancelled (a cancelled poll can drop a publish
//! that rumqttc already counted as sent): the task moves the `EventLoop` into a future that
//! polls once and hands it back, and `select!`s on that future by reference.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, Incoming, MqttOptions, Outgoing, QoS,
    StateError, TlsConfiguration, Transport,
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

use crate::outbox::{Outbox, RecordId, RecordState, StoreError, WriterHandle};

/// MQTT settings (`[mqtt]` in the configuration).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    /// `mqtt://host:port` (default port 1883) or `mqtts://host:port` (TLS, default port 8883).
    pub url: String,
    /// Must be unique per appliance: the broker disconnects the older of two equal ids.
    pub client_id: String,
    pub username: Option<String>,
    pub password: Option<String>,
    /// First level(s) of every topic.
    pub topic_prefix: String,
    /// The site level of every topic.
    pub site: String,
    /// MQTT keep-alive in seconds (0 disables pings; not recommended on NATed links).
    pub keep_alive_secs: u64,
    /// Maximum unacknowledged publishes (over all feeds).
    pub max_inflight: u16,
    /// Largest MQTT packet we send; a Bundle that cannot fit is quarantined, not retried.
    pub max_packet_bytes: usize,
    pub connect_timeout_secs: u64,
    /// First reconnect delay; doubles per failure up to `reconnect_max_secs` (with jitter).
    pub reconnect_initial_ms: u64,
    pub reconnect_max_secs: u64,
    /// PEM file of the CA(s) that sign the broker's certificate; required for `mqtts://`.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate chain and key, for brokers that require mutual TLS.
    pub client_cert_file: Option<PathBuf>,
    pub client_key_file: Option<PathBuf>,
    /// On shutdown, how long to wait for outstanding PUBACKs before disconnecting.
    pub shutdown_grace_secs: u64,
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            url: "mqtt://127.0.0.1:1883".into(),
            client_id: "hl7-edge".into(),
            username: None,
            password: None,
            topic_prefix: "hl7-edge".into(),
            site: "site".into(),
            keep_alive_secs: 30,
            max_inflight: 32,
            max_packet_bytes: 8 * 1024 * 1024,
            connect_timeout_secs: 10,
            reconnect_initial_ms: 500,
            reconnect_max_secs: 30,
            ca_file: None,
            client_cert_file: None,
            client_key_file: None,
            shutdown_grace_secs: 5,
        }
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
            .field("keep_alive_secs", &self.keep_alive_secs)
            .field("max_inflight", &self.max_inflight)
            .field("max_packet_bytes", &self.max_packet_bytes)
            .field("ca_file", &self.ca_file)
            .field("client_cert_file", &self.client_cert_file)
            .field("client_key_file", &self.client_key_file)
            .finish_non_exhaustive()
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

fn mqtt_options(cfg: &MqttConfig, broker: &Broker) -> Result<MqttOptions, ForwardError> {
    if cfg.client_id.is_empty() {
        return Err(ForwardError::InvalidConfig {
            field: "client_id",
            reason: "must not be empty".into(),
        });
    }
    if cfg.max_inflight == 0 {
        return Err(ForwardError::InvalidConfig {
            field: "max_inflight",
            reason: "must be at least 1".into(),
        });
    }
    let mut opts = MqttOptions::new(cfg.client_id.clone(), broker.host.clone(), broker.port);
    opts.set_keep_alive(Duration::from_secs(cfg.keep_alive_secs));
    // Clean session: the store, not the broker session, is the source of truth for what is
    // unacknowledged (see the module documentation).
    opts.set_clean_session(true);
    opts.set_inflight(cfg.max_inflight);
    opts.set_max_packet_size(64 * 1024, cfg.max_packet_bytes);
    opts.set_request_channel_capacity(usize::from(cfg.max_inflight));
    if let Some(user) = &cfg.username {
        opts.set_credentials(user.clone(), cfg.password.clone().unwrap_or_default());
    }
    if broker.tls {
        opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            Arc::new(tls_config(cfg)?),
        )));
    }
    Ok(opts)
}

/// Size of a QoS 1 PUBLISH packet as rumqttc encodes it (fixed header upper bound).
fn publish_packet_size(topic: &str, payload: usize) -> usize {
    // 1 type byte + up to 4 remaining-length bytes + topic length prefix + topic + pkid.
    5 + 2 + topic.len() + 2 + payload
}

/// Starts the publisher.
pub struct Forwarder;

impl Forwarder {
    /// Validates the configuration (URL, TLS files) and spawns the publishing task on the current
    /// tokio runtime. Configuration errors are returned here, before any connection attempt;
    /// after that the task never gives up on the broker (it logs and backs off). It runs until
    /// `shutdown` becomes `true` (or its sender is dropped), then waits up to
    /// `shutdown_grace_secs` for outstanding PUBACKs and disconnects cleanly.
    pub fn spawn(
        cfg: MqttConfig,
        outbox: Outbox,
        writer: WriterHandle,
        feeds: Vec<String>,
        shutdown: watch::Receiver<bool>,
    ) -> Result<JoinHandle<()>, ForwardError> {
        let broker = parse_url(&cfg.url)?;
        let opts = mqtt_options(&cfg, &broker)?;
        let mut feeds_dedup: Vec<String> = Vec::new();
        for f in feeds {
            if !feeds_dedup.contains(&f) {
                feeds_dedup.push(f);
            }
        }
        if feeds_dedup.is_empty() {
            return Err(ForwardError::NoFeeds);
        }
        let (client, mut eventloop) = AsyncClient::new(opts, usize::from(cfg.max_inflight));
        let mut net = eventloop.network_options();
        net.set_connection_timeout(cfg.connect_timeout_secs.max(1));
        eventloop.set_network_options(net);
        let run = Run {
            backoff: Backoff::new(
                Duration::from_millis(cfg.reconnect_initial_ms.max(10)),
                Duration::from_secs(cfg.reconnect_max_secs.max(1)),
            ),
            max_inflight: usize::from(cfg.max_inflight),
            cfg,
            broker,
            outbox,
            writer,
            client,
            feeds: feeds_dedup
                .into_iter()
                .map(|name| Feed {
                    name,
                    cursor: None,
                    outstanding: 0,
                    rewind: false,
                    retry_at: None,
                })
                .collect(),
            next_feed: 0,
            submitted: VecDeque::new(),
            inflight: HashMap::new(),
            acked_pending: HashSet::new(),
            connected: false,
            tasks: JoinSet::new(),
        };
        Ok(tokio::spawn(run.run(eventloop, shutdown)))
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
    /// After a store read error, do not retry before this instant.
    retry_at: Option<Instant>,
}

#[derive(Clone, Copy, Debug)]
struct Sent {
    id: RecordId,
    feed: usize,
}

/// Result of a background store update started by the publisher.
enum TaskDone {
    Delivered { id: RecordId, ok: bool },
    Quarantined,
}

struct Run {
    cfg: MqttConfig,
    broker: Broker,
    outbox: Outbox,
    writer: WriterHandle,
    client: AsyncClient,
    feeds: Vec<Feed>,
    next_feed: usize,
    max_inflight: usize,
    /// Handed to `try_publish`, pkid not yet known (FIFO, see module docs).
    submitted: VecDeque<Sent>,
    /// Published with this pkid, waiting for its PUBACK.
    inflight: HashMap<u16, Sent>,
    /// PUBACK received, `Delivered` commit not finished: never republish these.
    acked_pending: HashSet<RecordId>,
    connected: bool,
    backoff: Backoff,
    tasks: JoinSet<TaskDone>,
}

type PollFuture = Pin<Box<dyn Future<Output = (EventLoop, Result<Event, ConnectionError>)> + Send>>;

/// Polls the event loop once, after an optional delay, and hands it back: the poll itself is
/// never cancelled.
fn poll_once(mut eventloop: EventLoop, delay: Duration) -> PollFuture {
    Box::pin(async move {
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let res = eventloop.poll().await;
        (eventloop, res)
    })
}

impl Run {
    async fn run(mut self, eventloop: EventLoop, mut shutdown: watch::Receiver<bool>) {
        let mut changes = self.outbox.subscribe_changes();
        let mut poll = poll_once(eventloop, Duration::ZERO);
        tracing::info!(broker = %self.broker, feeds = self.feeds.len(), "MQTT forwarder starting");
        loop {
            if *shutdown.borrow_and_update() {
                break;
            }
            self.fill();
            let wake = self.next_retry();
            tokio::select! {
                (mut el, res) = &mut poll => {
                    let delay = self.on_poll(&mut el, res);
                    poll = poll_once(el, delay);
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
    fn on_poll(&mut self, el: &mut EventLoop, res: Result<Event, ConnectionError>) -> Duration {
        match res {
            Ok(event) => {
                if !self.on_event(event) {
                    // Correlation can no longer be trusted: start a fresh connection.
                    self.reset(el);
                    return self.backoff.next();
                }
                Duration::ZERO
            }
            Err(e) => {
                let lost = self.submitted.len() + self.inflight.len();
                let was_connected = self.connected;
                self.reset(el);
                let delay = self.backoff.next();
                tracing::warn!(
                    broker = %self.broker,
                    error = %describe(&e),
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

    /// Returns false when an event cannot be matched (the connection must be reset).
    fn on_event(&mut self, event: Event) -> bool {
        match event {
            Event::Incoming(Incoming::ConnAck(_)) => {
                self.connected = true;
                self.backoff.reset();
                tracing::info!(broker = %self.broker, "MQTT connected");
            }
            Event::Outgoing(Outgoing::Publish(pkid)) => {
                let Some(sent) = self.submitted.pop_front() else {
                    tracing::error!(
                        broker = %self.broker,
                        pkid,
                        "MQTT: publish event without a submitted record; resetting the connection"
                    );
                    return false;
                };
                if let Some(prev) = self.inflight.insert(pkid, sent) {
                    tracing::error!(
                        broker = %self.broker,
                        pkid,
                        record = %prev.id,
                        "MQTT: packet id reused while in flight; resetting the connection"
                    );
                    return false;
                }
            }
            Event::Incoming(Incoming::PubAck(ack)) => match self.inflight.remove(&ack.pkid) {
                Some(sent) => self.on_acked(sent),
                None => {
                    tracing::debug!(pkid = ack.pkid, "MQTT: PUBACK for an unknown packet id");
                }
            },
            _ => {}
        }
        true
    }

    fn on_acked(&mut self, sent: Sent) {
        if let Some(feed) = self.feeds.get_mut(sent.feed) {
            feed.outstanding = feed.outstanding.saturating_sub(1);
        }
        self.acked_pending.insert(sent.id);
        let writer = self.writer.clone();
        self.tasks.spawn(async move {
            let mut delay = Duration::from_millis(200);
            for attempt in 1..=5 {
                match writer.mark_delivered(sent.id).await {
                    Ok(()) => return TaskDone::Delivered { id: sent.id, ok: true },
                    Err(StoreError::Closed) => break,
                    Err(e @ (StoreError::NotFound { .. } | StoreError::InvalidTransition { .. })) => {
                        // Someone else changed the record (operator quarantine, prune):
                        // nothing to retry and nothing to republish.
                        tracing::warn!(record = %sent.id, error = %e, "outbox: PUBACK for a record no longer ready");
                        return TaskDone::Delivered { id: sent.id, ok: true };
                    }
                    Err(e) => {
                        tracing::error!(record = %sent.id, attempt, error = %e,
                            "outbox: cannot mark a PUBACKed record delivered; retrying");
                        tokio::time::sleep(delay).await;
                        delay *= 2;
                    }
                }
            }
            TaskDone::Delivered { id: sent.id, ok: false }
        });
    }

    fn on_task(&mut self, done: Result<TaskDone, tokio::task::JoinError>) {
        match done {
            Ok(TaskDone::Delivered { id, ok }) => {
                self.acked_pending.remove(&id);
                if !ok {
                    // Not recorded as delivered: publish it again (at-least-once) by rewinding
                    // its feed once nothing of it is in flight.
                    if let Ok(Some(meta)) = self.outbox.get_meta(id)
                        && let Some(feed) = self.feeds.iter_mut().find(|f| f.name == meta.feed)
                    {
                        feed.rewind = true;
                    }
                }
            }
            Ok(TaskDone::Quarantined) => {}
            Err(e) => tracing::error!(error = %e, "MQTT forwarder: store update task failed"),
        }
    }

    /// Forgets everything in flight and makes sure rumqttc will not replay anything.
    fn reset(&mut self, el: &mut EventLoop) {
        // Events rumqttc read before failing are genuine (a PUBACK read is a PUBACK received).
        while let Some(ev) = el.state.events.pop_front() {
            if !self.on_event(ev) {
                break;
            }
        }
        el.clean();
        el.pending.clear();
        el.state.events.clear();
        el.state.collision = None;
        self.submitted.clear();
        self.inflight.clear();
        self.connected = false;
        for feed in &mut self.feeds {
            feed.cursor = None;
            feed.outstanding = 0;
            feed.rewind = false;
        }
    }

    fn next_retry(&self) -> Option<Instant> {
        self.feeds.iter().filter_map(|f| f.retry_at).min()
    }

    /// Submits the next records of each feed, round robin, while there is room in flight.
    fn fill(&mut self) {
        if !self.connected {
            return;
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
        if self.acked_pending.contains(&id) {
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
            &self.cfg.site,
            &feed.name,
            &record.meta.message_type,
        );
        let size = publish_packet_size(&topic, bundle.len());
        if size > self.cfg.max_packet_bytes {
            tracing::error!(feed = %feed.name, record = %id, size, max = self.cfg.max_packet_bytes,
                "MQTT forwarder: Bundle too large for mqtt.max_packet_bytes; quarantining it");
            feed.cursor = Some(id);
            let writer = self.writer.clone();
            let reason = format!(
                "Bundle of {} bytes does not fit mqtt.max_packet_bytes = {}",
                bundle.len(),
                self.cfg.max_packet_bytes
            );
            self.tasks.spawn(async move {
                if let Err(e) = writer.quarantine(id, reason).await {
                    tracing::error!(record = %id, error = %e, "outbox: cannot quarantine an oversized Bundle");
                }
                TaskDone::Quarantined
            });
            return Step::Progress;
        }
        match self
            .client
            .try_publish(topic, QoS::AtLeastOnce, false, bundle)
        {
            Ok(()) => {
                feed.cursor = Some(id);
                feed.outstanding += 1;
                self.submitted.push_back(Sent { id, feed: i });
                Step::Progress
            }
            Err(_) => {
                // The request channel is sized to max_inflight, so this means the event loop is
                // behind; the next event will call fill() again.
                Step::Stop
            }
        }
    }

    async fn shut_down(mut self, mut poll: PollFuture) {
        let grace = Duration::from_secs(self.cfg.shutdown_grace_secs);
        let deadline = Instant::now() + grace;
        if self.connected {
            // Stop publishing; let outstanding PUBACKs arrive, then say goodbye properly.
            let mut disconnect_sent = false;
            loop {
                let drained = self.submitted.is_empty() && self.inflight.is_empty();
                if drained && !disconnect_sent {
                    disconnect_sent = self.client.try_disconnect().is_ok();
                    if !disconnect_sent {
                        break;
                    }
                }
                tokio::select! {
                    (mut el, res) = &mut poll => {
                        match res {
                            Ok(Event::Outgoing(Outgoing::Disconnect)) => break,
                            Ok(ev) => {
                                if !self.on_event(ev) {
                                    break;
                                }
                            }
                            Err(_) => {
                                // Take the PUBACKs rumqttc had buffered, then stop.
                                while let Some(ev) = el.state.events.pop_front() {
                                    if !self.on_event(ev) {
                                        break;
                                    }
                                }
                                break;
                            }
                        }
                        poll = poll_once(el, Duration::ZERO);
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
        let unacked = self.submitted.len() + self.inflight.len();
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

/// A log-safe description of a connection error: never the content of a packet.
fn describe(e: &ConnectionError) -> String {
    match e {
        ConnectionError::MqttState(StateError::Deserialization(d)) => {
            format!("MQTT protocol error: {d}")
        }
        ConnectionError::MqttState(s) => format!("MQTT state error: {s}"),
        ConnectionError::NotConnAck(_) => "broker sent another packet instead of CONNACK".into(),
        ConnectionError::ConnectionRefused(code) => {
            format!(
                "broker refused the connection ({code:?}); check mqtt.username/password/client_id"
            )
        }
        other => other.to_string(),
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
            ..MqttConfig::default()
        };
        let broker = parse_url(&cfg.url).expect("parse");
        let err = mqtt_options(&cfg, &broker).expect_err("no CA");
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
        let mut p = rumqttc::Publish::new("a/b/c", QoS::AtLeastOnce, vec![0u8; 70_000]);
        p.pkid = 1;
        assert!(publish_packet_size("a/b/c", 70_000) >= p.size());
    }
}
