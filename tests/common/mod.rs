//! Test harness: real parts only. A real mosquitto on a free loopback port, the real `hl7-edge`
//! binary with its own state directory, real TCP sockets, real MQTT subscribers.
//!
//! Every helper waits with a deadline and fails loudly; nothing sleeps blindly.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_hl7-edge");

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free loopback port")
}

/// Polls `f` until it returns Some or the deadline passes.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > end {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

pub fn wait_port(port: u16, timeout: Duration) {
    wait_for(&format!("port {port}"), timeout, || {
        TcpStream::connect(("127.0.0.1", port)).ok()
    });
}

fn find_mosquitto() -> PathBuf {
    for p in [
        "/usr/sbin/mosquitto",
        "/usr/bin/mosquitto",
        "/usr/local/sbin/mosquitto",
    ] {
        if Path::new(p).exists() {
            return PathBuf::from(p);
        }
    }
    panic!("mosquitto is not installed: run scripts/test.sh (it installs the test dependencies)");
}

/// A mosquitto broker for one test, killed on drop.
pub struct Broker {
    pub port: u16,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl Broker {
    pub fn start() -> Broker {
        Self::start_on(free_port())
    }

    pub fn start_on(port: u16) -> Broker {
        let dir = tempfile::tempdir().expect("tempdir");
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nlog_dest stderr\nlog_type error\nlog_type warning\n"
            ),
        )
        .expect("write mosquitto.conf");
        let mut b = Broker {
            port,
            child: None,
            dir,
        };
        b.spawn();
        b
    }

    fn spawn(&mut self) {
        let conf = self.dir.path().join("mosquitto.conf");
        let child = Command::new(find_mosquitto())
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start mosquitto");
        self.child = Some(child);
        wait_port(self.port, Duration::from_secs(10));
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `mosquitto_sub -v` on a topic filter; collects (topic, payload) lines.
pub struct Subscriber {
    child: Child,
    rx: mpsc::Receiver<(String, String)>,
}

impl Subscriber {
    /// Subscribes and returns only once the subscription is proven live: a probe message on a
    /// private topic is published until the subscriber sees it.
    pub fn start(port: u16, filter: &str) -> Subscriber {
        Self::start_args(port, filter, &[])
    }

    /// [`Subscriber::start`] with extra `mosquitto_sub` arguments.
    pub fn start_args(port: u16, filter: &str, extra: &[&str]) -> Subscriber {
        let probe = format!("hl7-edge-test-probe/{}", free_port());
        let mut child = Command::new("mosquitto_sub")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-t",
                filter,
                "-t",
                &probe,
                "-v",
                "-q",
                "1",
            ])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start mosquitto_sub (install mosquitto-clients)");
        let out = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        let (probe_tx, probe_rx) = mpsc::channel();
        let probe_topic = probe.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if let Some((t, p)) = line.split_once(' ') {
                    if t == probe_topic {
                        let _ = probe_tx.send(());
                    } else {
                        let _ = tx.send((t.to_string(), p.to_string()));
                    }
                }
            }
        });
        wait_for("the MQTT subscription", Duration::from_secs(15), || {
            let _ = Command::new("mosquitto_pub")
                .args([
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &port.to_string(),
                    "-t",
                    &probe,
                    "-m",
                    "probe",
                    "-q",
                    "1",
                ])
                .status();
            probe_rx.recv_timeout(Duration::from_millis(200)).ok()
        });
        Subscriber { child, rx }
    }

    /// Waits for `n` messages (or fails).
    pub fn take(&self, n: usize, timeout: Duration) -> Vec<(String, String)> {
        let end = Instant::now() + timeout;
        let mut got = Vec::new();
        while got.len() < n {
            let left = end.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(m) => got.push(m),
                Err(_) => panic!(
                    "expected {n} MQTT messages within {timeout:?}, got {}",
                    got.len()
                ),
            }
        }
        got
    }

    /// Messages that arrive within `d` (for "nothing more arrives" checks).
    pub fn drain_for(&self, d: Duration) -> Vec<(String, String)> {
        let end = Instant::now() + d;
        let mut got = Vec::new();
        while let Ok(m) = self
            .rx
            .recv_timeout(end.saturating_duration_since(Instant::now()))
        {
            got.push(m);
        }
        got
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The real daemon with its own state directory, stopped (SIGTERM) on drop.
pub struct Daemon {
    pub mllp_port: u16,
    pub dir: tempfile::TempDir,
    child: Option<Child>,
    pub log: PathBuf,
    extra_config: String,
    broker_url: String,
    /// Appended to the feed file before `[transport]` (feed-level keys).
    pub feed_extra: String,
    /// Appended to the feed's `[transport]` table (and may open sub-tables after it).
    pub transport_extra: String,
    /// Further adapter files (file name, TOML) beside the MLLP feed `pas`.
    extra_adapters: Vec<(String, String)>,
}

impl Daemon {
    pub fn start(broker_url: &str) -> Daemon {
        Self::start_with(broker_url, "")
    }

    /// `extra_config` is appended to the generated config file (TOML).
    pub fn start_with(broker_url: &str, extra_config: &str) -> Daemon {
        Self::start_full(broker_url, extra_config, "", "", &[])
    }

    /// Like [`Self::start_with`], with extra feed-level keys (`feed_extra`, e.g.
    /// `ack_after = "mapping"` or a `[duplicates]` table... placed before `[transport]`) and
    /// extra `[transport]` keys (`transport_extra`, e.g. `allow = [...]` or `[transport.tls]`).
    pub fn start_feed(
        broker_url: &str,
        extra_config: &str,
        feed_extra: &str,
        transport_extra: &str,
    ) -> Daemon {
        Self::start_full(broker_url, extra_config, feed_extra, transport_extra, &[])
    }

    /// Also writes `adapters` (file name, TOML text) into the adapters folder; the daemon is
    /// ready once its MLLP feed `pas` listens (other feeds may still be starting).
    pub fn start_with_adapters(
        broker_url: &str,
        extra_config: &str,
        adapters: &[(&str, String)],
    ) -> Daemon {
        Self::start_full(broker_url, extra_config, "", "", adapters)
    }

    /// Every option of the constructors above.
    pub fn start_full(
        broker_url: &str,
        extra_config: &str,
        feed_extra: &str,
        transport_extra: &str,
        adapters: &[(&str, String)],
    ) -> Daemon {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut d = Daemon {
            mllp_port: free_port(),
            dir,
            child: None,
            log: PathBuf::new(),
            extra_config: extra_config.to_string(),
            broker_url: broker_url.to_string(),
            feed_extra: feed_extra.to_string(),
            transport_extra: transport_extra.to_string(),
            extra_adapters: adapters
                .iter()
                .map(|(n, t)| (n.to_string(), t.clone()))
                .collect(),
        };
        d.write_config();
        d.spawn();
        d
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("hl7-edge.toml")
    }

    /// Writes the configuration and the feed files (again, after a change to `feed_extra`).
    pub fn write_config(&self) {
        let adapters = self.dir.path().join("adapters");
        std::fs::create_dir_all(&adapters).expect("adapters dir");
        // 64 KiB frames unless the test sets its own limit.
        let max_frame = if self.transport_extra.contains("max_frame_bytes") {
            ""
        } else {
            "max_frame_bytes = 65536\n"
        };
        std::fs::write(
            adapters.join("pas.toml"),
            format!(
                "name = \"pas\"\ncharset_fallback = \"windows-1252\"\n{}\n[transport]\nkind = \"mllp\"\nbind = \"127.0.0.1:{}\"\n{max_frame}{}\n",
                self.feed_extra, self.mllp_port, self.transport_extra
            ),
        )
        .expect("write adapter");
        for (name, text) in &self.extra_adapters {
            std::fs::write(adapters.join(name), text).expect("write extra adapter");
        }
        let config = format!(
            "state_dir = {:?}\nadapters_dir = {:?}\n\n[site]\nods_code = \"RRV\"\nappliance_id = \"test-edge\"\n\n[mqtt]\nurl = {:?}\nclient_id = \"hl7-edge-test-{}\"\n{}\n",
            self.state_dir().display().to_string(),
            adapters.display().to_string(),
            self.broker_url,
            self.mllp_port,
            self.extra_config
        );
        std::fs::write(self.config_path(), config).expect("write config");
    }

    fn spawn(&mut self) {
        let n = std::fs::read_dir(self.dir.path())
            .map(|d| d.count())
            .unwrap_or(0);
        self.log = self.dir.path().join(format!("daemon-{n}.log"));
        let log = std::fs::File::create(&self.log).expect("log file");
        let child = Command::new(BIN)
            .args(["run", "--config"])
            .arg(self.config_path())
            .env("RUST_LOG", "info")
            .env_remove("HL7EDGE_MQTT__URL")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start hl7-edge");
        self.child = Some(child);
        let port = self.mllp_port;
        let log = self.log.clone();
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                panic!(
                    "hl7-edge exited ({status}) before listening:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            if Instant::now() > end {
                panic!("hl7-edge did not listen on {port}");
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.mllp_port))
    }

    /// SIGTERM and wait; returns the exit status success.
    pub fn stop(&mut self) -> bool {
        let Some(mut c) = self.child.take() else {
            return true;
        };
        unsafe_sigterm(c.id());
        let end = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(s)) = c.try_wait() {
                return s.success();
            }
            if Instant::now() > end {
                let _ = c.kill();
                let _ = c.wait();
                return false;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// SIGKILL: a crash, as far as the daemon can tell.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The daemon's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Sends SIGTERM without waiting (see [`Self::wait_exit`]).
    pub fn sigterm(&self) {
        if let Some(c) = self.child.as_ref() {
            unsafe_sigterm(c.id());
        }
    }

    /// Waits for the process to exit after [`Self::sigterm`]; returns (success, time waited).
    pub fn wait_exit(&mut self, timeout: Duration) -> (bool, Duration) {
        let start = Instant::now();
        let Some(mut c) = self.child.take() else {
            return (true, Duration::ZERO);
        };
        loop {
            if let Ok(Some(s)) = c.try_wait() {
                return (s.success(), start.elapsed());
            }
            if start.elapsed() > timeout {
                let _ = c.kill();
                let _ = c.wait();
                return (false, start.elapsed());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Starts the daemon again (after a stop) with the same state and configuration.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "the daemon is still running");
        self.spawn();
    }

    /// Control ids of every record in the outbox (any state, delivered ones included), in id
    /// order. The daemon must be stopped (redb holds a lock).
    pub fn stored_control_ids(&self) -> Vec<String> {
        use hl7_edge::outbox::{ListFilter, Outbox, OutboxLimits};
        let ob = Outbox::open(
            &self.state_dir().join("outbox.redb"),
            OutboxLimits::default(),
        )
        .expect("open the outbox (is the daemon stopped?)");
        let mut out = Vec::new();
        let mut after = None;
        loop {
            let page = ob
                .list(&ListFilter {
                    after,
                    limit: 1000,
                    ..ListFilter::default()
                })
                .expect("list outbox");
            let Some(last) = page.last() else { break };
            after = Some(last.id);
            out.extend(page.into_iter().map(|m| m.control_id));
        }
        out
    }
}

fn unsafe_sigterm(pid: u32) {
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A minimal, strict MLLP client: one connection, one message at a time.
pub struct MllpClient {
    stream: TcpStream,
}

impl MllpClient {
    pub fn connect(addr: SocketAddr) -> MllpClient {
        let stream = TcpStream::connect(addr).expect("connect to MLLP port");
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        MllpClient { stream }
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("write");
    }

    /// Sends one framed message and returns the ACK text (framing removed).
    pub fn send(&mut self, msg: &[u8]) -> String {
        let mut framed = vec![0x0b];
        framed.extend_from_slice(msg);
        framed.extend_from_slice(&[0x1c, 0x0d]);
        self.send_raw(&framed);
        self.read_ack()
    }

    /// Connects with a short read timeout, for tests that expect the server to close or stay
    /// silent.
    pub fn connect_with_timeout(addr: SocketAddr, timeout: Duration) -> MllpClient {
        let stream = TcpStream::connect(addr).expect("connect to MLLP port");
        stream.set_read_timeout(Some(timeout)).expect("timeout");
        MllpClient { stream }
    }

    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }

    /// Reads until the server closes the connection (or the read timeout); returns what came.
    pub fn read_to_close(&mut self) -> Result<Vec<u8>, std::io::Error> {
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match self.stream.read(&mut buf) {
                Ok(0) => return Ok(out),
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(e) => return Err(e),
            }
        }
    }

    /// Raw ACK bytes (framing removed), for charset checks.
    pub fn read_ack_bytes(&mut self) -> Vec<u8> {
        let mut buf = Vec::new();
        let mut byte = [0u8; 1];
        loop {
            match self.stream.read(&mut byte) {
                Ok(0) => panic!("connection closed before a complete ACK: {buf:?}"),
                Ok(_) => {
                    buf.push(byte[0]);
                    if buf.ends_with(&[0x1c, 0x0d]) {
                        break;
                    }
                }
                Err(e) => panic!("no ACK: {e} (got {buf:?})"),
            }
        }
        let start = buf.iter().position(|b| *b == 0x0b).expect("start block");
        buf[start + 1..buf.len() - 2].to_vec()
    }

    pub fn read_ack(&mut self) -> String {
        let mut buf = Vec::new();
        let mut byte = [0u8; 1];
        loop {
            match self.stream.read(&mut byte) {
                Ok(0) => panic!(
                    "connection closed before a complete ACK: {:?}",
                    String::from_utf8_lossy(&buf)
                ),
                Ok(_) => {
                    buf.push(byte[0]);
                    if buf.ends_with(&[0x1c, 0x0d]) {
                        break;
                    }
                }
                Err(e) => panic!("no ACK: {e} (got {:?})", String::from_utf8_lossy(&buf)),
            }
        }
        let start = buf
            .iter()
            .position(|b| *b == 0x0b)
            .expect("ACK without start block");
        String::from_utf8_lossy(&buf[start + 1..buf.len() - 2]).into_owned()
    }
}

/// Every segment named `seg` in an ACK (or batch ACK), split on `|`.
pub fn segments<'a>(ack: &'a str, seg: &str) -> Vec<Vec<&'a str>> {
    ack.split('\r')
        .map(|s| s.split('|').collect::<Vec<_>>())
        .filter(|p| p.first() == Some(&seg))
        .collect()
}

