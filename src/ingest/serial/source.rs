//! The serial I/O loop: open the device (retrying with capped backoff while it is missing), read,
//! decode with the feed's framing, hand complete messages to the [`Intake`], answer on the line,
//! and reopen when the device goes away. Messages on a line are handled strictly in order.
//!
//! When the device gets its answer, per mode:
//!
//! * `mllp`, `stx` (`ack = "hl7"`), `timeout` (`ack = "hl7"`): the HL7 ACK that
//!   [`Intake::handle`] returns, i.e. after the durable commit (AA/CA), or AE/CE when the
//!   message could not be stored (resend), or AR/CR when it is refused. A frame damaged on the
//!   line (bad checksum, parity error) gets AE/CE and is not stored.
//! * `stx` with `ack = "byte"`: ACK (0x06) after the commit, or when the message is refused for
//!   good (oversize, unparseable: resending would not help, and the refusal is logged and
//!   counted); NAK (0x15) when it could not be stored or arrived damaged.
//! * `astm`: see [`super::astm`]: every frame gets the protocol's ACK/NAK; the end frame's ACK is
//!   sent only after the commit, and a failed commit NAKs the end frame so that the device sends
//!   it again.
//!
//! Shutdown stops between messages: a message being stored is finished and answered first; a
//! half-received one is dropped unanswered (the device still holds it). In `timeout` mode a
//! message in progress is completed by its gap (or cut off at the gap after shutdown) first.

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;
use tokio_serial::SerialStream;
use tracing::{debug, info, warn};

use super::ascii::{ACK, NAK};
use super::astm::{self, Receiver};
use super::parmrk::{Piece, Unmarker};
use super::stx;
use super::timeout::Splitter;
use super::{Event, Framing, HlAck, LineError, LineStats, SerialConfig, StxAck};
use crate::ingest::Intake;
use crate::ingest::frame::{self, Frame};
use crate::ingest::intake::Outcome;
use crate::ops::shutdown::Shutdown;

