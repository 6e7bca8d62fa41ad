//! End to end on real parts: mosquitto, the hl7-edge binary, MLLP over TCP, mosquitto_sub.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::Value;

fn by_control_id(msgs: &[(String, String)], control_id: &str) -> (String, Value) {
    for (t, p) in msgs {
        let v: Value = serde_json::from_str(p).expect("payload is JSON");
        if v["identifier"]["value"] == control_id {
            return (t.clone(), v);
        }
    }
    panic!("no Bundle for {control_id}");
}

fn verify(d: &Daemon, bundle: &Value) -> (bool, String) {
    let f = d.dir.path().join(format!("bundle-{}.json", free_port()));
    std::fs::write(&f, serde_json::to_vec(bundle).expect("json")).expect("write bundle");
    let jwk = d.state_dir().join("signing-key.pem.pub.jwk");
    assert!(jwk.exists(), "public JWK written beside the generated key");
    let out = Command::new(BIN)
        .arg("verify")
        .arg(&f)
        .arg("--key")
        .arg(&jwk)
        .output()
        .expect("run verify");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn adt_messages_are_acked_mapped_signed_and_published() {
    let broker = Broker::start();
    let sub = Subscriber::start(broker.port, "hl7-edge/#");
    let d = Daemon::start(&broker.url());
    let mut client = MllpClient::connect(d.addr());
    for (file, ctrl, trigger) in [
        ("adt_a01_uk.hl7", "MSG00001", "A01"),
        ("adt_a04_uk.hl7", "MSG00002", "A04"),
        ("adt_a08_uk.hl7", "MSG00003", "A08"),
    ] {
        let ack = client.send(&fixture(file));
        assert_eq!(field(&ack, "MSA", 1), "AA", "ACK for {file}: {ack}");
        assert_eq!(field(&ack, "MSA", 2), ctrl, "MSA-2 echoes MSH-10: {ack}");
        assert_eq!(field(&ack, "MSH", 9), format!("ACK^{trigger}^ACK"), "{ack}");
        assert_eq!(
            field(&ack, "MSH", 3),
            "HL7EDGE",
            "sender/receiver swapped: {ack}"
        );
        assert_eq!(
            field(&ack, "MSH", 5),
            "PAS",
            "sender/receiver swapped: {ack}"
        );
        assert_eq!(
            field(&ack, "MSH", 12),
            "2.4",
            "version follows the message: {ack}"
        );
    }
    let msgs = sub.take(3, Duration::from_secs(60));

    let (topic, a01) = by_control_id(&msgs, "MSG00001");
    assert_eq!(topic, "hl7-edge/test-edge/pas/ADT_A01");
    assert_eq!(a01["resourceType"], "Bundle");
    assert_eq!(a01["type"], "message");
    assert_eq!(
        a01["timestamp"], "2026-07-15T10:15:00+01:00",
        "BST offset applied"
    );
    let mh = &a01["entry"][0]["resource"];
    assert_eq!(mh["resourceType"], "MessageHeader");
    assert_eq!(mh["eventCoding"]["code"], "A01");
    assert_eq!(
        mh["eventCoding"]["system"],
        "http://terminology.hl7.org/CodeSystem/v2-0003"
    );

    let patient = resource(&a01, "Patient");
    let nhs = &patient["identifier"][0];
    assert_eq!(nhs["system"], "https://fhir.nhs.uk/Id/nhs-number");
    assert_eq!(nhs["value"], "9449305552");
    assert_eq!(
        nhs["extension"][0]["valueCodeableConcept"]["coding"][0]["code"],
        "01"
    );
    assert_eq!(patient["identifier"][1]["value"], "RRV1234567");
    assert_eq!(
        patient["identifier"][1]["system"],
        "https://id.hl7-edge.invalid/RRV/mrn"
    );
    assert_eq!(patient["name"][0]["family"], "O'BRIEN");
    assert_eq!(patient["name"][0]["given"][0], "ZOË", "UTF-8 name intact");
    assert_eq!(patient["name"][0]["use"], "official");
    assert_eq!(patient["gender"], "female");
    assert_eq!(patient["birthDate"], "1980-01-01");
    assert_eq!(patient["address"][0]["postalCode"], "NW1 2BU");
    assert_eq!(
        patient["meta"]["profile"][0],
        "https://fhir.hl7.org.uk/StructureDefinition/UKCore-Patient"
    );

    let enc = resource(&a01, "Encounter");
    assert_eq!(enc["status"], "in-progress");
    assert_eq!(enc["class"]["code"], "IMP");
    assert_eq!(enc["period"]["start"], "2026-07-15T10:00:00+01:00");
    assert_eq!(enc["identifier"][0]["value"], "V12345678");
    let patient_url = format!("urn:uuid:{}", patient["id"].as_str().expect("id"));
    assert_eq!(enc["subject"]["reference"], patient_url.as_str());
    let org = resource(&a01, "Organization");
    assert_eq!(
        org["identifier"][0]["system"],
        "https://fhir.nhs.uk/Id/ods-organization-code"
    );
    assert_eq!(org["identifier"][0]["value"], "RRV");

    // Signed, verifiable with the public JWK, and tamper-evident.
    assert_eq!(a01["signature"]["sigFormat"], "application/jose");
    let (ok, out) = verify(&d, &a01);
    assert!(ok, "signature verifies: {out}");
    let mut tampered = a01.clone();
    tampered["entry"][1]["resource"]["birthDate"] = Value::String("1980-01-02".into());
    let (ok, out) = verify(&d, &tampered);
    assert!(!ok, "a tampered Bundle must fail verification: {out}");

    // Deterministic ids: the same patient and visit in A01 and A08 get the same resource ids.
    let (_, a08) = by_control_id(&msgs, "MSG00003");
    assert_eq!(resource(&a08, "Patient")["id"], patient["id"]);
    assert_eq!(resource(&a08, "Encounter")["id"], enc["id"]);
    let (_, a04) = by_control_id(&msgs, "MSG00002");
    assert_eq!(resource(&a04, "Encounter")["status"], "arrived");
    assert_eq!(resource(&a04, "Encounter")["class"]["code"], "AMB");
    assert_eq!(
        a04["timestamp"], "2026-01-15T09:00:00+00:00",
        "GMT offset applied"
    );

    // Every Bundle passes an independent FHIR R4 validator.
    let all: Vec<Value> = msgs
        .iter()
        .map(|(_, p)| serde_json::from_str(p).expect("JSON"))
        .collect();
    assert_valid_fhir(&all);

    // The log never carries patient data.
    let log = d.log_text();
    for secret in ["9449305552", "O'BRIEN", "ZOË", "HIGH STREET", "19800101"] {
        assert!(!log.contains(secret), "log leaks {secret}:\n{log}");
    }
}

#[test]
fn python_hl7_mllp_send_gets_an_aa() {
    let mllp_send = venv_bin("mllp_send")
        .expect("python-hl7's mllp_send is missing: run scripts/test.sh, which installs it");
    let broker = Broker::start();
    let sub = Subscriber::start(broker.port, "hl7-edge/#");
    let d = Daemon::start(&broker.url());
    let out = Command::new(mllp_send)
        .args(["--loose", "--port", &d.mllp_port.to_string(), "--file"])
        .arg(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/adt_a01_uk.hl7"))
        .arg("127.0.0.1")
        .output()
        .expect("run mllp_send");
    let text = String::from_utf8_lossy(&out.stdout).replace('\n', "\r");
    assert!(
        out.status.success(),
        "mllp_send failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(field(&text, "MSA", 1), "AA", "mllp_send printed: {text}");
    assert_eq!(field(&text, "MSA", 2), "MSG00001");
    let msgs = sub.take(1, Duration::from_secs(60));
    let v: Value = serde_json::from_str(&msgs[0].1).expect("JSON");
    assert_eq!(v["identifier"]["value"], "MSG00001");
}

#[test]
fn bad_input_gets_a_negative_ack_and_the_connection_keeps_working() {
    let broker = Broker::start();
    let d = Daemon::start(&broker.url());
    let mut c = MllpClient::connect(d.addr());

    let ack = c.send(b"this is not HL7 at all");
    assert_eq!(field(&ack, "MSA", 1), "AR", "{ack}");
    assert!(
        ack.contains("ERR"),
        "an ERR segment explains the refusal: {ack}"
    );

    let ack = c.send(b"MSH|^~\\&|PAS|RRV|X|Y|20260101||ADT^A01|CTRL-NO-VERSION|P\rPID|1\r");
    assert_eq!(field(&ack, "MSA", 1), "AR", "no MSH-12: {ack}");
    assert_eq!(field(&ack, "MSA", 2), "CTRL-NO-VERSION", "{ack}");

    let ack = c.send(b"MSH|^~\\&|PAS|RRV|X|Y|20260101||ADT^A01|CTRL-V9|P|9.9\rPID|1\r");
    assert_eq!(field(&ack, "MSA", 1), "AR", "unsupported version: {ack}");
    assert_eq!(field(&ack, "MSA", 2), "CTRL-V9");

    // Oversize (the test feed allows 64 KiB): drained, refused, connection still usable.
    let mut big = b"MSH|^~\\&|PAS|RRV|X|Y|20260101||ADT^A01|BIG|P|2.4\rNTE|1||".to_vec();
    big.extend(std::iter::repeat_n(b'x', 100_000));
    let ack = c.send(&big);
    assert_eq!(
        field(&ack, "MSA", 1),
        "AR",
        "oversize: {}",
        &ack[..ack.len().min(300)]
    );

    // Garbage between frames is skipped.
    c.send_raw(b"\r\n\r\nnoise");
    let ack = c.send(&fixture("adt_a01_uk.hl7"));
    assert_eq!(field(&ack, "MSA", 1), "AA", "{ack}");

    // A wrong charset claim: Latin-1 bytes, MSH-18 says 8859/1; the message is kept.
    let ack = c.send(&fixture("adt_a01_latin1_invalid_nhs.hl7"));
    assert_eq!(field(&ack, "MSA", 1), "AA", "{ack}");
}

#[test]
fn messages_acked_while_the_broker_is_down_arrive_after_restart_of_both() {
    let port = free_port();
    let url = format!("mqtt://127.0.0.1:{port}");
    let mut d = Daemon::start(&url);
    let mut c = MllpClient::connect(d.addr());
    let ack = c.send(&fixture("adt_a01_uk.hl7"));
    assert_eq!(field(&ack, "MSA", 1), "AA", "ACK without a broker: {ack}");
    drop(c);
    // Stop the daemon with the message stored but undelivered, then bring up the broker.
    assert!(d.stop(), "clean exit on SIGTERM:\n{}", d.log_text());
    let broker = Broker::start_on(port);
    let sub = Subscriber::start(broker.port, "hl7-edge/#");
    d.restart();
    let msgs = sub.take(1, Duration::from_secs(60));
    let v: Value = serde_json::from_str(&msgs[0].1).expect("JSON");
    assert_eq!(v["identifier"]["value"], "MSG00001");
    let (ok, out) = verify(&d, &v);
    assert!(ok, "{out}");
}

/// Messages of several MB each, more of them at once than the mappers' in-flight budget of raw
/// bytes (4 MiB): each is ACKed, mapped, signed and published exactly once, whether it waited
/// for the budget (and was read again from the outbox) or not.
#[test]
fn large_messages_beyond_the_in_flight_budget_are_all_delivered() {
    let broker = Broker::start();
    let sub = Subscriber::start(broker.port, "hl7-edge/#");
    let d = Daemon::start_feed(&broker.url(), "", "", "max_frame_bytes = 4194304");
    let base = String::from_utf8(fixture("adt_a01_uk.hl7")).expect("UTF-8 fixture");
    // A site-defined Z segment no mapping reads, of 1.5 MB: six such messages hold 9 MB.
    let filler = "X".repeat(1_500_000);
    let senders: Vec<_> = (0..6)
        .map(|i| {
            let msg = format!(
                "{}\rZXX|1|{filler}\r",
                base.trim_end().replace("MSG00001", &format!("BIG{i:05}"))
            );
            let addr = d.addr();
            std::thread::spawn(move || {
                let mut client = MllpClient::connect(addr);
                client.send(msg.as_bytes())
            })
        })
        .collect();
    for (i, s) in senders.into_iter().enumerate() {
        let ack = s.join().expect("sender thread");
        assert_eq!(field(&ack, "MSA", 1), "AA", "message {i}: {ack}");
    }
    let msgs = sub.take(6, Duration::from_secs(120));
    let mut ids: Vec<String> = msgs
        .iter()
        .map(|(_, p)| {
            let b: Value = serde_json::from_str(p).expect("JSON");
            let mh = &b["entry"][0]["resource"];
            assert_eq!(mh["resourceType"], "MessageHeader", "{p:.300}");
            let (ok, out) = verify(&d, &b);
            assert!(ok, "signature verifies: {out}");
            b["identifier"]["value"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 6, "six distinct Bundles");
    assert!(
        sub.drain_for(Duration::from_secs(1)).is_empty(),
        "nothing is published twice"
    );
}