/// Field `n` (HL7 numbering) of the first segment named `seg` in an ACK.
pub fn field(ack: &str, seg: &str, n: usize) -> String {
    for s in ack.split('\r') {
        let parts: Vec<&str> = s.split('|').collect();
        if parts.first() == Some(&seg) {
            let idx = if seg == "MSH" { n - 1 } else { n };
            return parts.get(idx).unwrap_or(&"").to_string();
        }
    }
    String::new()
}

pub fn fixture(name: &str) -> Vec<u8> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("fixture {}: {e}", p.display()))
}

/// The shared corpus, beside the clone (CI has it there).
pub fn corpus_dir() -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/corpus");
    p.is_dir().then_some(p)
}

/// The python venv that scripts/test.sh prepares (python-hl7's `mllp_send`).
pub fn venv_bin(name: &str) -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target/test-venv/bin")
        .join(name);
    p.exists().then_some(p)
}

/// Validates Bundles with the independent Python validator (fhir.resources 6.4.0, FHIR R4).
/// Panics with every failure.
pub fn assert_valid_fhir(bundles: &[serde_json::Value]) {
    let python = venv_bin("python")
        .expect("the test venv is missing: run scripts/test.sh, which installs fhir.resources");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/validate_fhir.py");
    let mut child = Command::new(python)
        .arg(script)
        .arg("-")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run validate_fhir.py");
    {
        let mut stdin = child.stdin.take().expect("stdin");
        for b in bundles {
            writeln!(stdin, "{b}").expect("write bundle");
        }
    }
    let out = child.wait_with_output().expect("validator output");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "independent FHIR R4 validation failed:\n{text}"
    );
    assert_eq!(
        text.lines().filter(|l| l.starts_with("ok ")).count(),
        bundles.len(),
        "{text}"
    );
}

