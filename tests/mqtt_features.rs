//! MQTT features on real parts: MQTT 5 properties, the status topic with its Last Will,
//! heartbeats and the "feed silent" signal, broker refusals dead-lettered, the `outbox` CLI on a
//! running and on a stopped daemon, the fallback to MQTT 3.1.1, TLS and mutual TLS.

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::Value;

const T: Duration = Duration::from_secs(60);

fn json_out(out: &std::process::Output) -> Value {
    assert!(
        out.status.success(),
        "hl7-edge failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout).into_owned()
        )
    })
}

fn status_msgs(m: &[Msg5]) -> Vec<Value> {
    m.iter()
        .filter(|m| m.topic == "hl7-edge-health/test-edge/status")
        .map(|m| serde_json::from_str(&m.payload).expect("status JSON"))
        .collect()
}

fn heartbeats(m: &[Msg5]) -> Vec<Value> {
    m.iter()
        .filter(|m| m.topic == "hl7-edge-health/test-edge/pas/heartbeat")
        .map(|m| serde_json::from_str(&m.payload).expect("heartbeat JSON"))
        .collect()
}

#[test]
fn mqtt5_properties_status_last_will_heartbeat_and_silent_feed() {
    let broker = ConfBroker::start(ConfBroker::plain(), false);
    let sub = Sub5::start(broker.port, &["hl7-edge/#", "hl7-edge-health/#"]);
    let mut d = Daemon::start_with(
        &broker.url(),
        "heartbeat_secs = 1\nfeed_silent_secs = 2\nreconnect_initial_ms = 100\nreconnect_max_secs = 1\n",
    );

    // Online, retained, MQTT 5.
    let m = sub.until("status online", T, |m| {
        status_msgs(m).iter().any(|s| s["state"] == "online")
    });
    let online = status_msgs(&m).into_iter().find(|s| s["state"] == "online");
    assert_eq!(online.expect("online")["protocol"], "MQTT 5");

    // A Bundle with MQTT 5 properties.
    let mut c = MllpClient::connect(d.addr());
    let ack = c.send(&fixture("adt_a01_uk.hl7"));
    assert_eq!(field(&ack, "MSA", 1), "AA", "{ack}");
    let m = sub.until("the Bundle", T, |m| {
        m.iter().any(|m| m.topic.starts_with("hl7-edge/"))
    });
    let b = m
        .iter()
        .find(|m| m.topic == "hl7-edge/test-edge/pas/ADT_A01")
        .expect("Bundle on its topic");
    assert!(!b.retain, "Bundles are not retained");
    assert_eq!(b.content_type.as_deref(), Some("application/fhir+json"));
    assert_eq!(b.prop("message-id"), Some("MSG00001"));
    assert_eq!(bundle_id(&b.payload), "MSG00001");
    assert_eq!(b.prop("feed"), Some("pas"));
    assert_eq!(b.prop("source-control-id"), Some("MSG00001"));
    let jwk: Value = serde_json::from_str(
        &std::fs::read_to_string(d.state_dir().join("signing-key.pem.pub.jwk")).expect("jwk"),
    )
    .expect("jwk JSON");
    assert_eq!(b.prop("signature-key-id"), jwk["kid"].as_str());

    // Heartbeat with counts, then "silent" after 2 s without messages.
    sub.until("a heartbeat counting the delivery", T, |m| {
        heartbeats(m)
            .iter()
            .any(|h| h["received"] == 1 && h["delivered"] == 1 && h["pending"] == 0)
    });
    sub.until("a silent heartbeat", T, |m| {
        heartbeats(m).iter().any(|h| h["silent"] == true)
    });
    d.wait_log("feed silent", T);
    // The next message clears it.
    let ack = c.send(&with_control_id(&fixture("adt_a01_uk.hl7"), "MSG-AGAIN"));
    assert_eq!(field(&ack, "MSA", 1), "AA", "{ack}");
    d.wait_log("feed active again", T);
    drop(c);

    // Crash: the broker publishes the Last Will.
    d.kill9();
    sub.until("the Last Will", T, |m| {
        status_msgs(m)
            .iter()
            .any(|s| s["state"] == "offline" && s["reason"] == "connection lost")
    });
    // Back, then a clean stop says so itself.
    d.restart();
    sub.until("online again after the Last Will", T, |m| {
        let s = status_msgs(m);
        s.iter()
            .position(|s| s["reason"] == "connection lost")
            .is_some_and(|lwt| s[lwt..].iter().any(|s| s["state"] == "online"))
    });
    assert!(d.stop(), "clean stop");
    sub.until("offline after shutdown", T, |m| {
        status_msgs(m)
            .iter()
            .any(|s| s["state"] == "offline" && s["reason"] == "shutdown")
    });
}

