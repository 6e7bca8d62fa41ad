//! Outbox + MQTT forwarder against a REAL mosquitto on a free loopback port.
//!
//! Every wait polls with a deadline and fails loudly; nothing sleeps blindly. The broker is
//! killed by a Drop guard even when an assertion fails.

use std::collections::HashMap;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hl7_edge::forward::{Forwarder, MqttConfig};
use hl7_edge::outbox::{
    NewRecord, Outbox, OutboxLimits, RecordId, RecordState, Writer, WriterHandle,
};
use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, QoS};
use tokio::sync::{mpsc, watch};

const SITE: &str = "test-site";
const DEADLINE: Duration = Duration::from_secs(30);

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free loopback port")
}

fn mosquitto_bin() -> PathBuf {
    [
        "/usr/sbin/mosquitto",
        "/usr/bin/mosquitto",
        "/usr/local/sbin/mosquitto",
    ]
    .into_iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
    .expect("mosquitto is not installed")
}

/// A running mosquitto; killed on drop. Persistence is on so that a restart keeps the test
/// subscriber's session (and the messages queued for it).
struct Broker {
    child: Option<Child>,
    port: u16,
    conf: PathBuf,
}

impl Broker {
    fn conf(dir: &Path, port: u16) -> PathBuf {
        let conf = dir.join("mosquitto.conf");
        let body = format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\n\
             persistence_location {}/\nlog_dest file {}\nuser root\nmax_queued_messages 100000\n",
            dir.display(),
            dir.join("mosquitto.log").display()
        );
        std::fs::write(&conf, body).expect("write mosquitto.conf");
        conf
    }

    async fn start(dir: &Path, port: u16) -> Broker {
        let conf = Broker::conf(dir, port);
        let mut broker = Broker {
            child: None,
            port,
            conf,
        };
        broker.restart().await;
        broker
    }

    async fn restart(&mut self) {
        assert!(self.child.is_none(), "broker already running");
        let child = Command::new(mosquitto_bin())
            .arg("-c")
            .arg(&self.conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start mosquitto");
        self.child = Some(child);
        let port = self.port;
        wait_for("mosquitto to listen", || async move {
            TcpStream::connect(("127.0.0.1", port)).ok().map(drop)
        })
        .await;
    }

    /// Stops the broker gracefully (SIGTERM, so it saves its persistence file).
    async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status();
            let end = Instant::now() + Duration::from_secs(10);
            loop {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                if Instant::now() > end {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

async fn wait_for<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let end = Instant::now() + DEADLINE;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            Instant::now() < end,
            "timed out after {DEADLINE:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A subscriber on `hl7-edge/#` (QoS 1, persistent session), feeding (topic, payload) into a
/// channel. Returns once the broker has acknowledged the subscription.
struct Subscriber {
    rx: mpsc::UnboundedReceiver<(String, String)>,
    task: tokio::task::JoinHandle<()>,
}

impl Subscriber {
    async fn connect(port: u16) -> Subscriber {
        let mut opts = MqttOptions::new("outbox-forward-test-sub", "127.0.0.1", port);
        opts.set_clean_session(false);
        opts.set_keep_alive(Duration::from_secs(5));
        let (client, mut eventloop) = AsyncClient::new(opts, 10);
        client
            .subscribe("hl7-edge/#", QoS::AtLeastOnce)
            .await
            .expect("queue subscribe");
        let (tx, rx) = mpsc::unbounded_channel();
        let (subscribed_tx, mut subscribed_rx) = watch::channel(false);
        let task = tokio::spawn(async move {
            let _client = client;
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Incoming::SubAck(_))) => {
                        let _ = subscribed_tx.send(true);
                    }
                    Ok(Event::Incoming(Incoming::Publish(p))) => {
                        let payload = String::from_utf8_lossy(&p.payload).into_owned();
                        let _ = tx.send((p.topic.clone(), payload));
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        tokio::time::timeout(DEADLINE, subscribed_rx.wait_for(|s| *s))
            .await
            .expect("timed out waiting for SUBACK")
            .expect("subscriber task died");
        Subscriber { rx, task }
    }

    fn drain(&mut self, into: &mut Vec<(String, String)>) {
        while let Ok(m) = self.rx.try_recv() {
            into.push(m);
        }
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads one MQTT packet: (type nibble, body).
async fn read_packet(conn: &mut tokio::net::TcpStream) -> std::io::Result<(u8, Vec<u8>)> {
    use tokio::io::AsyncReadExt;
    let first = conn.read_u8().await?;
    let mut len = 0usize;
    for shift in [0, 7, 14, 21] {
        let b = conn.read_u8().await?;
        len |= usize::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            break;
        }
    }
    let mut body = vec![0; len];
    conn.read_exact(&mut body).await?;
    Ok((first >> 4, body))
}

async fn fake_broker_swallowing_publishes(port: u16) {
    use tokio::io::AsyncWriteExt;
    let fake = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .expect("bind the broker's port");
    let (mut conn, _) = tokio::time::timeout(DEADLINE, fake.accept())
        .await
        .expect("forwarder retries while the broker is down")
        .expect("accept");
    let (kind, body) = read_packet(&mut conn).await.expect("read CONNECT");
    assert_eq!(kind, 1, "first packet is CONNECT");
    // Protocol level after the protocol name "MQTT": 5 or 4 (3.1.1).
    let connack: &[u8] = if body.get(6) == Some(&5) {
        &[0x20, 0x03, 0x00, 0x00, 0x00]
    } else {
        &[0x20, 0x02, 0x00, 0x00]
    };
    conn.write_all(connack).await.expect("write CONNACK");
    loop {
        let (kind, _) = tokio::time::timeout(DEADLINE, read_packet(&mut conn))
            .await
            .expect("a PUBLISH after CONNACK")
            .expect("read packet");
        if kind == 3 {
            break;
        }
    }
}

fn bundle(feed: &str, n: usize) -> Vec<u8> {
    format!(r#"{{"resourceType":"Bundle","identifier":{{"value":"{feed}-{n:04}"}}}}"#).into_bytes()
}

fn new_record(feed: &str, n: usize) -> NewRecord {
    NewRecord {
        feed: feed.into(),
        control_id: format!("{feed}-{n}"),
        message_type: if feed == "lab" { "ORU_R01" } else { "ADT_A01" }.into(),
        raw: format!("MSH|^~\\&|X|Y|||20240101||ADT^A01|{feed}-{n}|P|2.5\r").into_bytes(),
        received_at_ms: 1_700_000_000_000,
    }
}

fn mqtt_cfg(port: u16) -> MqttConfig {
    MqttConfig {
        url: format!("mqtt://127.0.0.1:{port}"),
        client_id: Some(format!("hl7-edge-test-{port}")),
        site: Some(SITE.into()),
        max_inflight: 8,
        reconnect_initial_ms: 100,
        reconnect_max_secs: 1,
        shutdown_grace_secs: 5,
        ..MqttConfig::default()
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    outbox: Outbox,
    writer: WriterHandle,
    ids: HashMap<String, Vec<RecordId>>,
}

async fn fixture(dir: tempfile::TempDir) -> Fixture {
    let outbox = Outbox::open(&dir.path().join("outbox.redb"), OutboxLimits::default())
        .expect("open outbox");
    let writer = Writer::spawn(outbox.clone()).expect("writer");
    Fixture {
        _dir: dir,
        outbox,
        writer,
        ids: HashMap::new(),
    }
}

impl Fixture {
    /// Inserts `n` records per feed, interleaved, and sets them Ready except those in `hold`.
    async fn load(&mut self, feeds: &[&str], n: usize, hold: &[(&str, usize)]) {
        for i in 0..n {
            for feed in feeds {
                let id = self
                    .writer
                    .insert(new_record(feed, i))
                    .await
                    .expect("insert");
                if !hold.contains(&(*feed, i)) {
                    self.writer
                        .set_ready(id, bundle(feed, i))
                        .await
                        .expect("set ready");
                }
                self.ids.entry(feed.to_string()).or_default().push(id);
            }
        }
    }

    fn state(&self, id: RecordId) -> RecordState {
        self.outbox
            .get_meta(id)
            .expect("read meta")
            .expect("record exists")
            .state
    }

    fn all_delivered(&self, feed: &str, range: std::ops::Range<usize>) -> bool {
        self.ids[feed][range]
            .iter()
            .all(|id| self.state(*id) == RecordState::Delivered)
    }
}

/// The order in which each feed's identifiers were *first* seen (duplicates are at-least-once
/// redeliveries), checking the topic of every message.
fn first_seen(msgs: &[(String, String)]) -> HashMap<String, Vec<String>> {
    let mut out: HashMap<String, Vec<String>> = HashMap::new();
    for (topic, payload) in msgs {
        let levels: Vec<&str> = topic.split('/').collect();
        assert_eq!(levels.len(), 4, "topic {topic}");
        assert_eq!((levels[0], levels[1]), ("hl7-edge", SITE), "topic {topic}");
        let feed = levels[2];
        let expect_type = if feed == "lab" { "ORU_R01" } else { "ADT_A01" };
        assert_eq!(levels[3], expect_type, "topic {topic}");
        let ident = payload
            .split("\"value\":\"")
            .nth(1)
            .and_then(|s| s.split('"').next())
            .unwrap_or_else(|| panic!("payload without identifier: {payload}"))
            .to_string();
        assert!(ident.starts_with(feed), "{ident} published on {topic}");
        let seen = out.entry(feed.to_string()).or_default();
        if !seen.contains(&ident) {
            seen.push(ident);
        }
    }
    out
}

fn expected(feed: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{feed}-{i:04}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_every_record_in_order_per_feed_and_marks_delivered() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let _broker = Broker::start(dir.path(), port).await;
    let mut sub = Subscriber::connect(port).await;

    let mut fx = fixture(tempfile::tempdir().expect("tempdir")).await;
    const N: usize = 40;
    // adt #10 is still being mapped: adt must stop there, lab must not care.
    fx.load(&["adt", "lab"], N, &[("adt", 10)]).await;

    let (stop_tx, stop_rx) = watch::channel(false);
    let task = Forwarder::spawn(
        mqtt_cfg(port),
        fx.outbox.clone(),
        fx.writer.clone(),
        vec!["adt".into(), "lab".into()],
        stop_rx,
    )
    .expect("spawn forwarder");

    let mut msgs = Vec::new();
    wait_for(
        "lab fully delivered and adt delivered up to the held record",
        || {
            sub.drain(&mut msgs);
            let ok = fx.all_delivered("lab", 0..N) && fx.all_delivered("adt", 0..10);
            async move { ok.then_some(()) }
        },
    )
    .await;
    // The held record blocks its feed: nothing after it may have gone out.
    assert_eq!(fx.state(fx.ids["adt"][10]), RecordState::Received);
    for id in &fx.ids["adt"][11..] {
        assert_eq!(
            fx.state(*id),
            RecordState::Ready,
            "adt record {id} overtook the head"
        );
    }

    // Mapping finishes: the change notification wakes the publisher.
    fx.writer
        .set_ready(fx.ids["adt"][10], bundle("adt", 10))
        .await
        .expect("set ready");
    wait_for("all adt delivered", || {
        let ok = fx.all_delivered("adt", 0..N);
        async move { ok.then_some(()) }
    })
    .await;
    wait_for("all messages at the subscriber", || {
        sub.drain(&mut msgs);
        let n = msgs.len();
        async move { (n >= 2 * N).then_some(()) }
    })
    .await;

    let seen = first_seen(&msgs);
    assert_eq!(seen["adt"], expected("adt", N));
    assert_eq!(seen["lab"], expected("lab", N));
    assert_eq!(msgs.len(), 2 * N, "no duplicates on a healthy connection");
    let stats = fx.outbox.stats().expect("stats");
    assert_eq!((stats.ready, stats.received, stats.bytes), (0, 0, 0));
    assert_eq!(stats.delivered_total, 2 * N as u64);

    stop_tx.send(true).expect("signal shutdown");
    tokio::time::timeout(DEADLINE, task)
        .await
        .expect("forwarder stops on shutdown")
        .expect("forwarder task");
    fx.writer.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_down_at_start_then_restarted_mid_stream_loses_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();

    // Register the subscriber's persistent session, then take the broker down.
    let mut broker = Broker::start(dir.path(), port).await;
    drop(Subscriber::connect(port).await);
    broker.stop().await;

    let mut fx = fixture(tempfile::tempdir().expect("tempdir")).await;
    const N: usize = 30;
    fx.load(&["adt", "lab"], N, &[]).await;

    let (stop_tx, stop_rx) = watch::channel(false);
    let task = Forwarder::spawn(
        mqtt_cfg(port),
        fx.outbox.clone(),
        fx.writer.clone(),
        vec!["adt".into(), "lab".into()],
        stop_rx,
    )
    .expect("spawn forwarder");

    // Broker down: the forwarder keeps trying. We stand in for the broker once: accept its
    // CONNECT, answer CONNACK, take its first PUBLISH and hang up without any PUBACK. Those
    // in-flight records must be republished to the real broker later, not forgotten.
    fake_broker_swallowing_publishes(port).await;
    assert_eq!(fx.outbox.stats().expect("stats").ready, 2 * N as u64);

    broker.restart().await;
    wait_for("first batch delivered after the broker came up", || {
        let ok = fx.all_delivered("adt", 0..N) && fx.all_delivered("lab", 0..N);
        async move { ok.then_some(()) }
    })
    .await;

    // Second outage while more records arrive.
    broker.stop().await;
    for i in N..2 * N {
        for feed in ["adt", "lab"] {
            let id = fx.writer.insert(new_record(feed, i)).await.expect("insert");
            fx.writer
                .set_ready(id, bundle(feed, i))
                .await
                .expect("ready");
            fx.ids.get_mut(feed).expect("feed").push(id);
        }
    }
    assert!(!fx.all_delivered("adt", N..2 * N));
    broker.restart().await;
    wait_for("second batch delivered after the restart", || {
        let ok = fx.all_delivered("adt", 0..2 * N) && fx.all_delivered("lab", 0..2 * N);
        async move { ok.then_some(()) }
    })
    .await;

    // The subscriber's session queued everything while it was away.
    let mut sub = Subscriber::connect(port).await;
    let mut msgs = Vec::new();
    wait_for("every identifier at the subscriber", || {
        sub.drain(&mut msgs);
        let seen = first_seen(&msgs);
        let done = seen.get("adt").map_or(0, Vec::len) == 2 * N
            && seen.get("lab").map_or(0, Vec::len) == 2 * N;
        async move { done.then_some(()) }
    })
    .await;
    let seen = first_seen(&msgs);
    assert_eq!(seen["adt"], expected("adt", 2 * N));
    assert_eq!(seen["lab"], expected("lab", 2 * N));
    assert_eq!(fx.outbox.stats().expect("stats").bytes, 0);

    stop_tx.send(true).expect("signal shutdown");
    tokio::time::timeout(DEADLINE, task)
        .await
        .expect("forwarder stops on shutdown")
        .expect("forwarder task");
    fx.writer.shutdown().await;
}