// ---------------------------------------------------------------------------------------------
// Helpers for the store-and-forward tests (issue 7)
// ---------------------------------------------------------------------------------------------

/// A mosquitto with extra configuration lines and, optionally, persistence (so a graceful
/// restart keeps persistent subscriber sessions and the messages queued for them).
pub struct ConfBroker {
    pub port: u16,
    child: Option<Child>,
    pub dir: tempfile::TempDir,
}

impl ConfBroker {
    /// `conf` is the whole listener section(s); `{port}` and `{dir}` are substituted.
    pub fn start(conf: &str, persistent: bool) -> ConfBroker {
        Self::start_on(free_port(), conf, persistent)
    }

    pub fn start_on(port: u16, conf: &str, persistent: bool) -> ConfBroker {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path().display().to_string();
        let mut text = conf
            .replace("{port}", &port.to_string())
            .replace("{dir}", &d);
        if persistent {
            text.push_str(&format!(
                "\npersistence true\npersistence_location {d}/\nmax_queued_messages 1000000\n"
            ));
        } else {
            text.push_str("\npersistence false\n");
        }
        // mosquitto started as root switches to the `mosquitto` user, which cannot write the
        // test's temporary directory (persistence, log): stay root there.
        text.push_str(&format!(
            "log_dest file {d}/mosquitto.log\nlog_type all\nuser root\n"
        ));
        std::fs::write(dir.path().join("mosquitto.conf"), text).expect("write mosquitto.conf");
        let mut b = ConfBroker {
            port,
            child: None,
            dir,
        };
        b.spawn();
        b
    }