#[test]
fn broker_refusal_is_dead_lettered_and_the_outbox_cli_works_running_and_stopped() {
    // The broker's ACL allows A01 and A08 but not A04 (MQTT 5: PUBACK 0x87 not authorised).
    let acl_dir = tempfile::tempdir().expect("tempdir");
    let acl = acl_dir.path().join("acl");
    std::fs::write(
        &acl,
        "topic readwrite hl7-edge/+/+/ADT_A01\ntopic readwrite hl7-edge/+/+/ADT_A08\n\
         topic readwrite hl7-edge-health/#\ntopic readwrite hl7-edge-test-probe/#\n",
    )
    .expect("write acl");
    let broker = ConfBroker::start(
        &format!("{}acl_file {}\n", ConfBroker::plain(), acl.display()),
        false,
    );
    let sub = Sub5::start(broker.port, &["hl7-edge/#"]);
    let mut d = Daemon::start_with(
        &broker.url(),
        "reconnect_initial_ms = 100\nreconnect_max_secs = 1\n",
    );
    let mut c = MllpClient::connect(d.addr());
    for f in ["adt_a01_uk.hl7", "adt_a04_uk.hl7", "adt_a08_uk.hl7"] {
        let ack = c.send(&fixture(f));
        assert_eq!(field(&ack, "MSA", 1), "AA", "{ack}");
    }
    drop(c);
    let m = sub.until("A01 and A08", T, |m| m.len() >= 2);
    let ids: Vec<String> = m.iter().map(|m| bundle_id(&m.payload)).collect();
    assert_eq!(ids, ["MSG00001", "MSG00003"], "in order, A04 refused");

    // Running daemon: the CLI goes through the admin socket.
    let dead = wait_for("the A04 dead-lettered", T, || {
        let v = json_out(&d.cli(&["outbox", "list", "--state", "dead-lettered", "--json"]));
        v.as_array().filter(|a| a.len() == 1).map(|a| a[0].clone())
    });
    assert_eq!(dead["control_id"], "MSG00002");
    let reason = dead["reason"].as_str().expect("reason");
    assert!(reason.contains("NotAuthorized"), "{reason}");
    let id = dead["id"].as_u64().expect("id").to_string();
    d.wait_log("refused a Bundle; dead-lettering it", T);

    let stats = json_out(&d.cli(&["outbox", "stats", "--json"]));
    assert_eq!(stats["daemon_running"], true, "{stats}");
    assert_eq!(stats["dead_lettered"], 1, "{stats}");
    assert_eq!(stats["forwarder"]["protocol"], "5", "{stats}");
    assert_eq!(stats["feeds_since_start"]["pas"]["received"], 3, "{stats}");

    let show = json_out(&d.cli(&["outbox", "show", &id, "--payload", "--json"]));
    assert_eq!(show["state"], "dead-lettered");
    assert_eq!(show["bundle"]["identifier"]["value"], "MSG00002");
    assert!(show["raw"].as_str().expect("raw").starts_with("MSH|"));

    // Retry while running: published again, refused again, dead-lettered again (not a loop).
    let out = d.cli(&["outbox", "retry", &id]);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("ready"));
    wait_for("the second refusal", T, || {
        (d.log_text().matches("dead-lettering it").count() >= 2).then_some(())
    });
    wait_for("dead-lettered again", T, || {
        let v = json_out(&d.cli(&["outbox", "show", &id, "--json"]));
        (v["state"] == "dead-lettered").then_some(())
    });

    // Stopped daemon: the CLI opens the store itself.
    assert!(d.stop(), "clean stop");
    let stats = json_out(&d.cli(&["outbox", "stats", "--json"]));
    assert_eq!(stats["daemon_running"], false, "{stats}");
    assert_eq!(stats["delivered_total"], 2, "{stats}");
    let delivered = json_out(&d.cli(&["outbox", "list", "--state", "delivered", "--json"]));
    assert_eq!(delivered.as_array().map(Vec::len), Some(2), "{delivered}");
    let purged = json_out(&d.cli(&["outbox", "purge", "--delivered", "--json"]));
    assert_eq!(purged["removed_audit_rows"], 2);
    let delivered = json_out(&d.cli(&["outbox", "list", "--state", "delivered", "--json"]));
    assert_eq!(delivered.as_array().map(Vec::len), Some(0));
    let text = d.cli(&["outbox", "list"]);
    assert!(
        String::from_utf8_lossy(&text.stdout).contains("dead-lettered"),
        "{text:?}"
    );
    let out = d.cli(&["outbox", "retry", &id]);
    assert!(out.status.success(), "{out:?}");
    let bad = d.cli(&["outbox", "show", "999999"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("does not exist"));

    // Crash recovery of a Ready record: the restarted daemon publishes it (refused again).
    d.restart();
    wait_for("dead-lettered after the restart", T, || {
        let v = json_out(&d.cli(&["outbox", "show", &id, "--json"]));
        (v["state"] == "dead-lettered").then_some(())
    });
}

