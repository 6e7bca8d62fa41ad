//! Serial feeds: HL7 v2 over an RS-232 line (often a USB adapter), made as reliable as MLLP.
//!
//! A serial feed is an adapter file with `kind = "serial"`: the device, its line settings (baud,
//! data bits, parity, stop bits, flow control) and a **framing mode**:
//!
//! | mode | on the line | ACK on the line |
//! |---|---|---|
//! | `mllp` | `<VT> message <FS><CR>` | the HL7 ACK, MLLP-framed (or none) |
//! | `stx` | `<STX> message <ETX> [checksum]` | the HL7 ACK framed the same way, a single ACK/NAK byte, or none |
//! | `astm` | ASTM E1381 / CLSI LIS01-A2 low level: ENQ, frames `<STX> FN text <ETB/ETX> C1 C2 <CR><LF>`, EOT | the protocol's ACK/NAK per frame |
//! | `timeout` | segments streamed as lines; a message ends at a silence or at the next `MSH` | none (or the bare HL7 ACK) |
//!
//! Every mode hands complete messages to the same [`Intake`](super::Intake) as MLLP does, so the
//! rule is the same: **a positive acknowledgement only after the durable commit**. The pure
//! decoders ([`stx`], [`astm`], [`timeout`], [`parmrk`], and MLLP's [`super::frame`]) are state
//! machines tested byte by byte; [`source`] is the I/O loop around them (open with backoff,
//! read, hand over, answer, reopen when the device goes away).
//!
//! Line errors (noise, parity and framing errors, bad checksums, bad frame numbers, oversize
//! frames, timeouts) are counted in [`LineStats`] and logged without message content.

pub mod astm;
pub mod parmrk;
pub mod source;
pub mod stx;
pub mod timeout;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

pub use source::SerialSource;

/// Serial transport settings of a feed (`[transport]` with `kind = "serial"`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialConfig {
    /// The device. Prefer the stable `/dev/serial/by-id/usb-...` names: `/dev/ttyUSB0` can change
    /// when adapters are replugged or the appliance reboots.
    pub device: PathBuf,
    /// Line speed in bit/s.
    #[serde(default = "default_baud")]
    pub baud: u32,
    /// 5, 6, 7 or 8.
    #[serde(default)]
    pub data_bits: DataBits,
    /// `none`, `even` or `odd`. With parity on, bytes that fail the check are counted as line
    /// errors and spoil the frame they are in (it is never acknowledged positively).
    #[serde(default)]
    pub parity: Parity,
    /// 1 or 2.
    #[serde(default)]
    pub stop_bits: StopBits,
    /// `none`, `rts_cts` (hardware) or `xon_xoff` (software).
    #[serde(default)]
    pub flow_control: FlowControl,
    /// Largest message accepted (bytes of message text). Larger ones are drained and refused.
    #[serde(default = "default_max_frame")]
    pub max_frame_bytes: usize,
    /// First wait before reopening a missing or lost device; doubles on each failure.
    #[serde(default = "default_reopen_min")]
    pub reopen_min_ms: u64,
    /// Cap on the wait between reopening attempts.
    #[serde(default = "default_reopen_max")]
    pub reopen_max_ms: u64,
    /// How messages are delimited on the line, and how they are acknowledged.
    pub framing: Framing,
}

fn default_baud() -> u32 {
    9600
}
fn default_max_frame() -> usize {
    1024 * 1024
}
fn default_reopen_min() -> u64 {
    500
}
fn default_reopen_max() -> u64 {
    30_000
}

/// Data bits per character.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "u8", into = "u8")]
pub enum DataBits {
    Five,
    Six,
    Seven,
    #[default]
    Eight,
}

impl TryFrom<u8> for DataBits {
    type Error = String;
    fn try_from(v: u8) -> Result<Self, String> {
        match v {
            5 => Ok(DataBits::Five),
            6 => Ok(DataBits::Six),
            7 => Ok(DataBits::Seven),
            8 => Ok(DataBits::Eight),
            _ => Err(format!("data_bits must be 5, 6, 7 or 8, not {v}")),
        }
    }
}

impl From<DataBits> for u8 {
    fn from(d: DataBits) -> u8 {
        match d {
            DataBits::Five => 5,
            DataBits::Six => 6,
            DataBits::Seven => 7,
            DataBits::Eight => 8,
        }
    }
}

/// Stop bits per character.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "u8", into = "u8")]
pub enum StopBits {
    #[default]
    One,
    Two,
}

impl TryFrom<u8> for StopBits {
    type Error = String;
    fn try_from(v: u8) -> Result<Self, String> {
        match v {
            1 => Ok(StopBits::One),
            2 => Ok(StopBits::Two),
            _ => Err(format!("stop_bits must be 1 or 2, not {v}")),
        }
    }
}