    /// The plain listener section most tests need.
    pub fn plain() -> &'static str {
        "listener {port} 127.0.0.1\nallow_anonymous true\n"
    }

    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "broker already running");
        let child = Command::new(find_mosquitto())
            .arg("-c")
            .arg(self.dir.path().join("mosquitto.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start mosquitto");
        self.child = Some(child);
        wait_port(self.port, Duration::from_secs(10));
    }

    /// SIGTERM (mosquitto saves its persistence file), then wait.
    pub fn stop_graceful(&mut self) {
        if let Some(mut c) = self.child.take() {
            unsafe_sigterm(c.id());
            let end = Instant::now() + Duration::from_secs(10);
            while !matches!(c.try_wait(), Ok(Some(_))) {
                if Instant::now() > end {
                    let _ = c.kill();
                    let _ = c.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("mosquitto.log")).unwrap_or_default()
    }
}

impl Drop for ConfBroker {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// One message as an MQTT 5 subscriber sees it.
#[derive(Clone, Debug)]
pub struct Msg5 {
    pub topic: String,
    pub payload: String,
    pub retain: bool,
    pub content_type: Option<String>,
    pub user_properties: Vec<(String, String)>,
}

impl Msg5 {
    pub fn prop(&self, key: &str) -> Option<&str> {
        self.user_properties
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// An MQTT 5 subscriber (rumqttc, QoS 1) with a persistent session: it reconnects on its own,
/// and the broker queues for it while it is away (across a graceful restart of a persistent
/// broker). Returns once the broker has acknowledged the subscription.
pub struct Sub5 {
    rx: mpsc::Receiver<Msg5>,
    /// Everything received so far (each `until` sees all of it).
    got: std::cell::RefCell<Vec<Msg5>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Sub5 {
    pub fn start(port: u16, filters: &[&str]) -> Sub5 {
        use rumqttc::v5::mqttbytes::QoS;
        use rumqttc::v5::mqttbytes::v5::Packet;
        use rumqttc::v5::{Client, Event, MqttOptions};
        let id = format!("test-sub5-{}", free_port());
        let mut opts = MqttOptions::new(id, "127.0.0.1", port);
        opts.set_clean_start(false);
        opts.set_session_expiry_interval(Some(3600));
        opts.set_keep_alive(Duration::from_secs(5));
        let (client, mut connection) = Client::new(opts, 100);
        for f in filters {
            client
                .subscribe(*f, QoS::AtLeastOnce)
                .expect("queue subscribe");
        }
        let (tx, rx) = mpsc::channel();
        let (subscribed_tx, subscribed_rx) = mpsc::channel();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop2 = stop.clone();
        std::thread::spawn(move || {
            let _client = client;
            for ev in connection.iter() {
                if stop2.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                match ev {
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = subscribed_tx.send(());
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let props = p.properties.clone().unwrap_or_default();
                        let _ = tx.send(Msg5 {
                            topic: String::from_utf8_lossy(&p.topic).into_owned(),
                            payload: String::from_utf8_lossy(&p.payload).into_owned(),
                            retain: p.retain,
                            content_type: props.content_type,
                            user_properties: props.user_properties,
                        });
                    }
                    Ok(_) => {}
                    Err(_) => std::thread::sleep(Duration::from_millis(100)),
                }
            }
        });
        for _ in filters {
            subscribed_rx
                .recv_timeout(Duration::from_secs(15))
                .expect("SUBACK from the broker");
        }
        Sub5 {
            rx,
            got: Default::default(),
            stop,
        }
    }

    /// Waits until `done(every message received since start)` holds (or fails), returning
    /// them all.
    pub fn until(
        &self,
        what: &str,
        timeout: Duration,
        done: impl Fn(&[Msg5]) -> bool,
    ) -> Vec<Msg5> {
        let end = Instant::now() + timeout;
        let mut got = self.got.borrow_mut();
        loop {
            while let Ok(m) = self.rx.try_recv() {
                got.push(m);
            }
            if done(&got) {
                return got.clone();
            }
            let left = end.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "timed out after {timeout:?} waiting for {what} ({} messages so far)",
                got.len()
            );
            if let Ok(m) = self.rx.recv_timeout(left.min(Duration::from_millis(200))) {
                got.push(m);
            }
        }
    }
}

impl Drop for Sub5 {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Daemon {
    /// Runs `hl7-edge <args> --config <this daemon's config>`.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(BIN)
            .args(args)
            .arg("--config")
            .arg(self.config_path())
            .env_remove("HL7EDGE_MQTT__URL")
            .output()
            .expect("run hl7-edge")
    }

    /// Waits until the daemon's log contains `needle`.
    /// The first complete log line containing `needle`, once there is one.
    pub fn wait_log_line(&self, needle: &str, timeout: Duration) -> String {
        wait_for(&format!("{needle:?} in the daemon log"), timeout, || {
            let t = self.log_text();
            t.split_inclusive('\n')
                .find(|l| l.ends_with('\n') && l.contains(needle))
                .map(str::to_owned)
        })
    }

    pub fn wait_log(&self, needle: &str, timeout: Duration) -> String {
        wait_for(&format!("{needle:?} in the daemon log"), timeout, || {
            let t = self.log_text();
            t.contains(needle).then_some(t)
        })
    }
}

impl MllpClient {
    /// Like [`MllpClient::connect`] but returns the error.
    pub fn try_connect(addr: SocketAddr) -> std::io::Result<MllpClient> {
        let stream = TcpStream::connect(addr)?;
        stream.set_read_timeout(Some(Duration::from_secs(20)))?;
        Ok(MllpClient { stream })
    }

    /// Sends one message; an I/O error (daemon killed) is returned, not a panic.
    pub fn try_send(&mut self, msg: &[u8]) -> std::io::Result<String> {
        let mut framed = vec![0x0b];
        framed.extend_from_slice(msg);
        framed.extend_from_slice(&[0x1c, 0x0d]);
        self.stream.write_all(&framed)?;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let n = self.stream.read(&mut chunk)?;
            if n == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "connection closed before the ACK",
                ));
            }
            buf.extend_from_slice(&chunk[..n]);
            if buf.ends_with(&[0x1c, 0x0d]) {
                break;
            }
        }
        let start = buf.iter().position(|b| *b == 0x0b).unwrap_or(0);
        Ok(String::from_utf8_lossy(&buf[start + 1..buf.len() - 2]).into_owned())
    }
}