/// Reads one MQTT packet: (type nibble, body).
fn read_packet(s: &mut std::net::TcpStream) -> std::io::Result<(u8, Vec<u8>)> {
    let mut b = [0u8; 1];
    s.read_exact(&mut b)?;
    let first = b[0];
    let mut len = 0usize;
    for shift in [0, 7, 14, 21] {
        s.read_exact(&mut b)?;
        len |= usize::from(b[0] & 0x7f) << shift;
        if b[0] & 0x80 == 0 {
            break;
        }
    }
    let mut body = vec![0; len];
    s.read_exact(&mut body)?;
    Ok((first >> 4, body))
}

#[test]
fn falls_back_to_mqtt_3_1_1_when_the_broker_does_not_speak_5() {
    // A broker that only speaks 3.1.1, as far as the daemon can tell: it answers an MQTT 5
    // CONNECT with the 3.1.1 "unacceptable protocol version" CONNACK.
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let fake = std::thread::spawn(move || {
        let mut levels = Vec::new();
        loop {
            let (mut s, _) = listener.accept().expect("accept");
            s.set_read_timeout(Some(T)).expect("timeout");
            let (kind, body) = read_packet(&mut s).expect("CONNECT");
            assert_eq!(kind, 1);
            let level = body[6];
            levels.push(level);
            if level == 5 {
                s.write_all(&[0x20, 0x02, 0x00, 0x01]).expect("CONNACK");
                continue;
            }
            s.write_all(&[0x20, 0x02, 0x00, 0x00]).expect("CONNACK");
            let (kind, _) = read_packet(&mut s).expect("a packet after CONNACK");
            return (levels, kind);
        }
    });
    let d = Daemon::start(&format!("mqtt://127.0.0.1:{port}"));
    let (levels, kind) = fake.join().expect("fake broker");
    assert_eq!(levels, [5, 4], "MQTT 5 first, then 3.1.1");
    assert_eq!(kind, 3, "PUBLISH (the status) on the 3.1.1 connection");
    d.wait_log("does not speak MQTT 5; using MQTT 3.1.1", T);
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl (scripts/test-deps.sh installs it)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, all EC P-256.
fn make_ca(dir: &Path, name: &str) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.pem"),
            "-days",
            "2",
            "-subj",
            &format!("/CN={name}"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
}

fn make_leaf(dir: &Path, ca: &str, name: &str, ext: &str) {
    std::fs::write(dir.join(format!("{name}.ext")), ext).expect("ext file");
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
            "-subj",
            &format!("/CN={name}"),
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{ca}.pem"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-out",
            &format!("{name}.pem"),
            "-days",
            "2",
            "-extfile",
            &format!("{name}.ext"),
        ],
    );
}

