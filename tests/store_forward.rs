//! Store-and-forward proofs on real parts: mosquitto, the hl7-edge binary, MLLP senders on
//! several connections, an MQTT 5 subscriber with a persistent session.
//!
//! * kill -9 of the daemon under load: every message that got `AA` arrives, in order per sender;
//! * broker outage under load: ingest keeps ACKing, everything arrives in order after;
//! * full outbox: negative ACKs, no loss, recovery once the broker is back.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

const DEADLINE: Duration = Duration::from_secs(90);

/// One MLLP sender: sends `<name>-<seq>` for seq in 0..n, one at a time, waiting for each ACK.
/// Like a real sender it resends a message that got no ACK (connection lost) after
/// reconnecting, and a refused one (negative ACK) after a pause. Returns the ids that got
/// `AA`; every ACK code is recorded in `codes`.
fn sender(
    addr: SocketAddr,
    name: String,
    n: usize,
    acks: Arc<AtomicUsize>,
    codes: Arc<Mutex<Vec<(String, String)>>>,
) -> Vec<String> {
    let template = fixture("adt_a01_uk.hl7");
    let mut acked = Vec::new();
    let end = Instant::now() + DEADLINE;
    let mut client: Option<MllpClient> = None;
    let mut seq = 0;
    while seq < n {
        assert!(
            Instant::now() < end,
            "sender {name} ran out of time at {seq}"
        );
        let c = match client.as_mut() {
            Some(c) => c,
            None => match MllpClient::try_connect(addr) {
                Ok(c) => client.insert(c),
                Err(_) => {
                    // Daemon down (killed, restarting): retry shortly.
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                }
            },
        };
        let id = format!("{name}-{seq}");
        match c.try_send(&with_control_id(&template, &id)) {
            Ok(ack) => {
                let code = field(&ack, "MSA", 1);
                assert_eq!(field(&ack, "MSA", 2), id, "ACK echoes MSH-10: {ack}");
                codes
                    .lock()
                    .expect("codes lock")
                    .push((id.clone(), code.clone()));
                if code == "AA" {
                    acked.push(id);
                    acks.fetch_add(1, Ordering::Relaxed);
                    seq += 1;
                } else {
                    // Refused (full): the sender keeps the message and tries again later.
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
            Err(_) => client = None,
        }
    }
    acked
}

struct Load {
    acks: Arc<AtomicUsize>,
    codes: Arc<Mutex<Vec<(String, String)>>>,
    threads: Vec<std::thread::JoinHandle<Vec<String>>>,
}

fn start_load(addr: SocketAddr, senders: usize, per_sender: usize, tag: &str) -> Load {
    let acks = Arc::new(AtomicUsize::new(0));
    let codes = Arc::new(Mutex::new(Vec::new()));
    let threads = (0..senders)
        .map(|i| {
            let (acks, codes) = (acks.clone(), codes.clone());
            let name = format!("{tag}{i}");
            std::thread::spawn(move || sender(addr, name, per_sender, acks, codes))
        })
        .collect();
    Load {
        acks,
        codes,
        threads,
    }
}

impl Load {
    fn wait_acks(&self, n: usize) {
        wait_for(&format!("{n} ACKs"), DEADLINE, || {
            (self.acks.load(Ordering::Relaxed) >= n).then_some(())
        });
    }

    fn join(self) -> (Vec<String>, Vec<(String, String)>) {
        let mut all = Vec::new();
        for t in self.threads {
            all.extend(t.join().expect("sender thread"));
        }
        let codes = self.codes.lock().expect("codes").clone();
        (all, codes)
    }
}

/// A pseudo-random number in `lo..hi` (the kill point), without a dependency.
fn random_in(lo: usize, hi: usize) -> usize {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    lo + (h.finish() as usize) % (hi - lo).max(1)
}

const FAST_RECONNECT: &str = "reconnect_initial_ms = 100\nreconnect_max_secs = 1\n";

#[test]
fn kill_9_under_load_loses_no_acked_message_and_keeps_order() {
    let broker = ConfBroker::start(ConfBroker::plain(), false);
    let sub = Sub5::start(broker.port, &["hl7-edge/#"]);
    let mut d = Daemon::start_with(&broker.url(), FAST_RECONNECT);

    const SENDERS: usize = 4;
    const PER: usize = 50;
    let load = start_load(d.addr(), SENDERS, PER, "k");
    let kill_at = random_in(SENDERS * PER / 5, SENDERS * PER / 2);
    load.wait_acks(kill_at);
    d.kill9();
    let at_kill = load.acks.load(Ordering::Relaxed);
    d.restart();
    let (acked, codes) = load.join();
    assert_eq!(acked.len(), SENDERS * PER);
    assert!(
        codes.iter().all(|(_, c)| c == "AA"),
        "only AA expected: {codes:?}"
    );

    let msgs = sub.until("every ACKed message", DEADLINE, |m| {
        let ids: std::collections::HashSet<String> =
            m.iter().map(|m| bundle_id(&m.payload)).collect();
        acked.iter().all(|a| ids.contains(a))
    });
    let (distinct, dups) = check_arrivals(msgs.iter().map(|m| m.payload.as_str()), &acked);
    eprintln!(
        "kill -9 after {at_kill} ACKs: {distinct} distinct Bundles, {dups} redelivered duplicates"
    );
    assert_eq!(distinct, SENDERS * PER);

    // Everything delivered: nothing left waiting in the outbox.
    wait_for("an empty outbox", DEADLINE, || {
        let out = d.cli(&["outbox", "stats", "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        (v["received"] == 0 && v["ready"] == 0).then_some(())
    });
}

/// Between two checkpoints, an accepted message is durable in the intake journal only (the
/// database commit holding it is not yet on disk). A crash then must not lose it: the restart
/// stores every ACKed message again from the journal and forwards it; a clean stop leaves
/// nothing to restore.
#[test]
fn kill_9_between_checkpoints_restores_every_acked_message_from_the_journal() {
    let broker = ConfBroker::start(ConfBroker::plain(), false);
    let sub = Sub5::start(broker.port, &["hl7-edge/#"]);
    // No checkpoint for an hour after the one at start-up.
    let mut d = Daemon::start_with(
        &broker.url(),
        "[outbox]\ncheckpoint_interval_ms = 3600000\n",
    );
    let template = fixture("adt_a01_uk.hl7");
    let ids: Vec<String> = (0..20).map(|i| format!("j-{i}")).collect();
    let mut c = MllpClient::connect(d.addr());
    for id in &ids {
        let ack = c.send(&with_control_id(&template, id));
        assert_eq!(field(&ack, "MSA", 1), "AA", "{ack}");
    }
    drop(c);
    // Delivered before the crash; the delivery records were not checkpointed either.
    sub.until("the first deliveries", DEADLINE, |m| {
        let got: std::collections::HashSet<String> =
            m.iter().map(|m| bundle_id(&m.payload)).collect();
        ids.iter().all(|a| got.contains(a))
    });
    d.kill9();
    d.restart();
    let line = d.wait_log_line("from the journal", DEADLINE);
    assert!(
        line.contains("messages=20"),
        "all 20 ACKed messages restored from the journal: {line:?}"
    );
    // Published again (at-least-once), each under its stable identifier.
    let msgs = sub.until("the redeliveries", DEADLINE, |m| m.len() >= 2 * ids.len());
    let (distinct, dups) = check_arrivals(msgs.iter().map(|m| m.payload.as_str()), &ids);
    assert_eq!((distinct, dups), (ids.len(), ids.len()));
    wait_for("an empty outbox", DEADLINE, || {
        let out = d.cli(&["outbox", "stats", "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        (v["received"] == 0 && v["ready"] == 0).then_some(())
    });

    // A clean stop checkpoints: the next start has nothing to restore.
    assert!(d.stop(), "clean stop");
    d.restart();
    std::thread::sleep(Duration::from_millis(300));
    let log = d.log_text();
    assert!(!log.contains("from the journal"), "{log}");
    let out = d.cli(&["outbox", "stats", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("stats JSON");
    assert_eq!(v["delivered_total"], 20, "{v}");
}

#[test]
fn broker_outage_under_load_keeps_acking_and_delivers_everything_in_order() {
    let mut broker = ConfBroker::start(ConfBroker::plain(), true);
    let sub = Sub5::start(broker.port, &["hl7-edge/#"]);
    let d = Daemon::start_with(&broker.url(), FAST_RECONNECT);

    // Enough messages that the load is still running once the broker is down (stopping it
    // takes a while, and ingest ACKs thousands a second).
    const SENDERS: usize = 3;
    const PER: usize = 600;
    let load = start_load(d.addr(), SENDERS, PER, "o");
    load.wait_acks(20);
    broker.stop_graceful();
    let down_at = load.acks.load(Ordering::Relaxed);
    eprintln!("broker down after {down_at} of {} ACKs", SENDERS * PER);
    assert!(
        down_at + 40 <= SENDERS * PER,
        "the load ended ({down_at} ACKs) before the broker was down: raise PER"
    );
    // Ingest keeps ACKing while the broker is down.
    load.wait_acks(down_at + 40);
    d.wait_log("connection lost", Duration::from_secs(10));
    broker.spawn();
    let (acked, codes) = load.join();
    assert!(
        codes.iter().all(|(_, c)| c == "AA"),
        "ingest must ACK while the broker is down: {codes:?}"
    );

    let msgs = sub.until("every ACKed message after the outage", DEADLINE, |m| {
        let ids: std::collections::HashSet<String> =
            m.iter().map(|m| bundle_id(&m.payload)).collect();
        acked.iter().all(|a| ids.contains(a))
    });
    let (distinct, dups) = check_arrivals(msgs.iter().map(|m| m.payload.as_str()), &acked);
    eprintln!("broker outage: {distinct} distinct Bundles, {dups} duplicates");
    assert_eq!(distinct, SENDERS * PER);
}

#[test]
fn full_outbox_refuses_with_negative_acks_loses_nothing_and_recovers() {
    // Register the subscriber's session, then take the broker down before the daemon starts.
    let mut broker = ConfBroker::start(ConfBroker::plain(), true);
    let sub = Sub5::start(broker.port, &["hl7-edge/#"]);
    broker.stop_graceful();
    let d = Daemon::start_with(
        &broker.url(),
        &format!("{FAST_RECONNECT}[outbox]\nmax_records = 10\n"),
    );

    let template = fixture("adt_a01_uk.hl7");
    let mut c = MllpClient::connect(d.addr());
    let mut acked = Vec::new();
    for i in 0..10 {
        let id = format!("f0-{i}");
        let ack = c.send(&with_control_id(&template, &id));
        assert_eq!(field(&ack, "MSA", 1), "AA", "{ack}");
        acked.push(id);
    }
    for i in 10..12 {
        let id = format!("f0-{i}");
        let ack = c.send(&with_control_id(&template, &id));
        assert_eq!(
            field(&ack, "MSA", 1),
            "AE",
            "full outbox: negative ACK: {ack}"
        );
        assert!(ack.contains("storage full"), "{ack}");
    }
    d.wait_log("outbox full", Duration::from_secs(10));
    let out = d.cli(&["outbox", "stats", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("stats JSON");
    assert_eq!(v["refusing_new_messages"], true, "{v}");
    assert_eq!(v["refused_since_start"], 2, "{v}");
    assert_eq!(v["daemon_running"], true, "{v}");

    // The broker returns: the stored messages drain, space frees, the sender's retries land.
    broker.spawn();
    sub.until("the 10 stored messages", DEADLINE, |m| {
        let ids: std::collections::HashSet<String> =
            m.iter().map(|m| bundle_id(&m.payload)).collect();
        acked.iter().all(|a| ids.contains(a))
    });
    for i in 10..12 {
        let id = format!("f0-{i}");
        let ack = wait_for("space in the outbox", DEADLINE, || {
            let ack = c.send(&with_control_id(&template, &id));
            (field(&ack, "MSA", 1) == "AA").then_some(ack)
        });
        assert_eq!(field(&ack, "MSA", 2), id);
        acked.push(id);
    }
    d.wait_log("outbox accepting messages again", Duration::from_secs(10));
    let msgs = sub.until("all 12 messages", DEADLINE, |m| {
        let ids: std::collections::HashSet<String> =
            m.iter().map(|m| bundle_id(&m.payload)).collect();
        acked.iter().all(|a| ids.contains(a))
    });
    let (distinct, _) = check_arrivals(msgs.iter().map(|m| m.payload.as_str()), &acked);
    assert_eq!(distinct, 12);
}