/// A fixture with its MSH-10 (`MSG00001`, ...) replaced by `control_id`.
pub fn with_control_id(fixture_bytes: &[u8], control_id: &str) -> Vec<u8> {
    let text = String::from_utf8_lossy(fixture_bytes);
    let msh = text.split('\r').next().unwrap_or_default();
    let old = msh
        .split('|')
        .nth(9)
        .expect("fixture has MSH-10")
        .to_string();
    let new_msh = msh.replacen(&format!("|{old}|"), &format!("|{control_id}|"), 1);
    text.replacen(msh, &new_msh, 1).into_bytes()
}

/// A fixture (UTF-8, segments separated by CR or LF) with fields of the first `segment` set:
/// `(field number, new value)`, counted as HL7 counts them for non-MSH segments (`PID-19` is 19).
/// The segment is padded with empty fields as needed; segments come back CR-terminated.
pub fn with_fields(fixture_bytes: &[u8], segment: &str, fields: &[(usize, &str)]) -> Vec<u8> {
    let text = String::from_utf8(fixture_bytes.to_vec()).expect("UTF-8 fixture");
    let mut done = false;
    let mut out = Vec::new();
    for seg in text.split(['\r', '\n']).filter(|s| !s.is_empty()) {
        let mut line = seg.to_string();
        if !done && seg.split('|').next() == Some(segment) {
            let mut f: Vec<String> = seg.split('|').map(str::to_string).collect();
            for (n, value) in fields {
                if f.len() <= *n {
                    f.resize(n + 1, String::new());
                }
                f[*n] = (*value).to_string();
            }
            line = f.join("|");
            done = true;
        }
        out.extend_from_slice(line.as_bytes());
        out.push(b'\r');
    }
    assert!(done, "the fixture has no {segment} segment");
    out
}

