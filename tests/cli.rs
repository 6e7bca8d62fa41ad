//! The offline commands, run as a user would run them.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Output};

use common::*;
use serde_json::Value;

fn hl7_edge(args: &[&str], dir: &std::path::Path) -> Output {
    Command::new(BIN)
        .args(args)
        .current_dir(dir)
        .env_remove("HL7EDGE_MQTT__URL")
        .output()
        .expect("run hl7-edge")
}

fn text(o: &[u8]) -> String {
    String::from_utf8_lossy(o).into_owned()
}

#[test]
fn map_shows_the_bundle_and_why_it_would_be_quarantined() {
    let dir = tempfile::tempdir().expect("tmp");
    let fx = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/adt_a01_latin1_invalid_nhs.hl7");
    let out = hl7_edge(&["map", fx.to_str().expect("utf-8 path")], dir.path());
    // No valid NHS number, no address: shown, but it would be quarantined (exit 1, reasons on
    // stderr).
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(
        err.contains("would be quarantined") && err.contains("no valid NHS number"),
        "{err}"
    );
    assert!(err.contains("postalCode"), "{err}");
    let bundle: Value = serde_json::from_slice(&out.stdout).expect("stdout is the Bundle JSON");
    assert_eq!(bundle["type"], "message");
    assert!(
        bundle.get("signature").is_none(),
        "map prints the unsigned Bundle"
    );
    let patient = bundle["entry"]
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| &e["resource"])
        .find(|r| r["resourceType"] == "Patient")
        .expect("a Patient");
    // Latin-1 bytes arrive intact as UTF-8.
    assert_eq!(patient["name"][0]["given"][0], "ZOË");
    // The NHS number fails modulus 11: kept, but never as an nhs-number identifier.
    let ids = patient["identifier"].as_array().expect("identifiers");
    assert!(
        ids.iter()
            .all(|i| i["system"] != "https://fhir.nhs.uk/Id/nhs-number")
    );
    assert!(ids.iter().any(|i| {
        i["value"] == "9449305553"
            && i["system"]
                .as_str()
                .is_some_and(|s| s.ends_with("/unverified-nhs-number"))
    }));
    // 01:30 on the October change is ambiguous: resolved to BST and noted on stderr.
    let enc = bundle["entry"]
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| &e["resource"])
        .find(|r| r["resourceType"] == "Encounter")
        .expect("an Encounter");
    assert_eq!(enc["period"]["start"], "2026-10-25T01:30:00+01:00");
    assert_eq!(enc["class"]["code"], "EMER");
    let notes = text(&out.stderr);
    assert!(notes.contains("clock change"), "{notes}");
    assert!(
        !notes.contains("9449305553"),
        "notes carry no patient data: {notes}"
    );
    // No state was created.
    assert!(!dir.path().join("hl7-edge-data").exists());
}

#[test]
fn map_is_deterministic() {
    let dir = tempfile::tempdir().expect("tmp");
    let fx = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/adt_a01_uk.hl7");
    let ids = |o: Output| -> Vec<String> {
        let b: Value = serde_json::from_slice(&o.stdout).expect("json");
        b["entry"]
            .as_array()
            .expect("entries")
            .iter()
            .map(|e| e["fullUrl"].to_string())
            .collect()
    };
    let a = ids(hl7_edge(&["map", fx.to_str().expect("path")], dir.path()));
    let b = ids(hl7_edge(&["map", fx.to_str().expect("path")], dir.path()));
    assert_eq!(
        a.len(),
        9,
        "MessageHeader, Organization, Patient, GP Organization and Practitioner (PD1), Practitioner, Location, Encounter, Provenance: {a:?}"
    );
    assert_eq!(a, b);
}

#[test]
fn check_reports_every_mapping_error_with_its_position() {
    let dir = tempfile::tempdir().expect("tmp");
    let maps = dir.path().join("maps");
    std::fs::create_dir_all(&maps).expect("mkdir");
    std::fs::write(
        maps.join("a.yaml"),
        "messages:\n  m:\n    match: [\"ADT^A01\"]\n    resources:\n      - name: patient\n        type: Patinet\n        rules:\n          - { set: gender, from: PID-8, lookup: gendre }\n          - { set: birthDate, from: PID-0 }\n",
    )
    .expect("write");
    std::fs::write(
        maps.join("b.yaml"),
        "valuemaps:\n  gender: { entries: { M: male }\n",
    )
    .expect("write");
    let out = hl7_edge(
        &["check", "--mappings", maps.to_str().expect("path")],
        dir.path(),
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    let err = text(&out.stderr);
    assert!(err.contains("a.yaml:6:"), "position of the bad type: {err}");
    assert!(
        err.contains("Patinet") && err.contains("did you mean `Patient`"),
        "{err}"
    );
    assert!(err.contains("a.yaml:8:") && err.contains("gendre"), "{err}");
    assert!(err.contains("a.yaml:9:") && err.contains("PID-0"), "{err}");
    assert!(
        err.contains("b.yaml"),
        "the YAML syntax error in the other file too: {err}"
    );
}

#[test]
fn check_passes_on_the_shipped_configuration() {
    let dir = tempfile::tempdir().expect("tmp");
    let out = hl7_edge(&["check"], dir.path());
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(text(&out.stdout).contains("adt-visit"));
}

#[test]
fn unknown_config_key_is_an_error_naming_key_and_file() {
    let dir = tempfile::tempdir().expect("tmp");
    let cfg = dir.path().join("c.toml");
    std::fs::write(&cfg, "[mqtt]\nurll = \"mqtt://x\"\n").expect("write");
    let out = hl7_edge(
        &["check", "--config", cfg.to_str().expect("path")],
        dir.path(),
    );
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("urll") && err.contains("c.toml"), "{err}");
}

