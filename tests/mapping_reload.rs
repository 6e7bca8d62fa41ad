//! Hot reload with the real daemon: SIGHUP (`kill -HUP`) loads the edited mappings; a broken set
//! is refused with its `file:line:column` in the log while the running set keeps mapping, and no
//! message is lost on the way.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::Value;

struct Running {
    child: Child,
    log: std::path::PathBuf,
}

impl Running {
    /// The log without terminal colour codes.
    fn log_text(&self) -> String {
        let raw = std::fs::read_to_string(&self.log).unwrap_or_default();
        let mut out = String::with_capacity(raw.len());
        let mut chars = raw.chars();
        while let Some(c) = chars.next() {
            if c == '\u{1b}' {
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            } else {
                out.push(c);
            }
        }
        out
    }
    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill {sig}");
    }
    fn wait_log(&self, what: &str, times: usize) {
        wait_for(what, Duration::from_secs(20), || {
            (self.log_text().matches(what).count() >= times).then_some(())
        });
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read_dir") {
        let p = e.expect("entry").path();
        let dest = to.join(p.file_name().expect("name"));
        if p.is_dir() {
            copy_dir(&p, &dest);
        } else {
            std::fs::copy(&p, &dest).expect("copy");
        }
    }
}

fn with_control_id(msg: &[u8], id: &str) -> Vec<u8> {
    String::from_utf8_lossy(msg)
        .replacen("|MSG00001|", &format!("|{id}|"), 1)
        .into_bytes()
}

fn location_description(payload: &str) -> String {
    let b: Value = serde_json::from_str(payload).expect("bundle json");
    b["entry"]
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| &e["resource"])
        .find(|r| r["resourceType"] == "Location")
        .and_then(|r| r["description"].as_str())
        .unwrap_or_default()
        .to_string()
}

#[test]
fn sighup_reloads_mappings_and_a_broken_set_leaves_the_running_one_in_place() {
    let broker = Broker::start();
    let sub = Subscriber::start(broker.port, "hl7-edge/#");
    let dir = tempfile::tempdir().expect("tmp");
    let maps = dir.path().join("mappings");
    copy_dir(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("mappings"),
        &maps,
    );
    let adapters = dir.path().join("adapters");
    std::fs::create_dir_all(&adapters).expect("mkdir");
    let port = free_port();
    std::fs::write(
        adapters.join("pas.toml"),
        format!("name = \"pas\"\n[transport]\nkind = \"mllp\"\nbind = \"127.0.0.1:{port}\"\n"),
    )
    .expect("adapter");
    let config = dir.path().join("hl7-edge.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = {:?}\nadapters_dir = {:?}\nmappings_dir = {:?}\n[site]\nods_code = \"RRV\"\nappliance_id = \"reload\"\n[mqtt]\nurl = {:?}\nclient_id = \"hl7-edge-reload-{port}\"\n",
            dir.path().join("state").display().to_string(),
            adapters.display().to_string(),
            maps.display().to_string(),
            broker.url()
        ),
    )
    .expect("config");
    let log = dir.path().join("daemon.log");
    let child = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&config)
        .env("RUST_LOG", "info")
        .env_remove("HL7EDGE_MQTT__URL")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("start hl7-edge");
    let d = Running { child, log };
    wait_port(port, Duration::from_secs(30));
    let mut client = MllpClient::connect(std::net::SocketAddr::from(([127, 0, 0, 1], port)));
    let a01 = fixture("adt_a01_uk.hl7");

    // 1. The set loaded at start.
    let ack = client.send(&with_control_id(&a01, "R1"));
    assert_eq!(field(&ack, "MSA", 1), "AA", "{ack}");
    let got = sub.take(1, Duration::from_secs(20));
    assert_eq!(location_description(&got[0].1), "BAY2, BED3");

    // 2. An edit, then SIGHUP: the next message uses the new set.
    let lib = maps.join("datatypes/resources.yaml");
    let yaml = std::fs::read_to_string(&lib).expect("read");
    std::fs::write(&lib, yaml.replace("sep: \", \"", "sep: \" / \"")).expect("write");
    d.signal("-HUP");
    d.wait_log("mappings reloaded", 1);
    let ack = client.send(&with_control_id(&a01, "R2"));
    assert_eq!(field(&ack, "MSA", 1), "AA", "{ack}");
    let got = sub.take(1, Duration::from_secs(20));
    assert_eq!(location_description(&got[0].1), "BAY2 / BED3");

    // 3. A broken file: refused, logged with its position, counted; the running set stays.
    std::fs::write(
        maps.join("messages/broken.yaml"),
        "messages:\n  broken:\n    match: [\"ADT^A99\"]\n    resources:\n      - name: p\n        type: Patient\n        rules:\n          - { set: nmae, from: PID-5 }\n",
    )
    .expect("write");
    d.signal("-HUP");
    d.wait_log("mapping reload failed", 1);
    let text = d.log_text();
    assert!(text.contains("broken.yaml:8:"), "{text}");
    assert!(text.contains("failed_reloads=1"), "{text}");
    let ack = client.send(&with_control_id(&a01, "R3"));
    assert_eq!(field(&ack, "MSA", 1), "AA", "{ack}");
    let got = sub.take(1, Duration::from_secs(20));
    assert_eq!(
        location_description(&got[0].1),
        "BAY2 / BED3",
        "still the last good set"
    );

    // 4. Fixed again: reloads. Nothing was lost or published twice.
    std::fs::remove_file(maps.join("messages/broken.yaml")).expect("rm");
    d.signal("-HUP");
    d.wait_log("mappings reloaded", 2);
    let ack = client.send(&with_control_id(&a01, "R4"));
    assert_eq!(field(&ack, "MSA", 1), "AA", "{ack}");
    sub.take(1, Duration::from_secs(20));
    assert!(sub.drain_for(Duration::from_millis(500)).is_empty());
    assert!(
        !d.log_text().contains("O'BRIEN"),
        "no patient data in the log"
    );
}