/// The first resource of type `rtype` in a Bundle (panics if there is none).
pub fn resource<'a>(bundle: &'a serde_json::Value, rtype: &str) -> &'a serde_json::Value {
    bundle["entry"]
        .as_array()
        .expect("entry array")
        .iter()
        .map(|e| &e["resource"])
        .find(|r| r["resourceType"] == rtype)
        .unwrap_or_else(|| panic!("no {rtype} in bundle"))
}

/// `Bundle.identifier.value` of an MQTT payload.
pub fn bundle_id(payload: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(payload).expect("payload is JSON");
    v["identifier"]["value"]
        .as_str()
        .expect("Bundle.identifier.value")
        .to_string()
}

/// Checks every id in `acked` arrived, and that for each sender (ids `<sender>-<seq>`) the
/// first appearances are in sending order. Returns (distinct ids seen, duplicates).
pub fn check_arrivals<'a>(
    payloads: impl IntoIterator<Item = &'a str>,
    acked: &[String],
) -> (usize, usize) {
    let mut first: Vec<String> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut dups = 0;
    for p in payloads {
        let id = bundle_id(p);
        if seen.insert(id.clone()) {
            first.push(id);
        } else {
            dups += 1;
        }
    }
    for id in acked {
        assert!(seen.contains(id), "{id} got AA but never arrived");
    }
    let mut last: std::collections::HashMap<String, u64> = std::collections::HashMap::new();
    for id in &first {
        let (sender, seq) = id.rsplit_once('-').expect("id is <sender>-<seq>");
        let seq: u64 = seq.parse().expect("numeric sequence");
        if let Some(prev) = last.insert(sender.to_string(), seq) {
            assert!(
                seq > prev,
                "order broken for sender {sender}: {seq} first seen after {prev}"
            );
        }
    }
    (first.len(), dups)
}