#[test]
fn keygen_writes_a_private_key_0600_and_refuses_to_overwrite() {
    let dir = tempfile::tempdir().expect("tmp");
    let key = dir.path().join("k/signing.pem");
    let out = hl7_edge(
        &["keygen", "--out", key.to_str().expect("path")],
        dir.path(),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let mode = std::fs::metadata(&key)
        .expect("key exists")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    let jwk: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("k/signing.pem.pub.jwk")).expect("public jwk"),
    )
    .expect("jwk json");
    assert_eq!(jwk["kty"], "OKP");
    assert!(jwk.get("d").is_none(), "the public JWK has no private part");
    let again = hl7_edge(
        &["keygen", "--out", key.to_str().expect("path")],
        dir.path(),
    );
    assert!(
        !again.status.success(),
        "a second keygen must not overwrite the key"
    );
}

#[test]
fn verify_rejects_an_unsigned_bundle() {
    let dir = tempfile::tempdir().expect("tmp");
    let key = dir.path().join("signing.pem");
    assert!(
        hl7_edge(&["keygen", "--out", key.to_str().expect("p")], dir.path())
            .status
            .success()
    );
    let fx = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/adt_a01_uk.hl7");
    let out = hl7_edge(&["map", fx.to_str().expect("p")], dir.path());
    let bundle = dir.path().join("b.json");
    std::fs::write(&bundle, &out.stdout).expect("write");
    let jwk = dir.path().join("signing.pem.pub.jwk");
    let v = hl7_edge(
        &[
            "verify",
            bundle.to_str().expect("p"),
            "--key",
            jwk.to_str().expect("p"),
        ],
        dir.path(),
    );
    assert_eq!(v.status.code(), Some(1));
    assert!(text(&v.stdout).contains("INVALID"), "{}", text(&v.stdout));
}

#[test]
fn map_errors_say_each_cause_once() {
    let dir = tempfile::tempdir().expect("tmp");
    let cases = [
        // The parser's refusal, then no mapping for the type: each error text once.
        (
            "MSH|^~\\&|PAS|RRV|HL7EDGE|LHIE|20260715101500||||P|2.4\r",
            "MSH-9 (message type) is missing",
        ),
        (
            "MSH|^~\\&|PAS|RRV|HL7EDGE|LHIE|20260715101500||ZZZ^Z99^ZZZ_Z99|C1|P|2.4\rEVN|Z99\r",
            "no mapping handles ZZZ^Z99^ZZZ_Z99",
        ),
    ];
    for (message, reason) in cases {
        let f = dir.path().join("m.hl7");
        std::fs::write(&f, message).expect("write");
        let out = hl7_edge(&["map", f.to_str().expect("utf-8 path")], dir.path());
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert_eq!(err.matches(reason).count(), 1, "{err}");
    }
    // A cause that is not part of its error's text is still shown after it.
    let missing = dir.path().join("absent.hl7");
    let out = hl7_edge(&["map", missing.to_str().expect("utf-8 path")], dir.path());
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("absent.hl7") && err.contains("No such file"),
        "{err}"
    );
}

#[test]
fn map_takes_each_message_of_a_file_with_several() {
    let dir = tempfile::tempdir().expect("tmp");
    let golden = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("mappings/tests/adt");
    let mut sample = std::fs::read(golden.join("adt_a01.hl7")).expect("a01");
    sample.extend(std::fs::read(golden.join("adt_a08.hl7")).expect("a08"));
    let f = dir.path().join("sample.hl7");
    let bundles = |stdout: &[u8]| -> Vec<String> {
        serde_json::Deserializer::from_slice(stdout)
            .into_iter::<Value>()
            .map(|b| b.expect("a Bundle")["identifier"]["value"].to_string())
            .collect()
    };

    std::fs::write(&f, &sample).expect("write");
    let out = hl7_edge(&["map", f.to_str().expect("utf-8 path")], dir.path());
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert_eq!(
        bundles(&out.stdout),
        ["\"UK-A01-1\"", "\"UK-A08-1\""],
        "{err}"
    );
    assert!(
        err.contains("== message 1 of 2") && err.contains("== message 2 of 2"),
        "{err}"
    );

    // A message that cannot be mapped does not stop the others; the exit code is the worst.
    sample.extend(b"MSH|^~\\&|PAS|RRV|HL7EDGE|LHIE|20260715101500||||P|2.4\r");
    std::fs::write(&f, &sample).expect("write");
    let out = hl7_edge(&["map", f.to_str().expect("utf-8 path")], dir.path());
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(bundles(&out.stdout).len(), 2, "{err}");
    assert!(
        err.contains("== message 3 of 3\nerror: parse: MSH-9 (message type) is missing"),
        "{err}"
    );

    // One message in a batch envelope is that message; an envelope the daemon would refuse
    // is named.
    let a01 = std::fs::read(golden.join("adt_a01.hl7")).expect("a01");
    let mut batch = b"FHS|^~\\&|PAS|RRV\rBHS|^~\\&|PAS|RRV\r".to_vec();
    batch.extend(&a01);
    batch.extend(b"BTS|1\rFTS|1\r");
    std::fs::write(&f, &batch).expect("write");
    let out = hl7_edge(&["map", f.to_str().expect("utf-8 path")], dir.path());
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert_eq!(bundles(&out.stdout), ["\"UK-A01-1\""], "{err}");
    assert!(!err.contains("== message"), "{err}");
    batch.extend(b"FHS|^~\\&|PAS|RRV\r");
    batch.extend(&a01);
    std::fs::write(&f, &batch).expect("write");
    let out = hl7_edge(&["map", f.to_str().expect("utf-8 path")], dir.path());
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("batch envelope: line"), "{err}");
}