impl From<StopBits> for u8 {
    fn from(s: StopBits) -> u8 {
        match s {
            StopBits::One => 1,
            StopBits::Two => 2,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Parity {
    #[default]
    None,
    Even,
    Odd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FlowControl {
    #[default]
    None,
    /// Hardware handshake on the RTS/CTS lines (the cable must carry them).
    RtsCts,
    /// Software handshake: XON (0x11) / XOFF (0x13) in the data stream. Not usable with binary
    /// data, and those two bytes never reach the decoder.
    XonXoff,
}

/// Framing mode (`[transport.framing]`, `mode = ...`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case", deny_unknown_fields)]
pub enum Framing {
    /// MLLP framing on the serial line, exactly as over TCP.
    Mllp(MllpFraming),
    /// `<STX> message <ETX>` with an optional checksum after ETX.
    Stx(StxFraming),
    /// ASTM E1381 / CLSI LIS01-A2 low-level protocol (receiver side).
    Astm(AstmFraming),
    /// No framing: a message ends after a silence, or where the next `MSH` segment starts.
    Timeout(TimeoutFraming),
}

/// HL7 ACK on the line, or nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HlAck {
    /// The HL7 ACK message (AA/AE/AR or CA/CE/CR), framed like the message.
    Hl7,
    /// Nothing is written to the line (a device that cannot read).
    None,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MllpFraming {
    #[serde(default = "hl7_ack")]
    pub ack: HlAck,
}

fn hl7_ack() -> HlAck {
    HlAck::Hl7
}
fn no_ack() -> HlAck {
    HlAck::None
}

/// The checksum that follows ETX in `stx` mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Checksum {
    /// No checksum: the frame ends at ETX.
    #[default]
    None,
    /// Mod-256 sum of the message bytes and the ETX, as two hex characters (as in ASTM E1381).
    SumHex,
    /// XOR of the message bytes and the ETX, as one raw byte (the "BCC"/LRC of many devices).
    Lrc,
}

/// Acknowledgement in `stx` mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StxAck {
    /// The HL7 ACK message, framed `<STX> ack <ETX> [checksum]`.
    Hl7,
    /// One byte: ACK (0x06) once stored (or refused for good), NAK (0x15) to ask for a resend
    /// (bad checksum, line error, storage problem).
    Byte,
    /// Nothing is written to the line.
    None,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StxFraming {
    #[serde(default)]
    pub checksum: Checksum,
    #[serde(default = "stx_ack")]
    pub ack: StxAck,
}

fn stx_ack() -> StxAck {
    StxAck::Hl7
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AstmFraming {
    /// The receiver's wait for the next frame or EOT after ENQ or an acknowledgement
    /// (LIS01-A2: 30 s). When it expires the transfer is abandoned (its unfinished message was
    /// never acknowledged) and the line returns to neutral.
    #[serde(default = "astm_receive_timeout")]
    pub receive_timeout_secs: u64,
    /// Largest frame text (LIS01-A2: 240 characters in a frame of at most 247). Longer frames
    /// are refused with NAK; raise this only for a device known to send longer frames.
    #[serde(default = "astm_max_text")]
    pub max_frame_text: usize,
}

fn astm_receive_timeout() -> u64 {
    30
}
fn astm_max_text() -> usize {
    240
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimeoutFraming {
    /// Silence that ends a message.
    #[serde(default = "gap_ms")]
    pub gap_ms: u64,
    #[serde(default = "no_ack")]
    pub ack: HlAck,
}

fn gap_ms() -> u64 {
    500
}

impl SerialConfig {
    /// Checks that the serde types cannot express (called when adapters load).
    pub fn validate(&self) -> Vec<String> {
        let mut errors = Vec::new();
        if self.baud == 0 {
            errors.push("baud must be greater than 0".to_string());
        }
        if self.device.as_os_str().is_empty() {
            errors.push("device must name the serial device".to_string());
        }
        if self.max_frame_bytes == 0 {
            errors.push("max_frame_bytes must be greater than 0".to_string());
        }
        if self.reopen_min_ms == 0 || self.reopen_min_ms > self.reopen_max_ms {
            errors.push(format!(
                "reopen_min_ms ({}) must be at least 1 and at most reopen_max_ms ({})",
                self.reopen_min_ms, self.reopen_max_ms
            ));
        }
        match &self.framing {
            Framing::Astm(a) => {
                if a.receive_timeout_secs == 0 {
                    errors.push("framing.receive_timeout_secs must be at least 1".to_string());
                }
                if a.max_frame_text == 0 {
                    errors.push("framing.max_frame_text must be at least 1".to_string());
                }
            }
            Framing::Timeout(t) => {
                if t.gap_ms == 0 {
                    errors.push("framing.gap_ms must be at least 1".to_string());
                }
            }
            Framing::Mllp(_) | Framing::Stx(_) => {}
        }
        errors
    }

    pub fn framing_name(&self) -> &'static str {
        match self.framing {
            Framing::Mllp(_) => "mllp",
            Framing::Stx(_) => "stx",
            Framing::Astm(_) => "astm",
            Framing::Timeout(_) => "timeout",
        }
    }
}

/// What a framing decoder produces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A complete message, framing removed.
    Message(Vec<u8>),
    /// A message over the limit; its content was dropped. `len` counts the bytes seen.
    Oversize { len: usize },
    /// A complete frame that must not be trusted (bad checksum, or a parity/framing error on
    /// the line while it was received). The body is kept only to echo its control id.
    Damaged { body: Vec<u8>, error: LineError },
    /// A line error that spoiled no complete frame (a frame restarted or abandoned half way).
    Error(LineError),
}

/// Kinds of line error, for counters and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineError {
    /// A parity or framing error (or a break) reported by the UART.
    Parity,
    /// A frame whose checksum does not match.
    Checksum,
    /// An ASTM frame number that is neither the expected one nor a repeat of the last.
    FrameNumber,
    /// A frame that breaks the framing rules (missing CR LF, forbidden characters, a frame
    /// restarted or abandoned half way).
    Framing,
    /// A frame or message over the configured limit.
    Oversize,
    /// The ASTM receive timer expired during a transfer.
    Timeout,
}

impl LineError {
    pub fn as_str(self) -> &'static str {
        match self {
            LineError::Parity => "parity or framing error",
            LineError::Checksum => "checksum mismatch",
            LineError::FrameNumber => "unexpected frame number",
            LineError::Framing => "malformed frame",
            LineError::Oversize => "over the size limit",
            LineError::Timeout => "receive timeout",
        }
    }
}

impl std::fmt::Display for LineError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Counters of one serial feed, shared with whoever reports them (logs now, a metrics endpoint
/// later). Monotonic since the daemon started.
#[derive(Debug, Default)]
pub struct LineStats {
    /// Bytes discarded outside any frame (noise, stray newlines, a sender's partial frame).
    pub noise_bytes: AtomicU64,
    pub parity_errors: AtomicU64,
    pub checksum_errors: AtomicU64,
    pub frame_number_errors: AtomicU64,
    pub framing_errors: AtomicU64,
    pub oversize: AtomicU64,
    pub timeouts: AtomicU64,
    /// NAKs (byte or ASTM) sent, whatever the reason.
    pub naks_sent: AtomicU64,
    pub messages_stored: AtomicU64,
    pub messages_rejected: AtomicU64,
    /// Messages not stored for a reason on our side (negative ACK asking for a resend).
    pub messages_failed: AtomicU64,
    /// Times the device was opened successfully.
    pub opens: AtomicU64,
    /// Failed attempts to open the device (missing, busy, no permission).
    pub open_failures: AtomicU64,
    /// Times an open device went away (unplugged, hung up, I/O error).
    pub disconnects: AtomicU64,
}

/// A point-in-time copy of [`LineStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct LineStatsSnapshot {
    pub noise_bytes: u64,
    pub parity_errors: u64,
    pub checksum_errors: u64,
    pub frame_number_errors: u64,
    pub framing_errors: u64,
    pub oversize: u64,
    pub timeouts: u64,
    pub naks_sent: u64,
    pub messages_stored: u64,
    pub messages_rejected: u64,
    pub messages_failed: u64,
    pub opens: u64,
    pub open_failures: u64,
    pub disconnects: u64,
}

impl LineStats {
    pub fn line_error(&self, e: LineError) {
        let c = match e {
            LineError::Parity => &self.parity_errors,
            LineError::Checksum => &self.checksum_errors,
            LineError::FrameNumber => &self.frame_number_errors,
            LineError::Framing => &self.framing_errors,
            LineError::Oversize => &self.oversize,
            LineError::Timeout => &self.timeouts,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> LineStatsSnapshot {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        LineStatsSnapshot {
            noise_bytes: g(&self.noise_bytes),
            parity_errors: g(&self.parity_errors),
            checksum_errors: g(&self.checksum_errors),
            frame_number_errors: g(&self.frame_number_errors),
            framing_errors: g(&self.framing_errors),
            oversize: g(&self.oversize),
            timeouts: g(&self.timeouts),
            naks_sent: g(&self.naks_sent),
            messages_stored: g(&self.messages_stored),
            messages_rejected: g(&self.messages_rejected),
            messages_failed: g(&self.messages_failed),
            opens: g(&self.opens),
            open_failures: g(&self.open_failures),
            disconnects: g(&self.disconnects),
        }
    }
}

/// ASCII control characters used by the framings.
pub mod ascii {
    pub const STX: u8 = 0x02;
    pub const ETX: u8 = 0x03;
    pub const EOT: u8 = 0x04;
    pub const ENQ: u8 = 0x05;
    pub const ACK: u8 = 0x06;
    pub const LF: u8 = 0x0A;
    pub const CR: u8 = 0x0D;
    pub const NAK: u8 = 0x15;
    pub const ETB: u8 = 0x17;
}

/// Two uppercase hex digits of `v`.
pub(crate) fn hex2(v: u8) -> [u8; 2] {
    const D: &[u8; 16] = b"0123456789ABCDEF";
    [D[usize::from(v >> 4)], D[usize::from(v & 0x0f)]]
}

/// The value of a hex digit (either case).
pub(crate) fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'A'..=b'F' => Some(b - b'A' + 10),
        b'a'..=b'f' => Some(b - b'a' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use figment::Figment;
    use figment::providers::{Format, Toml};

    fn parse(t: &str) -> Result<SerialConfig, String> {
        Figment::from(Toml::string(t))
            .extract::<SerialConfig>()
            .map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_and_each_mode_parse() {
        let c = parse("device = \"/dev/ttyS0\"\n[framing]\nmode = \"astm\"\n").expect("astm");
        assert_eq!(c.baud, 9600);
        assert_eq!(c.data_bits, DataBits::Eight);
        assert_eq!(c.parity, Parity::None);
        assert_eq!(c.stop_bits, StopBits::One);
        assert_eq!(c.flow_control, FlowControl::None);
        let Framing::Astm(a) = &c.framing else {
            panic!("astm")
        };
        assert_eq!((a.receive_timeout_secs, a.max_frame_text), (30, 240));
        assert!(c.validate().is_empty());

        let c = parse(
            "device = \"/dev/ttyS0\"\nbaud = 19200\ndata_bits = 7\nparity = \"even\"\nstop_bits = 2\nflow_control = \"rts_cts\"\n[framing]\nmode = \"stx\"\nchecksum = \"sum_hex\"\nack = \"byte\"\n",
        )
        .expect("stx");
        assert_eq!(c.data_bits, DataBits::Seven);
        assert_eq!(c.parity, Parity::Even);
        assert_eq!(c.stop_bits, StopBits::Two);
        assert_eq!(c.flow_control, FlowControl::RtsCts);
        let Framing::Stx(s) = &c.framing else {
            panic!("stx")
        };
        assert_eq!((s.checksum, s.ack), (Checksum::SumHex, StxAck::Byte));

        let c = parse("device = \"/dev/x\"\n[framing]\nmode = \"mllp\"\n").expect("mllp");
        assert!(matches!(
            c.framing,
            Framing::Mllp(MllpFraming { ack: HlAck::Hl7 })
        ));
        let c = parse("device = \"/dev/x\"\n[framing]\nmode = \"timeout\"\n").expect("timeout");
        assert!(matches!(
            c.framing,
            Framing::Timeout(TimeoutFraming {
                gap_ms: 500,
                ack: HlAck::None
            })
        ));
    }

    #[test]
    fn bad_settings_are_named() {
        let e = parse("device = \"/dev/x\"\ndata_bits = 9\n[framing]\nmode = \"mllp\"\n")
            .expect_err("9 bits");
        assert!(e.contains("data_bits"), "{e}");
        let e = parse("device = \"/dev/x\"\nparity = \"mark\"\n[framing]\nmode = \"mllp\"\n")
            .expect_err("mark");
        assert!(e.contains("mark"), "{e}");
        let e = parse("device = \"/dev/x\"\n[framing]\nmode = \"mllp\"\nchecksum = \"lrc\"\n")
            .expect_err("checksum is not an mllp setting");
        assert!(e.contains("checksum"), "{e}");
        let e =
            parse("device = \"/dev/x\"\n[framing]\nmode = \"smoke\"\n").expect_err("no such mode");
        assert!(e.contains("smoke"), "{e}");
        let c = parse(
            "device = \"/dev/x\"\nbaud = 0\nreopen_min_ms = 10\nreopen_max_ms = 5\n[framing]\nmode = \"timeout\"\ngap_ms = 0\n",
        )
        .expect("parses");
        let errs = c.validate().join("\n");
        assert!(errs.contains("baud") && errs.contains("reopen") && errs.contains("gap_ms"));
    }

    #[test]
    fn hex_helpers() {
        assert_eq!(&hex2(0x3c), b"3C");
        assert_eq!(&hex2(0x00), b"00");
        assert_eq!(hex_val(b'f'), Some(15));
        assert_eq!(hex_val(b'G'), None);
    }
}