/// Why a session with an open device ended.
#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    #[error("cannot open the device: {0}")]
    Open(#[from] tokio_serial::Error),
    #[error("the device went away: {0}")]
    Lost(#[from] std::io::Error),
    #[error("the device hung up (end of file)")]
    HungUp,
}

/// One serial feed's source.
pub struct SerialSource {
    config: SerialConfig,
    intake: Arc<Intake>,
    stats: Arc<LineStats>,
    peer: String,
}

impl SerialSource {
    pub fn new(config: SerialConfig, intake: Arc<Intake>) -> SerialSource {
        let peer = format!("serial:{}", config.device.display());
        SerialSource {
            config,
            intake,
            stats: Arc::new(LineStats::default()),
            peer,
        }
    }

    /// The feed's counters (shared; they keep counting while the source runs).
    pub fn stats(&self) -> Arc<LineStats> {
        self.stats.clone()
    }

    /// Runs until shutdown: opens the device, serves it, reopens it after a loss.
    pub async fn serve(self, mut shutdown: Shutdown) {
        let feed = self.intake.feed().name.clone();
        let device = self.config.device.display().to_string();
        let min = Duration::from_millis(self.config.reopen_min_ms.max(1));
        let max = Duration::from_millis(self.config.reopen_max_ms.max(1)).max(min);
        let mut backoff = min;
        let mut failures: u64 = 0;
        info!(
            feed,
            device,
            framing = self.config.framing_name(),
            baud = self.config.baud,
            "serial feed starting"
        );
        loop {
            if shutdown.is_shutdown() {
                break;
            }
            let wait = match self.open() {
                Ok((port, marked)) => {
                    LineStats::add(&self.stats.opens, 1);
                    info!(
                        feed,
                        device,
                        failed_attempts = failures,
                        "serial device open"
                    );
                    failures = 0;
                    let opened = Instant::now();
                    match self.session(port, marked, &mut shutdown).await {
                        Ok(()) => break,
                        Err(e) => {
                            LineStats::add(&self.stats.disconnects, 1);
                            warn!(feed, device, error = %e, "serial device lost; reopening");
                        }
                    }
                    // A device that fails at once after opening is retried with growing waits
                    // instead of spinning; one that worked for a while is retried quickly.
                    if opened.elapsed() >= Duration::from_secs(1) {
                        backoff = min;
                    }
                    backoff
                }
                Err(e) => {
                    failures += 1;
                    LineStats::add(&self.stats.open_failures, 1);
                    if failures == 1 || failures.is_multiple_of(20) {
                        warn!(feed, device, error = %e, attempts = failures, retry_in_ms = backoff.as_millis() as u64, "serial device unavailable; retrying");
                    } else {
                        debug!(feed, device, error = %e, attempts = failures, retry_in_ms = backoff.as_millis() as u64, "serial device still unavailable");
                    }
                    backoff
                }
            };
            tokio::select! {
                _ = shutdown.recv() => break,
                _ = tokio::time::sleep(wait) => {}
            }
            backoff = (backoff * 2).min(max);
        }
        let s = self.stats.snapshot();
        info!(
            feed,
            device,
            stored = s.messages_stored,
            rejected = s.messages_rejected,
            failed = s.messages_failed,
            noise_bytes = s.noise_bytes,
            parity_errors = s.parity_errors,
            checksum_errors = s.checksum_errors,
            frame_number_errors = s.frame_number_errors,
            framing_errors = s.framing_errors,
            oversize = s.oversize,
            timeouts = s.timeouts,
            naks_sent = s.naks_sent,
            disconnects = s.disconnects,
            "serial feed stopped"
        );
    }

    /// Opens and configures the device. The second value says whether parity/framing errors
    /// are marked in the byte stream (`PARMRK`, see [`super::parmrk`]).
    fn open(&self) -> Result<(SerialStream, bool), SerialError> {
        let c = &self.config;
        let builder = tokio_serial::new(c.device.to_string_lossy(), c.baud)
            .data_bits(match c.data_bits {
                super::DataBits::Five => tokio_serial::DataBits::Five,
                super::DataBits::Six => tokio_serial::DataBits::Six,
                super::DataBits::Seven => tokio_serial::DataBits::Seven,
                super::DataBits::Eight => tokio_serial::DataBits::Eight,
            })
            .parity(match c.parity {
                super::Parity::None => tokio_serial::Parity::None,
                super::Parity::Even => tokio_serial::Parity::Even,
                super::Parity::Odd => tokio_serial::Parity::Odd,
            })
            .stop_bits(match c.stop_bits {
                super::StopBits::One => tokio_serial::StopBits::One,
                super::StopBits::Two => tokio_serial::StopBits::Two,
            })
            .flow_control(match c.flow_control {
                super::FlowControl::None => tokio_serial::FlowControl::None,
                super::FlowControl::RtsCts => tokio_serial::FlowControl::Hardware,
                super::FlowControl::XonXoff => tokio_serial::FlowControl::Software,
            });
        // Exclusive (TIOCEXCL + flock, the default): a second process cannot steal the line.
        let port = SerialStream::open(&builder)?;
        let marked = match mark_line_errors(&port) {
            Ok(m) => m,
            Err(e) => {
                warn!(feed = %self.intake.feed().name, device = %c.device.display(), error = %e, "cannot enable parity/framing error marking; such errors will go undetected");
                false
            }
        };
        Ok((port, marked))
    }

    /// Serves an open device until shutdown (Ok) or until it goes away (Err).
    async fn session(
        &self,
        mut port: SerialStream,
        marked: bool,
        shutdown: &mut Shutdown,
    ) -> Result<(), SerialError> {
        let mut line = Line::new(&self.config);
        let mut unmarker = marked.then(Unmarker::new);
        let mut buf = vec![0u8; 4096];
        let mut pieces = Vec::new();
        // Set on shutdown while a timeout-mode message is in progress: the gap ends it, but no
        // later than one gap from now.
        let mut stopping: Option<Instant> = None;
        let mut last_activity = Instant::now();
        loop {
            let deadline = match (line.deadline(last_activity), stopping) {
                (Some(d), Some(s)) => Some(d.min(s)),
                (d, _) => d,
            };
            let read = tokio::select! {
                _ = shutdown.recv(), if stopping.is_none() => {
                    if let Some(gap) = line.finish_before_stopping() {
                        stopping = Some(Instant::now() + gap);
                        continue;
                    }
                    return Ok(());
                }
                _ = sleep_until(deadline), if deadline.is_some() => None,
                r = port.read(&mut buf) => Some(r),
            };
            match read {
                None => self.on_timer(&mut line, &mut port).await?,
                Some(Err(e)) => {
                    self.note_loss(&mut line);
                    return Err(SerialError::Lost(e));
                }
                Some(Ok(0)) => {
                    self.note_loss(&mut line);
                    return Err(SerialError::HungUp);
                }
                Some(Ok(n)) => {
                    let bytes = &buf[..n];
                    match unmarker.as_mut() {
                        None => self.on_data(&mut line, bytes, &mut port).await?,
                        Some(u) => {
                            u.feed(bytes, &mut pieces);
                            for piece in pieces.drain(..) {
                                match piece {
                                    Piece::Data(d) => {
                                        self.on_data(&mut line, &d, &mut port).await?
                                    }
                                    Piece::Error => {
                                        self.stats.line_error(LineError::Parity);
                                        let spoiled = line.damage();
                                        warn!(feed = %self.intake.feed().name, device = %self.config.device.display(), spoiled_frame = spoiled, total = self.stats.parity_errors.load(std::sync::atomic::Ordering::Relaxed), "line error: parity or framing error (or a break)");
                                    }
                                }
                            }
                        }
                    }
                }
            }
            last_activity = Instant::now();
            if stopping.is_some() && !line.pending() {
                return Ok(());
            }
        }
    }

    fn note_loss(&self, line: &mut Line) {
        let dropped = line.holds_partial();
        if dropped {
            warn!(feed = %self.intake.feed().name, device = %self.config.device.display(), "line lost in the middle of a message; it was not acknowledged");
        }
    }

    /// Counts bytes the decoder skipped; logs them once a frame (or answer) follows, so that
    /// noise split over many reads gives one line saying how much was skipped before the
    /// decoder resynchronised.
    fn note_noise(&self, noise: &mut Noise, skipped: u64, resynced: bool) {
        let delta = skipped.saturating_sub(noise.seen);
        noise.seen = skipped;
        LineStats::add(&self.stats.noise_bytes, delta);
        noise.unlogged += delta;
        if !resynced || noise.unlogged == 0 {
            return;
        }
        let bytes = std::mem::take(&mut noise.unlogged);
        // One or two stray bytes between frames are usually a CR LF trailer; more is noise.
        if bytes > 2 {
            warn!(feed = %self.intake.feed().name, device = %self.config.device.display(), bytes, "line noise skipped; resynchronised at the next frame start");
        } else {
            debug!(feed = %self.intake.feed().name, bytes, "stray bytes between frames skipped");
        }
    }

    fn count_error(&self, e: LineError) {
        // Parity errors were counted when the UART reported them.
        if e != LineError::Parity {
            self.stats.line_error(e);
        }
        warn!(feed = %self.intake.feed().name, device = %self.config.device.display(), error = %e, "line error");
    }

    fn count_outcome(&self, o: &Outcome) {
        let c = match o {
            // A duplicate was stored before: accepted (ACKed again, not stored twice).
            Outcome::Stored(_) | Outcome::Duplicate(_) => &self.stats.messages_stored,
            Outcome::Rejected => &self.stats.messages_rejected,
            Outcome::Failed => &self.stats.messages_failed,
            Outcome::Batch { accepted, refused } => {
                LineStats::add(&self.stats.messages_stored, *accepted as u64);
                LineStats::add(&self.stats.messages_rejected, *refused as u64);
                return;
            }
        };
        LineStats::add(c, 1);
    }

    async fn write(&self, port: &mut SerialStream, bytes: &[u8]) -> Result<(), SerialError> {
        if bytes.len() == 1 && bytes[0] == NAK {
            LineStats::add(&self.stats.naks_sent, 1);
        }
        // No flush: on a tty it is tcdrain(), which would block a runtime thread; the bytes are
        // in the kernel's queue once write returns.
        port.write_all(bytes).await?;
        Ok(())
    }

    async fn on_data(
        &self,
        line: &mut Line,
        data: &[u8],
        port: &mut SerialStream,
    ) -> Result<(), SerialError> {
        let mut events = Vec::new();
        let Line { kind, noise } = line;
        match kind {
            Kind::Mllp { dec, damaged, .. } => {
                let mut frames = Vec::new();
                dec.feed(data, &mut frames);
                for f in frames {
                    events.push(match f {
                        Frame::Message(body) if std::mem::take(damaged) => Event::Damaged {
                            body,
                            error: LineError::Parity,
                        },
                        Frame::Message(body) => Event::Message(body),
                        Frame::Oversize { len } => Event::Oversize { len },
                    });
                }
            }
            Kind::Stx { dec, .. } => dec.feed(data, &mut events),
            Kind::Timeout { split, .. } => split.feed(data, &mut events),
            Kind::Astm { rx, .. } => {
                let mut rest = data;
                let mut outs = Vec::new();
                loop {
                    let n = rx.feed(rest, &mut outs);
                    rest = rest.get(n..).unwrap_or_default();
                    self.note_noise(noise, rx.skipped(), !outs.is_empty());
                    for o in outs.drain(..) {
                        self.astm_output(rx, o, port).await?;
                    }
                    if rest.is_empty() {
                        break;
                    }
                }
            }
        }
        self.note_noise(noise, kind.skipped(), !events.is_empty());
        for e in events {
            self.hl7_event(kind, e, port).await?;
        }
        Ok(())
    }

    async fn on_timer(&self, line: &mut Line, port: &mut SerialStream) -> Result<(), SerialError> {
        let mut events = Vec::new();
        let Line { kind, noise } = line;
        match kind {
            Kind::Timeout { split, .. } => split.flush(&mut events),
            Kind::Astm { rx, .. } => {
                let mut outs = Vec::new();
                rx.timeout(&mut outs);
                for o in outs {
                    self.astm_output(rx, o, port).await?;
                }
            }
            Kind::Mllp { .. } | Kind::Stx { .. } => {}
        }
        self.note_noise(noise, kind.skipped(), !events.is_empty());
        for e in events {
            self.hl7_event(kind, e, port).await?;
        }
        Ok(())
    }

    async fn astm_output(
        &self,
        rx: &mut Receiver,
        o: astm::Output,
        port: &mut SerialStream,
    ) -> Result<(), SerialError> {
        match o {
            astm::Output::Reply(b) => self.write(port, &[b]).await?,
            astm::Output::Message(m) => {
                let (_, outcome) = self.intake.handle(m, &self.peer).await;
                self.count_outcome(&outcome);
                // Refused messages are acknowledged: resending the same bytes cannot help, and
                // the refusal is logged and counted. Only a storage failure asks for a resend.
                let reply = rx.verdict(!matches!(outcome, Outcome::Failed));
                self.write(port, &[reply]).await?;
            }
            astm::Output::Oversize { len } => {
                self.stats.line_error(LineError::Oversize);
                LineStats::add(&self.stats.messages_rejected, 1);
                warn!(feed = %self.intake.feed().name, len, limit = self.config.max_frame_bytes, "oversize message dropped and refused");
            }
            astm::Output::Error(e) => self.count_error(e),
            astm::Output::TransferEnded => {
                debug!(feed = %self.intake.feed().name, "ASTM transfer ended (EOT)")
            }
        }
        Ok(())
    }

    async fn hl7_event(
        &self,
        kind: &Kind,
        e: Event,
        port: &mut SerialStream,
    ) -> Result<(), SerialError> {
        // (HL7 ACK bytes, whether a byte-mode answer is ACK)
        let (ack, positive) = match e {
            Event::Message(body) => {
                let (ack, outcome) = self.intake.handle(body, &self.peer).await;
                self.count_outcome(&outcome);
                (ack, !matches!(outcome, Outcome::Failed))
            }
            Event::Oversize { len } => {
                self.stats.line_error(LineError::Oversize);
                LineStats::add(&self.stats.messages_rejected, 1);
                warn!(feed = %self.intake.feed().name, len, limit = self.config.max_frame_bytes, "oversize message drained and refused");
                (self.intake.oversize(len), true)
            }
            Event::Damaged { body, error } => {
                self.count_error(error);
                LineStats::add(&self.stats.messages_failed, 1);
                (self.intake.damaged(&body, error.as_str()), false)
            }
            Event::Error(err) => {
                self.count_error(err);
                return Ok(());
            }
        };
        let wire = match kind {
            Kind::Mllp {
                ack: HlAck::Hl7, ..
            } => frame::encode(&ack),
            Kind::Stx {
                ack: StxAck::Hl7,
                checksum,
                ..
            } => stx::encode(&ack, *checksum),
            Kind::Stx {
                ack: StxAck::Byte, ..
            } => vec![if positive { ACK } else { NAK }],
            Kind::Timeout {
                ack: HlAck::Hl7, ..
            } => ack,
            _ => return Ok(()),
        };
        self.write(port, &wire).await
    }
}

/// Sets `PARMRK` (and clears `IGNPAR`, `IGNBRK`, `BRKINT`, `ISTRIP`) so that characters received
/// with parity or framing errors arrive marked instead of as silent NULs; returns whether the
/// settings took effect.
fn mark_line_errors(port: &SerialStream) -> nix::Result<bool> {
    use nix::sys::termios::{InputFlags, SetArg, tcgetattr, tcsetattr};
    let fd = port.as_raw_fd();
    let mut t = tcgetattr(fd)?;
    t.input_flags.insert(InputFlags::PARMRK);
    t.input_flags
        .remove(InputFlags::IGNPAR | InputFlags::IGNBRK | InputFlags::BRKINT | InputFlags::ISTRIP);
    tcsetattr(fd, SetArg::TCSANOW, &t)?;
    let back = tcgetattr(fd)?;
    Ok(back.input_flags.contains(InputFlags::PARMRK)
        && !back.input_flags.contains(InputFlags::IGNPAR)
        && !back.input_flags.contains(InputFlags::ISTRIP))
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// The decoder of one open line, with its answer settings.
struct Line {
    kind: Kind,
    noise: Noise,
}

#[derive(Default)]
struct Noise {
    /// The decoder's skipped-bytes count already counted.
    seen: u64,
    /// Skipped bytes not yet logged.
    unlogged: u64,
}

enum Kind {
    Mllp {
        dec: frame::Decoder,
        /// A line error hit the frame in progress.
        damaged: bool,
        ack: HlAck,
    },
    Stx {
        dec: stx::Decoder,
        checksum: super::Checksum,
        ack: StxAck,
    },
    Astm {
        rx: Receiver,
        timeout: Duration,
    },
    Timeout {
        split: Splitter,
        gap: Duration,
        ack: HlAck,
    },
}

impl Kind {
    fn skipped(&self) -> u64 {
        match self {
            Kind::Mllp { dec, .. } => dec.skipped(),
            Kind::Stx { dec, .. } => dec.skipped(),
            Kind::Astm { rx, .. } => rx.skipped(),
            Kind::Timeout { split, .. } => split.skipped(),
        }
    }
}

impl Line {
    fn new(c: &SerialConfig) -> Line {
        let kind = match &c.framing {
            Framing::Mllp(m) => Kind::Mllp {
                dec: frame::Decoder::new(c.max_frame_bytes),
                damaged: false,
                ack: m.ack,
            },
            Framing::Stx(s) => Kind::Stx {
                dec: stx::Decoder::new(c.max_frame_bytes, s.checksum),
                checksum: s.checksum,
                ack: s.ack,
            },
            Framing::Astm(a) => Kind::Astm {
                rx: Receiver::new(a.max_frame_text, c.max_frame_bytes),
                timeout: Duration::from_secs(a.receive_timeout_secs),
            },
            Framing::Timeout(t) => Kind::Timeout {
                split: Splitter::new(c.max_frame_bytes),
                gap: Duration::from_millis(t.gap_ms),
                ack: t.ack,
            },
        };
        Line {
            kind,
            noise: Noise::default(),
        }
    }

    /// When the timer of this mode fires, given the time of the last byte or answer.
    fn deadline(&self, last_activity: Instant) -> Option<Instant> {
        match &self.kind {
            Kind::Timeout { split, gap, .. } if split.pending() => Some(last_activity + *gap),
            Kind::Astm { rx, timeout } if rx.in_transfer() => Some(last_activity + *timeout),
            _ => None,
        }
    }

    /// On shutdown: true when a message in progress should be completed first (timeout mode,
    /// where the device never resends).
    fn finish_before_stopping(&self) -> Option<Duration> {
        match &self.kind {
            Kind::Timeout { split, gap, .. } if split.pending() => Some(*gap),
            _ => None,
        }
    }

    fn pending(&self) -> bool {
        match &self.kind {
            Kind::Timeout { split, .. } => split.pending(),
            _ => false,
        }
    }

    fn holds_partial(&mut self) -> bool {
        match &mut self.kind {
            Kind::Mllp { dec, .. } => dec.in_frame(),
            Kind::Stx { dec, .. } => dec.in_frame(),
            Kind::Astm { rx, .. } => rx.holds_partial(),
            Kind::Timeout { split, .. } => split.discard() > 0,
        }
    }

    fn damage(&mut self) -> bool {
        match &mut self.kind {
            Kind::Mllp { dec, damaged, .. } => {
                *damaged |= dec.in_frame();
                dec.in_frame()
            }
            Kind::Stx { dec, .. } => dec.damage(),
            Kind::Astm { rx, .. } => rx.damage(),
            Kind::Timeout { split, .. } => split.damage(),
        }
    }
}
