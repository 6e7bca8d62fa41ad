//! The MLLP listener: one task per connection, messages on a connection handled strictly in order
//! (the next frame is not read until the previous one is ACKed), so a sender's order is the
//! store's order.
//!
//! Back-pressure is the ACK itself: a sender waits for it, and the ACK waits for the durable
//! commit. Limits (frame size, connections, idle time) protect the appliance from stuck or hostile
//! peers without affecting the others.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use super::frame::{Decoder, Frame, encode};
use super::intake::Intake;
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
    /// Close a connection that sends no complete frame for this long.
    #[serde(default = "default_idle")]
    pub idle_timeout_secs: u64,
    /// Connections beyond this are closed at once (and logged).
    #[serde(default = "default_max_conn")]
    pub max_connections: usize,
}

fn default_max_frame() -> usize {
    16 * 1024 * 1024
}
fn default_idle() -> u64 {
    600
}
fn default_max_conn() -> usize {
    256
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
}

/// A bound listener, ready to serve.
pub struct Listener {
    listener: TcpListener,
    config: MllpConfig,
    intake: Arc<Intake>,
}

impl Listener {
    /// Binds now, so that a port conflict fails the daemon's start instead of a background task.
    pub async fn bind(config: MllpConfig, intake: Arc<Intake>) -> Result<Listener, MllpError> {
        let listener = TcpListener::bind(config.bind)
            .await
            .map_err(|source| MllpError::Bind {
                feed: intake.feed().name.clone(),
                addr: config.bind,
                source,
            })?;
        Ok(Listener {
            listener,
            config,
            intake,
        })
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// Accepts until shutdown, then waits for every connection to finish its current message.
    pub async fn serve(self, mut shutdown: Shutdown) {
        let feed = self.intake.feed().name.clone();
        info!(feed, addr = %self.config.bind, "MLLP listener ready");
        let slots = Arc::new(Semaphore::new(self.config.max_connections));
        let mut conns = JoinSet::new();
        loop {
            tokio::select! {
                _ = shutdown.recv() => break,
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
                    let sd = shutdown.clone();
                    conns.spawn(async move {
                        let peer = peer.to_string();
                        debug!(feed = %intake.feed().name, peer, "connection opened");
                        if let Err(e) = connection(stream, &peer, &intake, &cfg, sd).await {
                            debug!(feed = %intake.feed().name, peer, error = %e, "connection ended with an error");
                        }
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

/// Serves one connection: frames in, ACKs out, in order.
pub async fn connection<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    peer: &str,
    intake: &Intake,
    cfg: &MllpConfig,
    mut shutdown: Shutdown,
) -> std::io::Result<()> {
    let mut decoder = Decoder::new(cfg.max_frame_bytes);
    let mut buf = vec![0u8; 64 * 1024];
    let mut frames = Vec::new();
    let idle = Duration::from_secs(cfg.idle_timeout_secs.max(1));
    loop {
        let n = tokio::select! {
            // Stop between messages only: a half-received message is never ACKed, and one whose
            // ACK is being computed is finished first (the select is not polled during `handle`).
            _ = shutdown.recv() => return Ok(()),
            r = tokio::time::timeout(idle, stream.read(&mut buf)) => match r {
                Err(_) => {
                    debug!(feed = %intake.feed().name, peer, in_frame = decoder.in_frame(), "idle timeout: closing");
                    return Ok(());
                }
                Ok(r) => r?,
            },
        };
        if n == 0 {
            if decoder.in_frame() {
                warn!(feed = %intake.feed().name, peer, "connection closed in the middle of a message; it was not acknowledged");
            }
            return Ok(());
        }
        decoder.feed(&buf[..n], &mut frames);
        for frame in frames.drain(..) {
            let ack = match frame {
                Frame::Message(body) => intake.handle(body, peer).await.0,
                Frame::Oversize { len } => {
                    warn!(feed = %intake.feed().name, peer, len, "oversize message drained and refused");
                    intake.oversize(len)
                }
            };
            stream.write_all(&encode(&ack)).await?;
        }
        stream.flush().await?;
    }
}
