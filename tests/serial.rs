//! Serial feeds end to end, without hardware: socat makes a pseudo-terminal pair, the test is the
//! device on one end, the real `hl7-edge` binary opens the other end as its serial feed. Each
//! test checks what the device sees on the line (ACKs) and what reaches the broker (Bundles).

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use hl7_edge::ingest::serial::Checksum;
use hl7_edge::ingest::serial::astm::{encode_frame, encode_message};
use hl7_edge::ingest::serial::stx;
use serde_json::Value;

const STX: u8 = 0x02;
const ETX: u8 = 0x03;
const EOT: u8 = 0x04;
const ENQ: u8 = 0x05;
const ACK: u8 = 0x06;
const NAK: u8 = 0x15;

/// A socat pseudo-terminal pair: `device` is the test's end, `appliance` the daemon's.
struct Socat {
    child: Option<Child>,
    device: PathBuf,
    appliance: PathBuf,
}

impl Socat {
    fn new(dir: &Path) -> Socat {
        Socat {
            child: None,
            device: dir.join("device-tty"),
            appliance: dir.join("appliance-tty"),
        }
    }

    fn start(&mut self) {
        let arg = |p: &Path| format!("pty,raw,echo=0,link={}", p.display());
        let child = Command::new("socat")
            .arg(arg(&self.device))
            .arg(arg(&self.appliance))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start socat (run scripts/test.sh, which installs it)");
        self.child = Some(child);
        wait_for("socat's pty links", Duration::from_secs(10), || {
            (std::fs::metadata(&self.device).is_ok() && std::fs::metadata(&self.appliance).is_ok())
                .then_some(())
        });
    }

    /// Unplugs: socat exits, both ptys close, its links go.
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let end = Instant::now() + Duration::from_secs(10);
            while c.try_wait().ok().flatten().is_none() && Instant::now() < end {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        // socat removes its links on a clean exit; make sure for the next start.
        let _ = std::fs::remove_file(&self.device);
        let _ = std::fs::remove_file(&self.appliance);
    }
}

impl Drop for Socat {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The simulated device: the test's end of the pty pair, with a receive buffer.
struct Device {
    port: Box<dyn tokio_serial::SerialPort>,
    buf: Vec<u8>,
}

impl Device {
    fn open(path: &Path) -> Device {
        let port = tokio_serial::new(path.to_string_lossy(), 9600)
            .timeout(Duration::from_millis(50))
            .open()
            .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
        Device {
            port,
            buf: Vec::new(),
        }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.port.write_all(bytes).expect("device write");
        self.port.flush().expect("device flush");
    }

    /// Sends `bytes` one byte per write (the daemon sees reads split at arbitrary places).
    fn send_bytewise(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.send(std::slice::from_ref(b));
        }
    }

    /// Reads until `done` finds a complete answer in the buffer (returning its length), then
    /// removes and returns it.
    fn read_until(
        &mut self,
        what: &str,
        timeout: Duration,
        done: impl Fn(&[u8]) -> Option<usize>,
    ) -> Vec<u8> {
        let end = Instant::now() + timeout;
        loop {
            if let Some(n) = done(&self.buf) {
                return self.buf.drain(..n).collect();
            }
            if Instant::now() > end {
                panic!(
                    "timed out after {timeout:?} waiting for {what}; line holds {:?}",
                    String::from_utf8_lossy(&self.buf)
                );
            }
            let mut chunk = [0u8; 1024];
            match self.port.read(&mut chunk) {
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                Err(e) => panic!("device read: {e}"),
            }
        }
    }

    fn byte(&mut self, what: &str) -> u8 {
        self.read_until(what, Duration::from_secs(20), |b| {
            (!b.is_empty()).then_some(1)
        })[0]
    }

    /// Asserts that nothing arrives for `d`.
    fn quiet_for(&mut self, d: Duration) {
        let end = Instant::now() + d;
        while Instant::now() < end {
            let mut chunk = [0u8; 64];
            if let Ok(n) = self.port.read(&mut chunk) {
                self.buf.extend_from_slice(&chunk[..n]);
            }
        }
        assert!(
            self.buf.is_empty(),
            "unexpected bytes on the line: {:?}",
            self.buf
        );
    }
}

