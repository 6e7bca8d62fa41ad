//! The MLLP listener: one task per connection, messages on a connection handled strictly in order
//! (the next frame is not read until the previous one is ACKed), so a sender's order is the
//! store's order.
//!
//! Back-pressure is the ACK itself: a sender waits for it, and the ACK waits for the durable
//! commit. Limits protect the appliance from stuck or hostile peers without affecting the
//! others:
//!
//! | setting | what happens |
//! |---|---|
//! | `allow` (CIDR list) | a peer outside it gets `AR` "sender not allowed" to its first frame, then the connection is closed; nothing is stored |
//! | `max_connections` | connections beyond it are closed at once (logged) |
//! | `idle_timeout_secs` | a connection with no frame in progress for this long is closed |
//! | `frame_timeout_secs` | a frame (or the TLS handshake) that has started must complete within this time, and an ACK must be written within it: slow senders, half-open connections and peers that do not read their ACKs are closed, the partial message is never ACKed |
//! | `max_frame_bytes` | a larger frame is drained and answered `AR`; the connection stays usable |
//! | `start_byte`, `end_bytes` | framing bytes for odd senders (default `0x0B`, `[0x1C, 0x0D]`) |
//! | `[transport.tls]` | TLS / mutual TLS, see `tls.rs` |

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::acl::{self, Cidr};
use super::frame::{Decoder, Frame, Framing};
use super::intake::{Intake, Outcome, Sender};
use super::tls::{ClientIdentity, TlsConfig, TlsError, TlsServer};
use crate::ops::shutdown::Shutdown;

/// MLLP transport settings of a feed (`[transport]` with `kind = "mllp"`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MllpConfig {
    /// Address and port to listen on.
    pub bind: SocketAddr,
    /// Larger frames are drained and answered AR.
    #[serde(default = "default_max_frame")]
    pub max_frame_bytes: usize,
    /// Close a connection that starts no frame for this long.
    #[serde(default = "default_idle")]
    pub idle_timeout_secs: u64,
    /// A started frame, a TLS handshake and an ACK write must each complete within this time.
    #[serde(default = "default_frame_timeout")]
    pub frame_timeout_secs: u64,
    /// Connections beyond this are closed at once (and logged).
    #[serde(default = "default_max_conn")]
    pub max_connections: usize,
    /// Sender allow-list: addresses or CIDR blocks; empty allows every peer.
    #[serde(default)]
    pub allow: Vec<Cidr>,
    /// The byte that starts a frame (MLLP: 0x0B).
    #[serde(default = "default_start")]
    pub start_byte: u8,
    /// The bytes that end a frame: the end byte and an optional trailer (MLLP: [0x1C, 0x0D]).
    /// A missing trailer is tolerated on input.
    #[serde(default = "default_end")]
    pub end_bytes: Vec<u8>,
    /// TLS (and mutual TLS) for this listener.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
}

fn default_max_frame() -> usize {
    16 * 1024 * 1024
}
fn default_idle() -> u64 {
    600
}
fn default_frame_timeout() -> u64 {
    30
}
fn default_max_conn() -> usize {
    256
}
fn default_start() -> u8 {
    super::frame::START
}
fn default_end() -> Vec<u8> {
    vec![super::frame::END, super::frame::END_CR]
}

impl MllpConfig {
    /// The framing bytes (valid after [`Self::validate`]).
    pub fn framing(&self) -> Framing {
        Framing {
            start: self.start_byte,
            end: self.end_bytes.first().copied().unwrap_or(super::frame::END),
            trailer: self.end_bytes.get(1).copied(),
        }
    }

    /// Checks that serde cannot express.
    pub fn validate(&self) -> Result<(), String> {
        if self.end_bytes.is_empty() || self.end_bytes.len() > 2 {
            return Err(format!(
                "end_bytes must hold 1 or 2 bytes (end byte, optional trailer), not {}",
                self.end_bytes.len()
            ));
        }
        if self.end_bytes.contains(&self.start_byte)
            || self.end_bytes.first() == self.end_bytes.get(1)
        {
            return Err("start_byte and end_bytes must be distinct bytes".into());
        }
        if self.max_frame_bytes == 0 || self.max_connections == 0 {
            return Err("max_frame_bytes and max_connections must be positive".into());
        }
        if self.idle_timeout_secs == 0 || self.frame_timeout_secs == 0 {
            return Err("idle_timeout_secs and frame_timeout_secs must be positive".into());
        }
        Ok(())
    }
}

/// Errors that stop a listener (per-connection errors only end that connection).
#[derive(Debug, thiserror::Error)]
pub enum MllpError {
    #[error("feed {feed}: cannot listen on {addr}: {source}")]
    Bind {
        feed: String,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("feed {feed}: {source}")]
    Tls { feed: String, source: TlsError },
}