#[test]
fn tls_and_mutual_tls_to_mosquitto_and_a_wrong_certificate_is_refused_clearly() {
    let certs = tempfile::tempdir().expect("tempdir");
    let dir = certs.path();
    make_ca(dir, "ca");
    make_ca(dir, "other-ca");
    make_leaf(
        dir,
        "ca",
        "server",
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n",
    );
    make_leaf(
        dir,
        "ca",
        "client",
        "extendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE\n",
    );
    let p = |f: &str| dir.join(f).display().to_string();
    let (tls_port, mtls_port) = (free_port(), free_port());
    let conf = format!(
        "per_listener_settings false\nallow_anonymous true\nlistener {{port}} 127.0.0.1\n\
         listener {tls_port} 127.0.0.1\ncafile {ca}\ncertfile {cert}\nkeyfile {key}\n\
         listener {mtls_port} 127.0.0.1\ncafile {ca}\ncertfile {cert}\nkeyfile {key}\n\
         require_certificate true\n",
        ca = p("ca.pem"),
        cert = p("server.pem"),
        key = p("server.key"),
    );
    let broker = ConfBroker::start(&conf, false);
    wait_port(tls_port, T);
    wait_port(mtls_port, T);
    let sub = Sub5::start(broker.port, &["hl7-edge/#"]);
    let fast = "reconnect_initial_ms = 100\nreconnect_max_secs = 1\n";
    let send = |d: &Daemon, ctrl: &str| {
        let mut c = MllpClient::connect(d.addr());
        let ack = c.send(&with_control_id(&fixture("adt_a01_uk.hl7"), ctrl));
        assert_eq!(field(&ack, "MSA", 1), "AA", "{ack}");
    };

    // Server-authenticated TLS.
    let d = Daemon::start_with(
        &format!("mqtts://127.0.0.1:{tls_port}"),
        &format!("ca_file = {:?}\n{fast}", p("ca.pem")),
    );
    send(&d, "TLS-1");
    sub.until("the Bundle over TLS", T, |m| {
        m.iter().any(|m| bundle_id(&m.payload) == "TLS-1")
    });
    drop(d);

    // Mutual TLS.
    let d = Daemon::start_with(
        &format!("mqtts://127.0.0.1:{mtls_port}"),
        &format!(
            "ca_file = {:?}\nclient_cert_file = {:?}\nclient_key_file = {:?}\n{fast}",
            p("ca.pem"),
            p("client.pem"),
            p("client.key")
        ),
    );
    send(&d, "MTLS-1");
    sub.until("the Bundle over mutual TLS", T, |m| {
        m.iter().any(|m| bundle_id(&m.payload) == "MTLS-1")
    });
    drop(d);

    // The broker's certificate is not signed by the configured CA: refused, clearly.
    let d = Daemon::start_with(
        &format!("mqtts://127.0.0.1:{tls_port}"),
        &format!("ca_file = {:?}\n{fast}", p("other-ca.pem")),
    );
    send(&d, "WRONG-CA");
    let log = d.wait_log("TLS handshake with the broker failed", T);
    assert!(log.contains("UnknownIssuer"), "{log}");
    assert!(
        log.contains("mqtt.ca_file"),
        "the log says what to check: {log}"
    );

    // Mutual TLS required but no client certificate configured: refused, clearly.
    let d2 = Daemon::start_with(
        &format!("mqtts://127.0.0.1:{mtls_port}"),
        &format!("ca_file = {:?}\n{fast}", p("ca.pem")),
    );
    send(&d2, "NO-CLIENT-CERT");
    let log = d2.wait_log("client certificate", T);
    assert!(log.contains("MQTT broker"), "{log}");

    // Neither of the refused ones arrived.
    let m = sub.until("nothing more", Duration::from_secs(1), |_| true);
    assert!(
        !m.iter()
            .any(|m| ["WRONG-CA", "NO-CLIENT-CERT"].contains(&bundle_id(&m.payload).as_str())),
        "a refused connection published something"
    );
}

#[test]
fn qos_2_delivers_in_order_and_settles_on_pubcomp() {
    let broker = ConfBroker::start(ConfBroker::plain(), false);
    let sub = Sub5::start(broker.port, &["hl7-edge/#"]);
    let d = Daemon::start_with(&broker.url(), "qos = 2\n");
    let mut c = MllpClient::connect(d.addr());
    let ids: Vec<String> = (0..5).map(|i| format!("q2-{i}")).collect();
    for id in &ids {
        let ack = c.send(&with_control_id(&fixture("adt_a01_uk.hl7"), id));
        assert_eq!(field(&ack, "MSA", 1), "AA", "{ack}");
    }
    let m = sub.until("5 Bundles", T, |m| m.len() >= 5);
    let (distinct, _) = check_arrivals(m.iter().map(|m| m.payload.as_str()), &ids);
    assert_eq!(distinct, 5);
    wait_for("all delivered (PUBCOMP)", T, || {
        let v = json_out(&d.cli(&["outbox", "stats", "--json"]));
        (v["delivered_total"] == 5 && v["ready"] == 0).then_some(())
    });
}