fn serial_adapter(name: &str, tty: &Path, framing: &str) -> String {
    format!(
        "name = \"{name}\"\ncharset_fallback = \"windows-1252\"\n[transport]\nkind = \"serial\"\ndevice = \"{}\"\nbaud = 9600\nreopen_min_ms = 50\nreopen_max_ms = 400\nmax_frame_bytes = 65536\n[transport.framing]\n{framing}\n",
        tty.display()
    )
}

fn count_in_log(d: &Daemon, needle: &str) -> usize {
    d.log_text().matches(needle).count()
}

/// Waits until the daemon has logged `needle` at least `n` times.
fn wait_log(d: &Daemon, needle: &str, n: usize) {
    let end = Instant::now() + Duration::from_secs(20);
    while count_in_log(d, needle) < n {
        if Instant::now() > end {
            panic!("daemon never logged {needle:?} x{n}:\n{}", d.log_text());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A test fixture with its own control id (so that several can be told apart on the broker).
fn message(control_id: &str) -> Vec<u8> {
    let text = String::from_utf8(fixture("adt_a01_uk.hl7")).expect("UTF-8 fixture");
    text.replace("MSG00001", control_id).into_bytes()
}

/// The same message in ISO-8859-1, with a 0xFF byte in the given name ("ZÿE").
fn latin1_message_with_ff(control_id: &str) -> Vec<u8> {
    let text = String::from_utf8(message(control_id)).expect("UTF-8");
    let text = text
        .replace("UNICODE UTF-8", "8859/1")
        .replace("ZOË", "Z\u{ff}E");
    let (bytes, _, bad) = encoding_rs::WINDOWS_1252.encode(&text);
    assert!(!bad);
    assert!(bytes.contains(&0xFF));
    bytes.into_owned()
}

fn bundles_by_control_id(msgs: &[(String, String)]) -> Vec<(String, Value)> {
    msgs.iter()
        .map(|(_topic, p)| {
            let v: Value = serde_json::from_str(p).expect("payload is JSON");
            (
                v["identifier"]["value"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                v,
            )
        })
        .collect()
}

fn mllp_ack(buf: &[u8]) -> Option<usize> {
    buf.windows(2)
        .position(|w| w == [0x1c, 0x0d])
        .map(|i| i + 2)
}

fn ack_text(framed: &[u8], start: u8) -> String {
    let from = framed.iter().position(|b| *b == start).expect("start byte") + 1;
    String::from_utf8_lossy(&framed[from..]).into_owned()
}

fn patient_given(bundle: &Value) -> String {
    bundle["entry"]
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| &e["resource"])
        .find(|r| r["resourceType"] == "Patient")
        .and_then(|p| p["name"][0]["given"][0].as_str())
        .unwrap_or_default()
        .to_string()
}

#[test]
fn mllp_over_serial_with_noise_and_split_writes() {
    let broker = Broker::start();
    let sub = Subscriber::start(broker.port, "hl7-edge/#");
    let tmp = tempfile::tempdir().expect("tmp");
    let mut pty = Socat::new(tmp.path());
    pty.start();
    let d = Daemon::start_with_adapters(
        &broker.url(),
        "",
        &[(
            "monitor.toml",
            serial_adapter("monitor", &pty.appliance, "mode = \"mllp\""),
        )],
    );
    wait_log(&d, "serial device open", 1);
    let mut dev = Device::open(&pty.device);

    // Noise first, then a message written one byte at a time.
    dev.send(b"\r\n\x00garbage\xfe");
    dev.send_bytewise(&hl7_edge::ingest::frame::encode(&message("SER-MLLP-1")));
    let ack = ack_text(
        &dev.read_until("the MLLP ACK", Duration::from_secs(20), mllp_ack),
        0x0b,
    );
    assert_eq!(field(&ack, "MSA", 1), "AA", "{ack}");
    assert_eq!(field(&ack, "MSA", 2), "SER-MLLP-1", "{ack}");

    // A second one in one write.
    dev.send(&hl7_edge::ingest::frame::encode(&message("SER-MLLP-2")));
    let ack = ack_text(
        &dev.read_until("the MLLP ACK", Duration::from_secs(20), mllp_ack),
        0x0b,
    );
    assert_eq!(field(&ack, "MSA", 2), "SER-MLLP-2", "{ack}");

    let got = bundles_by_control_id(&sub.take(2, Duration::from_secs(60)));
    let topics: Vec<_> = sub_topics(&got);
    assert_eq!(topics, vec!["SER-MLLP-1", "SER-MLLP-2"], "in order");
    let log = d.log_text();
    assert!(log.contains("line noise skipped"), "{log}");
    for secret in ["9449305552", "O'BRIEN", "ZOË"] {
        assert!(!log.contains(secret), "log leaks {secret}");
    }
}

fn sub_topics(got: &[(String, Value)]) -> Vec<&str> {
    got.iter().map(|(id, _)| id.as_str()).collect()
}

#[test]
fn stx_etx_with_checksum_naks_a_bad_frame_and_takes_the_resend() {
    let broker = Broker::start();
    let sub = Subscriber::start(broker.port, "hl7-edge/#");
    let tmp = tempfile::tempdir().expect("tmp");
    let mut pty = Socat::new(tmp.path());
    pty.start();
    let d = Daemon::start_with_adapters(
        &broker.url(),
        "",
        &[(
            "lab.toml",
            serial_adapter(
                "lab",
                &pty.appliance,
                "mode = \"stx\"\nchecksum = \"sum_hex\"\nack = \"byte\"",
            ),
        )],
    );
    wait_log(&d, "serial device open", 1);
    let mut dev = Device::open(&pty.device);

    // A Latin-1 message with a 0xFF byte: the line discipline doubles it (PARMRK), the daemon
    // must undo that, or the checksum and the name would be wrong.
    let body = latin1_message_with_ff("SER-STX-1");
    let good = stx::encode(&body, Checksum::SumHex);
    let mut bad = good.clone();
    let n = bad.len();
    bad[n - 1] = if bad[n - 1] == b'0' { b'1' } else { b'0' };
    dev.send(&bad);
    assert_eq!(dev.byte("NAK for a wrong checksum"), NAK);
    dev.send(b"\r\n"); // a CR LF trailer some devices send: skipped
    dev.send(&good);
    assert_eq!(dev.byte("ACK after the commit"), ACK);

    let got = bundles_by_control_id(&sub.take(1, Duration::from_secs(60)));
    assert_eq!(got[0].0, "SER-STX-1");
    assert_eq!(
        patient_given(&got[0].1),
        "Z\u{ff}E",
        "0xFF survived the line"
    );
    assert!(
        sub.drain_for(Duration::from_millis(500)).is_empty(),
        "the damaged frame was not stored"
    );
    let log = d.log_text();
    assert!(log.contains("checksum mismatch"), "{log}");
}

#[test]
fn stx_etx_without_checksum_gets_a_framed_hl7_ack() {
    let broker = Broker::start();
    let sub = Subscriber::start(broker.port, "hl7-edge/#");
    let tmp = tempfile::tempdir().expect("tmp");
    let mut pty = Socat::new(tmp.path());
    pty.start();
    let d = Daemon::start_with_adapters(
        &broker.url(),
        "",
        &[(
            "pas2.toml",
            serial_adapter("pas-serial", &pty.appliance, "mode = \"stx\""),
        )],
    );
    wait_log(&d, "serial device open", 1);
    let mut dev = Device::open(&pty.device);
    let mut wire = b"junk\x02partial-frame-abandoned".to_vec();
    wire.extend(stx::encode(&message("SER-STX-2"), Checksum::None));
    dev.send(&wire);
    let ack = dev.read_until("the STX/ETX ACK", Duration::from_secs(20), |b| {
        b.iter().position(|x| *x == ETX).map(|i| i + 1)
    });
    assert_eq!(ack[0], STX);
    let text = ack_text(&ack, STX);
    assert_eq!(field(&text, "MSA", 1), "AA", "{text}");
    assert_eq!(field(&text, "MSA", 2), "SER-STX-2", "{text}");
    // Garbage in a frame: refused with AR, nothing stored, the line keeps working.
    dev.send(&stx::encode(b"not HL7", Checksum::None));
    let ack = dev.read_until("the AR", Duration::from_secs(20), |b| {
        b.iter().position(|x| *x == ETX).map(|i| i + 1)
    });
    assert_eq!(field(&ack_text(&ack, STX), "MSA", 1), "AR");
    let got = bundles_by_control_id(&sub.take(1, Duration::from_secs(60)));
    assert_eq!(got[0].0, "SER-STX-2");
    assert!(d.log_text().contains("malformed frame"), "restart counted");
}

/// One ASTM transfer: ENQ, the frames of each message (answering as the device expects),
/// EOT. Returns the replies received for each frame.
fn astm_send(dev: &mut Device, frames: &[Vec<u8>]) -> Vec<u8> {
    let mut replies = Vec::new();
    for f in frames {
        dev.send(f);
        replies.push(dev.byte("a reply to an ASTM frame"));
    }
    replies
}

#[test]
fn astm_e1381_handshake_frames_checksums_and_retransmission() {
    let broker = Broker::start();
    let sub = Subscriber::start(broker.port, "hl7-edge/#");
    let tmp = tempfile::tempdir().expect("tmp");
    let mut pty = Socat::new(tmp.path());
    pty.start();
    let d = Daemon::start_with_adapters(
        &broker.url(),
        "",
        &[(
            "analyser.toml",
            serial_adapter(
                "analyser",
                &pty.appliance,
                "mode = \"astm\"\nreceive_timeout_secs = 1",
            ),
        )],
    );
    wait_log(&d, "serial device open", 1);
    let mut dev = Device::open(&pty.device);

    // Noise while neutral is ignored (no reply).
    dev.send(b"\r\n~~noise~~");
    dev.quiet_for(Duration::from_millis(200));
    dev.send(&[ENQ]);
    assert_eq!(dev.byte("ACK to ENQ"), ACK);

    // Message 1 in frames of at most 240 characters (the fixture is ~470 bytes: 2 frames).
    let m1 = message("SER-ASTM-1");
    let frames = encode_message(&m1, 240, 1);
    assert!(frames.len() >= 2);
    // The first frame arrives with a wrong checksum: NAK, then the retransmission: ACK.
    let mut bad = frames[0].clone();
    let n = bad.len();
    bad[n - 4] = if bad[n - 4] == b'0' { b'1' } else { b'0' };
    assert_eq!(astm_send(&mut dev, &[bad]), vec![NAK]);
    // A wrong frame number: NAK.
    let mut wrong_fn = encode_frame(3, &m1[..10], false);
    assert_eq!(
        astm_send(&mut dev, &[std::mem::take(&mut wrong_fn)]),
        vec![NAK]
    );
    let replies = astm_send(&mut dev, &frames);
    assert!(replies.iter().all(|r| *r == ACK), "{replies:?}");
    // The device missed our last ACK and sends the end frame again: ACK, not stored twice.
    assert_eq!(astm_send(&mut dev, &frames[frames.len() - 1..]), vec![ACK]);

    // Message 2 in the same transfer: frame numbers carry on; written byte by byte.
    let next_fn = (frames.len() + 1) as u8 % 8;
    let m2 = message("SER-ASTM-2");
    for f in encode_message(&m2, 240, next_fn) {
        dev.send_bytewise(&f);
        assert_eq!(dev.byte("ACK"), ACK);
    }
    dev.send(&[EOT]);
    dev.quiet_for(Duration::from_millis(200));

    // A transfer that falls silent after an intermediate frame: the receive timer (1 s here)
    // abandons it; the line is neutral again and the next ENQ is answered.
    dev.send(&[ENQ]);
    assert_eq!(dev.byte("ACK to ENQ"), ACK);
    let m3 = encode_message(&message("SER-ASTM-3"), 240, 1);
    assert_eq!(astm_send(&mut dev, &m3[..1]), vec![ACK]);
    wait_log(&d, "receive timeout", 1);
    dev.send(&[ENQ]);
    assert_eq!(dev.byte("ACK to ENQ after the timeout"), ACK);
    dev.send(&[EOT]);

    let got = bundles_by_control_id(&sub.take(2, Duration::from_secs(60)));
    assert_eq!(sub_topics(&got), vec!["SER-ASTM-1", "SER-ASTM-2"]);
    assert!(
        sub.drain_for(Duration::from_millis(500)).is_empty(),
        "neither the repeated end frame nor the abandoned message was stored"
    );
    let log = d.log_text();
    assert!(log.contains("checksum mismatch"), "{log}");
    assert!(log.contains("unexpected frame number"), "{log}");
}

#[test]
fn timeout_mode_splits_streamed_segments() {
    let broker = Broker::start();
    let sub = Subscriber::start(broker.port, "hl7-edge/#");
    let tmp = tempfile::tempdir().expect("tmp");
    let mut pty = Socat::new(tmp.path());
    pty.start();
    let d = Daemon::start_with_adapters(
        &broker.url(),
        "",
        &[(
            "stream.toml",
            serial_adapter("stream", &pty.appliance, "mode = \"timeout\"\ngap_ms = 300"),
        )],
    );
    wait_log(&d, "serial device open", 1);
    let mut dev = Device::open(&pty.device);
    // Noise, then two messages back to back with CR LF line ends (split at the second MSH),
    // then a third after which the line falls silent (ended by the gap).
    let crlf = |m: Vec<u8>| {
        String::from_utf8(m)
            .expect("UTF-8")
            .replace('\r', "\r\n")
            .into_bytes()
    };
    let mut wire = b"PID|stray segment of a message whose start was missed\r\n".to_vec();
    wire.extend(crlf(message("SER-TO-1")));
    wire.extend(crlf(message("SER-TO-2")));
    wire.extend(crlf(message("SER-TO-3")));
    dev.send(&wire);
    let got = bundles_by_control_id(&sub.take(3, Duration::from_secs(60)));
    assert_eq!(sub_topics(&got), vec!["SER-TO-1", "SER-TO-2", "SER-TO-3"]);
    dev.quiet_for(Duration::from_millis(100)); // ack = none: nothing on the line
    assert!(d.log_text().contains("line noise skipped"));
}

#[test]
fn missing_device_unplug_mid_message_and_replug_resume_by_themselves() {
    let broker = Broker::start();
    let sub = Subscriber::start(broker.port, "hl7-edge/#");
    let tmp = tempfile::tempdir().expect("tmp");
    let mut pty = Socat::new(tmp.path());
    // The daemon starts while the device is missing.
    let mut d = Daemon::start_with_adapters(
        &broker.url(),
        "",
        &[(
            "analyser.toml",
            serial_adapter("analyser", &pty.appliance, "mode = \"astm\""),
        )],
    );
    wait_log(&d, "serial device unavailable; retrying", 1);

    // Plugged in: the feed opens it by itself.
    pty.start();
    wait_log(&d, "serial device open", 1);
    let mut dev = Device::open(&pty.device);
    dev.send(&[ENQ]);
    assert_eq!(dev.byte("ACK to ENQ"), ACK);
    let frames = encode_message(&message("SER-PLUG-1"), 240, 1);
    assert!(astm_send(&mut dev, &frames).iter().all(|r| *r == ACK));
    dev.send(&[EOT]);

    // Unplugged in the middle of the next message: first frame sent and ACKed, then gone.
    dev.send(&[ENQ]);
    assert_eq!(dev.byte("ACK to ENQ"), ACK);
    let frames2 = encode_message(&message("SER-PLUG-2"), 240, 1);
    assert_eq!(astm_send(&mut dev, &frames2[..1]), vec![ACK]);
    dev.send(&frames2[1][..10]);
    drop(dev);
    pty.stop();
    wait_log(&d, "serial device lost; reopening", 1);

    // Replugged (same stable path): the feed resumes, and the device sends the message again.
    pty.start();
    wait_log(&d, "serial device open", 2);
    let mut dev = Device::open(&pty.device);
    dev.send(&[ENQ]);
    assert_eq!(dev.byte("ACK to ENQ"), ACK);
    assert!(astm_send(&mut dev, &frames2).iter().all(|r| *r == ACK));
    dev.send(&[EOT]);

    let got = bundles_by_control_id(&sub.take(2, Duration::from_secs(60)));
    assert_eq!(sub_topics(&got), vec!["SER-PLUG-1", "SER-PLUG-2"]);
    assert!(sub.drain_for(Duration::from_millis(500)).is_empty());
    let log = d.log_text();
    assert!(
        log.contains("line lost in the middle of a message"),
        "{log}"
    );
    // And it stops cleanly on SIGTERM while the serial feed is open.
    assert!(d.stop(), "clean exit:\n{}", d.log_text());
    assert!(d.log_text().contains("serial feed stopped"));
}

#[test]
fn astm_end_frame_is_naked_while_the_store_refuses_and_taken_on_the_resend_once_it_accepts() {
    // No broker yet: stored messages stay in the outbox. A 1 MiB outbox is filled over MLLP.
    let port = free_port();
    let url = format!("mqtt://127.0.0.1:{port}");
    let tmp = tempfile::tempdir().expect("tmp");
    let mut pty = Socat::new(tmp.path());
    pty.start();
    let d = Daemon::start_with_adapters(
        &url,
        "[outbox]\nmax_bytes = 1048576\n",
        &[(
            "analyser.toml",
            serial_adapter("analyser", &pty.appliance, "mode = \"astm\""),
        )],
    );
    wait_log(&d, "serial device open", 1);
    let mut mllp = MllpClient::connect(d.addr());
    // Big messages first, then smaller ones, until even one smaller than the serial message
    // is refused (AE).
    let mut filled = false;
    let mut i = 0;
    for pad in [60_000, 6_000, 600, 0] {
        loop {
            i += 1;
            assert!(i < 200, "the outbox never filled up");
            let mut m = String::from_utf8(message(&format!("F{i}"))).expect("UTF-8");
            if pad > 0 {
                m.push_str("NTE|1||");
                m.push_str(&"x".repeat(pad));
                m.push('\r');
            }
            let ack = mllp.send(m.as_bytes());
            if field(&ack, "MSA", 1) == "AE" {
                filled = pad == 0;
                break;
            }
            assert_eq!(field(&ack, "MSA", 1), "AA", "{ack}");
        }
    }
    assert!(filled, "the outbox never filled up");

    let mut dev = Device::open(&pty.device);
    dev.send(&[ENQ]);
    assert_eq!(dev.byte("ACK to ENQ"), ACK);
    let frames = encode_message(&message("SER-FULL-1"), 240, 1);
    let (last, first) = frames.split_last().expect("frames");
    assert!(astm_send(&mut dev, first).iter().all(|r| *r == ACK));
    // The end frame: the store refuses, so NAK; the device retransmits: NAK again.
    assert_eq!(astm_send(&mut dev, std::slice::from_ref(last)), vec![NAK]);
    assert_eq!(astm_send(&mut dev, std::slice::from_ref(last)), vec![NAK]);

    // The broker appears, the outbox drains, and the next retransmission is stored and ACKed.
    let broker = Broker::start_on(port);
    let sub = Subscriber::start(broker.port, "hl7-edge/test-edge/analyser/#");
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        dev.send(last);
        if dev.byte("a reply to the end frame") == ACK {
            break;
        }
        assert!(Instant::now() < end, "the end frame was never accepted");
        std::thread::sleep(Duration::from_millis(200));
    }
    dev.send(&[EOT]);
    let got = bundles_by_control_id(&sub.take(1, Duration::from_secs(60)));
    assert_eq!(got[0].0, "SER-FULL-1");
    assert!(d.log_text().contains("not stored: negative ACK"));
}