/// A bound listener, ready to serve.
pub struct Listener {
    listener: TcpListener,
    config: MllpConfig,
    intake: Arc<Intake>,
    tls: Option<Arc<TlsServer>>,
}

impl Listener {
    /// Binds now (and reads the TLS files), so that a port conflict or a bad certificate fails
    /// the daemon's start instead of a background task.
    pub async fn bind(config: MllpConfig, intake: Arc<Intake>) -> Result<Listener, MllpError> {
        let feed = intake.feed().name.clone();
        let tls = match &config.tls {
            Some(t) => Some(Arc::new(TlsServer::load(t.clone()).map_err(|source| {
                MllpError::Tls {
                    feed: feed.clone(),
                    source,
                }
            })?)),
            None => None,
        };
        let listener = TcpListener::bind(config.bind)
            .await
            .map_err(|source| MllpError::Bind {
                feed,
                addr: config.bind,
                source,
            })?;
        Ok(Listener {
            listener,
            config,
            intake,
            tls,
        })
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// Accepts until shutdown, then waits for every connection to finish its current message.
    /// With TLS, SIGHUP re-reads the certificate files (used by new connections).
    pub async fn serve(self, mut shutdown: Shutdown) {
        let feed = self.intake.feed().name.clone();
        info!(feed, addr = %self.config.bind, tls = self.tls.is_some(),
            mtls = self.config.tls.as_ref().is_some_and(|t| t.client_ca.is_some()), "MLLP listener ready");
        let mut hangup = match &self.tls {
            Some(_) => match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            {
                Ok(s) => Some(s),
                Err(e) => {
                    warn!(feed, error = %e, "cannot listen for SIGHUP: certificates reload only on restart");
                    None
                }
            },
            None => None,
        };
        let slots = Arc::new(Semaphore::new(self.config.max_connections));
        let mut conns = JoinSet::new();
        loop {
            tokio::select! {
                _ = shutdown.recv() => break,
                Some(()) = async { match hangup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => {
                    if let Some(tls) = &self.tls {
                        match tls.reload() {
                            Ok(()) => info!(feed, "TLS certificates reloaded"),
                            Err(e) => warn!(feed, error = %e, "TLS reload failed; keeping the previous certificates"),
                        }
                    }
                }
                accepted = self.listener.accept() => {
                    let (stream, peer) = match accepted {
                        Ok(a) => a,
                        Err(e) => {
                            // EMFILE and friends: back off briefly instead of spinning.
                            warn!(feed, error = %e, "accept failed");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    };
                    let Ok(permit) = slots.clone().try_acquire_owned() else {
                        warn!(feed, peer = %peer, max = self.config.max_connections, "connection refused: too many connections");
                        drop(stream);
                        continue;
                    };
                    let _ = stream.set_nodelay(true);
                    let intake = self.intake.clone();
                    let cfg = self.config.clone();
                    let tls = self.tls.clone();
                    let sd = shutdown.clone();
                    conns.spawn(async move {
                        serve_connection(stream, peer, intake, cfg, tls, sd).await;
                        drop(permit);
                    });
                }
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
            }
        }
        drop(self.listener);
        while conns.join_next().await.is_some() {}
        info!(feed, "MLLP listener stopped");
    }
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    intake: Arc<Intake>,
    cfg: MllpConfig,
    tls: Option<Arc<TlsServer>>,
    shutdown: Shutdown,
) {
    let feed = intake.feed().name.clone();
    let peer_s = peer.to_string();
    let mut refused = (!acl::allowed(&cfg.allow, peer.ip())).then(|| peer.ip().to_string());
    if refused.is_some() {
        warn!(feed, peer = %peer_s, "sender not in this feed's allow-list: its first frame is refused, then the connection closed");
    }
    let result = match tls {
        None => {
            debug!(feed, peer = %peer_s, "connection opened");
            connection_as(stream, &peer_s, None, refused, &intake, &cfg, shutdown).await
        }
        Some(tls) => {
            let handshake = tokio::time::timeout(
                Duration::from_secs(cfg.frame_timeout_secs),
                tls.acceptor().accept(stream),
            )
            .await;
            let stream = match handshake {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    warn!(feed, peer = %peer_s, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    warn!(feed, peer = %peer_s, "TLS handshake timed out");
                    return;
                }
            };
            let identity = ClientIdentity::of(stream.get_ref().1);
            let name = identity.as_ref().map(ClientIdentity::name);
            if refused.is_none() && !tls.client_allowed(identity.as_ref()) {
                warn!(feed, peer = %peer_s, identity = name.as_deref().unwrap_or("-"),
                    "client certificate identity not in allowed_clients: its first frame is refused, then the connection closed");
                refused = Some(
                    name.clone()
                        .unwrap_or_else(|| "without a certificate".into()),
                );
            }
            info!(feed, peer = %peer_s, identity = name.as_deref().unwrap_or("-"),
                fingerprint = identity.as_ref().map(|i| i.fingerprint.as_str()).unwrap_or("-"), "TLS connection opened");
            connection_as(
                stream,
                &peer_s,
                name.as_deref(),
                refused,
                &intake,
                &cfg,
                shutdown,
            )
            .await
        }
    };
    if let Err(e) = result {
        debug!(feed, peer = %peer_s, error = %e, "connection ended with an error");
    }
}

/// Serves one plain (already accepted, allowed) connection: frames in, ACKs out, in order.
pub async fn connection<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    peer: &str,
    intake: &Intake,
    cfg: &MllpConfig,
    shutdown: Shutdown,
) -> std::io::Result<()> {
    connection_as(stream, peer, None, None, intake, cfg, shutdown).await
}

/// Serves one connection. `identity` is the verified client-certificate identity; `refused`
/// names the sender when it is not allowed (its first frame gets AR, then the connection ends).
async fn connection_as<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    peer: &str,
    identity: Option<&str>,
    refused: Option<String>,
    intake: &Intake,
    cfg: &MllpConfig,
    mut shutdown: Shutdown,
) -> std::io::Result<()> {
    let feed = &intake.feed().name;
    let framing = cfg.framing();
    let mut decoder = Decoder::with_framing(cfg.max_frame_bytes, framing);
    let mut buf = vec![0u8; 64 * 1024];
    let mut frames = Vec::new();
    let idle = Duration::from_secs(cfg.idle_timeout_secs.max(1));
    let frame_limit = Duration::from_secs(cfg.frame_timeout_secs.max(1));
    // When the current frame started (None between frames).
    let mut frame_started: Option<Instant> = None;
    let sender = Sender { peer, identity };
    loop {
        let deadline = match frame_started {
            Some(t) => t + frame_limit,
            None => Instant::now() + idle,
        };
        let n = tokio::select! {
            // Stop between messages only: a half-received message is never ACKed, and one whose
            // ACK is being computed is finished first (the select is not polled during `receive`).
            _ = shutdown.recv() => {
                if decoder.in_frame() {
                    info!(feed, peer, "stopping: a partially received message was not acknowledged");
                }
                return Ok(());
            }
            r = tokio::time::timeout_at(deadline, stream.read(&mut buf)) => match r {
                Err(_) => {
                    if decoder.in_frame() {
                        warn!(feed, peer, secs = cfg.frame_timeout_secs, "frame not completed in time (slow sender or half-open connection): closing; the partial message was not acknowledged");
                    } else {
                        debug!(feed, peer, "idle timeout: closing");
                    }
                    return Ok(());
                }
                Ok(r) => r?,
            },
        };
        if n == 0 {
            if decoder.in_frame() {
                warn!(
                    feed,
                    peer, "connection closed in the middle of a message; it was not acknowledged"
                );
            }
            return Ok(());
        }
        let was_in_frame = decoder.in_frame();
        decoder.feed(buf.get(..n).unwrap_or_default(), &mut frames);
        let mut wrote = false;
        let completed = frames.len();
        for frame in frames.drain(..) {
            let ack = match frame {
                Frame::Message(body) => {
                    if let Some(who) = &refused {
                        let reply = intake.not_allowed(&body, who);
                        write_deadline(&mut stream, &framing.encode(&reply.ack), frame_limit)
                            .await?;
                        return Ok(());
                    }
                    let reply = intake.receive(body, sender).await;
                    if !reply.send {
                        debug!(feed, peer, outcome = ?reply.outcome, "no ACK sent: MSH-15 asked for none in this case");
                        if matches!(reply.outcome, Outcome::Failed | Outcome::Rejected) {
                            warn!(
                                feed,
                                peer,
                                "a refused message's negative ACK was suppressed by its MSH-15"
                            );
                        }
                        continue;
                    }
                    reply.ack
                }
                Frame::Oversize { len } => {
                    warn!(feed, peer, len, "oversize message drained and refused");
                    intake.oversize(len)
                }
            };
            write_deadline(&mut stream, &framing.encode(&ack), frame_limit).await?;
            wrote = true;
        }
        if wrote {
            tokio::time::timeout(frame_limit, stream.flush())
                .await
                .map_err(|_| timed_out("flush"))??;
        }
        frame_started = match (decoder.in_frame(), frame_started) {
            (false, _) => None,
            // Still inside the same frame: keep its start time.
            (true, Some(t)) if was_in_frame && completed == 0 => Some(t),
            _ => Some(Instant::now()),
        };
    }
}

fn timed_out(what: &str) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("{what} did not complete in time (peer not reading)"),
    )
}

async fn write_deadline<S: AsyncWrite + Unpin>(
    stream: &mut S,
    bytes: &[u8],
    limit: Duration,
) -> std::io::Result<()> {
    tokio::time::timeout(limit, stream.write_all(bytes))
        .await
        .map_err(|_| timed_out("ACK write"))?
}
