//! MLLP ingest against the real binary over real sockets: ACK semantics, framing limits,
//! duplicates across restarts, enhanced mode, batches, charsets, storage limits, shutdown.
//!
//! Most tests need no broker: the daemon stores and ACKs with the MQTT exchange unreachable
//! (`NO_BROKER` is a port nothing listens on), which is also what keeps their outbox full.

mod common;

use std::collections::HashSet;
use std::io::Write;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

const NO_BROKER: &str = "mqtt://127.0.0.1:9";

fn adt(ctrl: &str) -> Vec<u8> {
    format!(
        "MSH|^~\\&|PAS|RRV|HL7EDGE|RRV|20260715101500||ADT^A01^ADT_A01|{ctrl}|P|2.4\rEVN|A01|20260715101500\rPID|1||1234567^^^RRV^MR||DOE^JANE||19800101|F\rPV1|1|I\r"
    )
    .into_bytes()
}

/// An ADT in enhanced mode: MSH-15 = `accept`, MSH-16 = `app`.
fn adt_enhanced(ctrl: &str, version: &str, accept: &str, app: &str) -> Vec<u8> {
    format!(
        "MSH|^~\\&|PAS|RRV|HL7EDGE|RRV|20260715101500||ADT^A01^ADT_A01|{ctrl}|P|{version}|||{accept}|{app}\rEVN|A01|20260715101500\rPID|1||1234567^^^RRV^MR||DOE^JANE||19800101|F\rPV1|1|I\r"
    )
    .into_bytes()
}

/// MSA-1 and MSA-2 of one ACK, whatever its field separator.
fn msa(ack: &str) -> (String, String) {
    for seg in ack.split('\r') {
        if seg.starts_with("MSA") && seg.len() > 3 {
            let sep = seg[3..].chars().next().unwrap_or('|');
            let parts: Vec<&str> = seg.split(sep).collect();
            return (
                parts.get(1).unwrap_or(&"").to_string(),
                parts.get(2).unwrap_or(&"").to_string(),
            );
        }
    }
    (String::new(), String::new())
}

/// The ERR segments' text of an ACK (non-empty when the ACK explains a refusal).
fn err_text(ack: &str) -> String {
    ack.split('\r')
        .filter(|s| s.starts_with("ERR"))
        .collect::<Vec<_>>()
        .join("\r")
}

/// Sends `frame` and then a probe; returns every ACK frame that came before the probe's ACK.
fn send_and_collect(c: &mut MllpClient, frame: &[u8], probe: &str) -> Vec<String> {
    let mut framed = vec![0x0b];
    framed.extend_from_slice(frame);
    framed.extend_from_slice(&[0x1c, 0x0d]);
    c.send_raw(&framed);
    let mut p = vec![0x0b];
    p.extend_from_slice(&adt(probe));
    p.extend_from_slice(&[0x1c, 0x0d]);
    c.send_raw(&p);
    let mut acks = Vec::new();
    loop {
        let ack = c.read_ack();
        if msa(&ack).1 == probe {
            assert_eq!(msa(&ack).0, "AA", "probe {probe}: {ack}");
            return acks;
        }
        acks.push(ack);
        assert!(acks.len() < 1000, "runaway ACKs");
    }
}

/// MSH lines of a file: (MSH-10, MSH-15) of each, read with the line's own separators.
fn msh_lines(bytes: &[u8]) -> Vec<(String, String)> {
    let text = String::from_utf8_lossy(bytes);
    text.split(['\r', '\n'])
        .map(|l| l.trim_start_matches(['\u{feff}', '\u{b}', ' ']))
        .filter(|l| l.starts_with("MSH") && l.len() > 4)
        .map(|l| {
            let sep = l[3..].chars().next().unwrap_or('|');
            let comp = l[4..].chars().next().unwrap_or('^');
            let parts: Vec<&str> = l.split(sep).collect();
            let f = |n: usize| {
                parts
                    .get(n - 1)
                    .map(|v| v.split(comp).next().unwrap_or("").trim().to_string())
                    .unwrap_or_default()
            };
            (f(10), f(15))
        })
        .collect()
}

fn corpus_files(root: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for sub in [
        "microsoft-fhir-converter/messages",
        "python-hl7/messages",
        "python-hl7/fragments",
        "hl7apy/messages",
    ] {
        if let Ok(rd) = std::fs::read_dir(root.join(sub)) {
            let mut v: Vec<PathBuf> = rd
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "hl7"))
                .collect();
            v.sort();
            files.extend(v);
        }
    }
    files
}

#[test]
fn every_corpus_message_gets_aa_or_a_specific_negative_ack() {
    let Some(root) = corpus_dir() else {
        eprintln!("SKIPPED: ../shared/corpus is not beside the clone");
        return;
    };
    let files = corpus_files(&root);
    assert!(
        files.len() > 100,
        "corpus incomplete: {} files",
        files.len()
    );
    let d = Daemon::start(NO_BROKER);
    let mut c = MllpClient::connect(d.addr());
    let mut ack_ids = HashSet::new();
    let mut summary = std::collections::BTreeMap::<String, usize>::new();
    for (i, file) in files.iter().enumerate() {
        let name = file
            .strip_prefix(&root)
            .unwrap_or(file)
            .display()
            .to_string();
        let bytes = std::fs::read(file).expect("read corpus file");
        let mshs = msh_lines(&bytes);
        let acks = send_and_collect(&mut c, &bytes, &format!("PROBE-{i}"));
        let is_batch = {
            let t = String::from_utf8_lossy(&bytes);
            let t = t.trim_start_matches(['\u{feff}', '\r', '\n', ' ']);
            t.starts_with("FHS") || t.starts_with("BHS")
        };
        let fragment = name.contains("fragments");
        if is_batch {
            assert_eq!(acks.len(), 1, "{name}: one batch ACK expected: {acks:?}");
            let ack = &acks[0];
            assert!(
                ack.starts_with("FHS") || ack.starts_with("BHS"),
                "{name}: batch ACK mirrors the envelope: {ack}"
            );
            assert!(
                ack.trim_end().ends_with(|c: char| c.is_ascii_digit()),
                "{name}: batch ACK ends with a trailer count: {ack}"
            );
            // Every message that wants an ACK has one, with its MSA-2.
            for (ctrl, msh15) in &mshs {
                if !matches!(msh15.as_str(), "NE" | "ER" | "SU") && !ctrl.is_empty() {
                    assert!(
                        segments(ack, "MSA")
                            .iter()
                            .any(|m| m.get(2) == Some(&ctrl.as_str())),
                        "{name}: {ctrl} unanswered: {ack}"
                    );
                }
            }
            *summary.entry("batch".into()).or_default() += 1;
            continue;
        }
        match acks.as_slice() {
            [] => {
                let msh15 = mshs.first().map(|m| m.1.as_str()).unwrap_or("");
                assert!(
                    matches!(msh15, "NE" | "ER" | "SU"),
                    "{name}: no ACK although MSH-15 is {msh15:?}"
                );
                *summary
                    .entry(format!("no ACK (MSH-15 {msh15})"))
                    .or_default() += 1;
            }
            [ack] => {
                let (code, ctrl) = msa(ack);
                assert!(
                    ["AA", "AE", "AR", "CA", "CE", "CR"].contains(&code.as_str()),
                    "{name}: MSA-1 {code:?}: {ack}"
                );
                if code != "AA" && code != "CA" {
                    assert!(
                        err_text(ack).len() > 10,
                        "{name}: a negative ACK explains itself in ERR: {ack}"
                    );
                }
                if fragment {
                    assert_eq!(code, "AR", "{name}: a broken fragment is rejected: {ack}");
                }
                if let Some((want, _)) = mshs.first()
                    && !want.is_empty()
                    && code != "AR"
                {
                    assert_eq!(&ctrl, want, "{name}: MSA-2 echoes MSH-10: {ack}");
                }
                if let Some((want, _)) = mshs.first()
                    && !want.is_empty()
                {
                    assert!(!ctrl.is_empty(), "{name}: ACK without MSA-2: {ack}");
                }
                let sep = ack[3..].chars().next().unwrap_or('|');
                let ack_id = ack
                    .split('\r')
                    .next()
                    .unwrap_or("")
                    .split(sep)
                    .nth(9)
                    .unwrap_or("")
                    .to_string();
                assert!(
                    ack_ids.insert(ack_id.clone()),
                    "{name}: ACK MSH-10 {ack_id} reused"
                );
                *summary.entry(code).or_default() += 1;
            }
            more => panic!("{name}: {} ACKs for one message: {more:?}", more.len()),
        }
    }
    eprintln!("corpus: {} files: {summary:?}", files.len());
    let log = d.log_text();
    assert!(!log.contains("panicked"), "{log}");
}

#[test]
fn framing_abuse_never_stops_the_daemon_serving_others() {
    let d = Daemon::start_feed(
        NO_BROKER,
        "",
        "",
        "frame_timeout_secs = 2\nidle_timeout_secs = 30\n",
    );
    // 200 idle connections.
    let idle: Vec<TcpStream> = (0..200)
        .map(|_| TcpStream::connect(d.addr()).expect("idle connection"))
        .collect();
    // A slow sender: one byte every 300 ms inside a frame; it is cut off by the frame deadline.
    let addr = d.addr();
    let slow = std::thread::spawn(move || {
        let mut s = TcpStream::connect(addr).expect("connect");
        let start = Instant::now();
        let msg = adt("SLOW-1");
        let mut sent = 0;
        s.write_all(&[0x0b]).expect("start");
        for b in msg {
            if s.write_all(&[b]).is_err() {
                break;
            }
            sent += 1;
            std::thread::sleep(Duration::from_millis(300));
            if start.elapsed() > Duration::from_secs(15) {
                break;
            }
        }
        (sent, start.elapsed())
    });
    // A connection dropped mid-frame.
    {
        let mut s = TcpStream::connect(d.addr()).expect("connect");
        let msg = adt("HALF-1");
        s.write_all(&[0x0b]).expect("write");
        s.write_all(&msg[..msg.len() / 2]).expect("write");
    }
    let mut c = MllpClient::connect(d.addr());
    // Garbage before and between frames, then a message.
    c.send_raw(b"\r\n  \x00\xffgarbage");
    let ack = c.send(&adt("OK-1"));
    assert_eq!(msa(&ack), ("AA".into(), "OK-1".into()), "{ack}");
    // Oversize (the test feed allows 64 KiB): drained, AR, connection still usable.
    let mut big = adt("BIG-1");
    big.extend(std::iter::repeat_n(b'x', 200_000));
    let ack = c.send(&big);
    assert_eq!(msa(&ack).0, "AR");
    assert!(err_text(&ack).contains("exceeds"), "{ack}");
    let ack = c.send(&adt("OK-2"));
    assert_eq!(msa(&ack), ("AA".into(), "OK-2".into()));
    // A restart byte inside a frame drops the partial body; the whole one is processed.
    c.send_raw(b"\x0bMSH|^~\\&|PARTIAL");
    let ack = c.send(&adt("OK-3"));
    assert_eq!(msa(&ack), ("AA".into(), "OK-3".into()));

    let (sent, took) = slow.join().expect("slow sender");
    assert!(
        took < Duration::from_secs(10),
        "the slow sender was cut off by the 2 s frame deadline ({sent} bytes in {took:?})"
    );
    // Still serving, with the idle connections open.
    let ack = MllpClient::connect(d.addr()).send(&adt("OK-4"));
    assert_eq!(msa(&ack).0, "AA");
    drop(idle);
    let log = d.log_text();
    assert!(log.contains("frame not completed in time"), "{log}");
    assert!(log.contains("in the middle of a message"), "{log}");
    let mut d = d;
    assert!(d.stop());
    let ids = d.stored_control_ids();
    assert_eq!(
        ids,
        vec!["OK-1", "OK-2", "OK-3", "OK-4"],
        "nothing partial was stored"
    );
}

#[test]
fn duplicates_survive_a_restart_and_conflicts_follow_the_policy() {
    let mllp_send = venv_bin("mllp_send")
        .expect("python-hl7's mllp_send is missing: run scripts/test.sh, which installs it");
    let mut d = Daemon::start_feed(
        NO_BROKER,
        "",
        "[duplicates]\non_conflict = \"reject\"\n",
        "",
    );
    let dir = d.dir.path().to_path_buf();
    let file = dir.join("dup.hl7");
    std::fs::write(&file, adt("DUP-1")).expect("write");
    let send = |port: u16| {
        let out = Command::new(&mllp_send)
            .args(["--loose", "--port", &port.to_string(), "--file"])
            .arg(&file)
            .arg("127.0.0.1")
            .output()
            .expect("run mllp_send");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).replace('\n', "\r")
    };
    let first = send(d.mllp_port);
    assert_eq!(msa(&first), ("AA".into(), "DUP-1".into()), "{first}");
    assert!(d.stop());
    d.start_again();
    let again = send(d.mllp_port);
    assert_eq!(
        msa(&again),
        ("AA".into(), "DUP-1".into()),
        "re-sent after a restart: {again}"
    );
    // The same control id with different content is refused (policy reject) with error 205.
    let mut other = adt("DUP-1");
    other.extend_from_slice(b"NTE|1||changed\r");
    let ack = MllpClient::connect(d.addr()).send(&other);
    assert_eq!(msa(&ack).0, "AR", "{ack}");
    assert!(err_text(&ack).contains("205"), "{ack}");
    assert!(d.log_text().contains("duplicate of a stored message"));
    assert!(d.stop());
    assert_eq!(d.stored_control_ids(), vec!["DUP-1"], "stored once");
}

#[test]
fn enhanced_mode_honours_msh15() {
    let d = Daemon::start(NO_BROKER);
    let mut c = MllpClient::connect(d.addr());
    // AL: commit accept, and the ACK asks for no acknowledgement itself.
    let ack = c.send(&adt_enhanced("ENH-AL", "2.5", "AL", "NE"));
    assert_eq!(msa(&ack), ("CA".into(), "ENH-AL".into()), "{ack}");
    assert_eq!(field(&ack, "MSH", 15), "NE", "{ack}");
    assert_eq!(field(&ack, "MSH", 16), "NE", "{ack}");
    // Only MSH-16 valued: still enhanced mode, answered.
    let ack = c.send(&adt_enhanced("ENH-APP", "2.5", "", "AL"));
    assert_eq!(msa(&ack).0, "CA", "{ack}");
    // Unsupported version in enhanced mode: commit reject.
    let ack = c.send(&adt_enhanced("ENH-V9", "9.9", "AL", "NE"));
    assert_eq!(msa(&ack), ("CR".into(), "ENH-V9".into()), "{ack}");
    assert!(err_text(&ack).contains("203"), "{ack}");
    // NE: never; ER: only errors; SU: only success. The probe proves nothing else came.
    for (ctrl, version, accept, expect) in [
        ("ENH-NE", "2.5", "NE", None),
        ("ENH-ER-OK", "2.5", "ER", None),
        ("ENH-ER-BAD", "9.9", "ER", Some("CR")),
        ("ENH-SU-OK", "2.5", "SU", Some("CA")),
        ("ENH-SU-BAD", "9.9", "SU", None),
    ] {
        let acks = send_and_collect(
            &mut c,
            &adt_enhanced(ctrl, version, accept, "NE"),
            &format!("P-{ctrl}"),
        );
        match expect {
            None => assert!(acks.is_empty(), "{ctrl}: {acks:?}"),
            Some(code) => {
                assert_eq!(acks.len(), 1, "{ctrl}: {acks:?}");
                assert_eq!(msa(&acks[0]), (code.to_string(), ctrl.to_string()));
            }
        }
    }
    let mut d = d;
    assert!(d.stop());
    let ids = d.stored_control_ids();
    for want in ["ENH-AL", "ENH-APP", "ENH-NE", "ENH-ER-OK", "ENH-SU-OK"] {
        assert!(ids.iter().any(|i| i == want), "{want} stored: {ids:?}");
    }
    for refused in ["ENH-ER-BAD", "ENH-SU-BAD", "ENH-V9"] {
        assert!(
            !ids.iter().any(|i| i == refused),
            "{refused} not stored: {ids:?}"
        );
    }
}

#[test]
fn batches_are_unpacked_and_answered_with_a_batch_ack() {
    let d = Daemon::start(NO_BROKER);
    let mut c = MllpClient::connect(d.addr());
    let m = |ctrl: &str| String::from_utf8(adt(ctrl)).expect("ascii");
    let file = format!(
        "FHS|^~\\&|PAS|RRV|HL7EDGE|RRV|20260715||batch.hl7||FILE-7\rBHS|^~\\&|PAS|RRV|HL7EDGE|RRV|20260715||||BATCH-1\r{}{}BTS|2\rBHS|^~\\&|PAS|RRV|HL7EDGE|RRV|20260715||||BATCH-2\r{}MSH|^~\\&|PAS|RRV|X|Y|2026||ADT^A01|B-BAD|P|9.9\rBTS|2\rFTS|2\r",
        m("B-1"),
        m("B-2"),
        m("B-3")
    );
    let ack = c.send(file.as_bytes());
    let segs: Vec<&str> = ack.split_terminator('\r').collect();
    assert!(
        segs[0].starts_with("FHS|^~\\&|HL7EDGE|RRV|PAS|RRV|"),
        "{ack}"
    );
    assert!(
        segs[0].ends_with("|FILE-7"),
        "FHS-12 references the incoming FHS-11: {ack}"
    );
    let bhs = segments(&ack, "BHS");
    assert_eq!(bhs.len(), 2, "{ack}");
    // parts[0] is the name, parts[1] the encoding characters: BHS-n is parts[n - 1].
    assert_eq!(
        bhs[0][11], "BATCH-1",
        "BHS-12 references the incoming BHS-11"
    );
    assert_eq!(bhs[1][11], "BATCH-2");
    let msas = segments(&ack, "MSA");
    let got: Vec<(&str, &str)> = msas.iter().map(|s| (s[1], s[2])).collect();
    assert_eq!(
        got,
        vec![("AA", "B-1"), ("AA", "B-2"), ("AA", "B-3"), ("AR", "B-BAD")]
    );
    assert_eq!(
        segments(&ack, "BTS")
            .iter()
            .map(|s| s[1])
            .collect::<Vec<_>>(),
        vec!["2", "2"]
    );
    assert_eq!(segs.last().copied(), Some("FTS|2"));
    // A malformed envelope (BHS inside an open batch): every message refused, none stored.
    let bad = format!(
        "BHS|^~\\&|PAS|RRV|||2026||||NEST\r{}BHS|^~\\&|PAS|RRV|||2026||||NEST2\rBTS|1\r",
        m("N-1")
    );
    let ack = c.send(bad.as_bytes());
    let msas = segments(&ack, "MSA");
    assert_eq!(msas.len(), 1, "{ack}");
    assert_eq!((msas[0][1], msas[0][2]), ("AR", "N-1"));
    assert!(ack.contains("BHS inside a batch"), "{ack}");
    let mut d = d;
    assert!(d.stop());
    assert_eq!(d.stored_control_ids(), vec!["B-1", "B-2", "B-3"]);
}

#[test]
fn ack_is_sent_in_the_senders_charset() {
    let d = Daemon::start(NO_BROKER);
    let mut c = MllpClient::connect(d.addr());
    // Latin-1, declared in MSH-18, with a non-ASCII sending application.
    let mut msg = b"MSH|^~\\&|P\xC4S|RRV|EDGE|RRV|2026||ADT^A01^ADT_A01|CS-1|P|2.5||||||8859/1\rPID|1||1^^^RRV^MR||M\xDCLLER^HANS\r".to_vec();
    c.send_raw(&[0x0b]);
    c.send_raw(&msg);
    c.send_raw(&[0x1c, 0x0d]);
    let ack = c.read_ack_bytes();
    assert!(
        ack.starts_with(b"MSH|^~\\&|EDGE|RRV|P\xC4S|RRV|"),
        "{}",
        String::from_utf8_lossy(&ack)
    );
    assert!(ack.windows(7).any(|w| w == b"|8859/1"), "MSH-18 echoed");
    // UTF-16LE in, UTF-16LE out.
    msg = "MSH|^~\\&|PAS|RRV|EDGE|RRV|2026||ADT^A01^ADT_A01|CS-2|P|2.5||||||UNICODE\rPID|1||1^^^RRV^MR||ZOË^A\r"
        .encode_utf16()
        .flat_map(u16::to_le_bytes)
        .collect();
    c.send_raw(&[0x0b]);
    c.send_raw(&msg);
    c.send_raw(&[0x1c, 0x0d]);
    let ack = c.read_ack_bytes();
    let units: Vec<u16> = ack
        .chunks(2)
        .map(|p| u16::from_le_bytes([p[0], p.get(1).copied().unwrap_or(0)]))
        .collect();
    let text = String::from_utf16(&units).expect("UTF-16 ACK");
    assert_eq!(msa(&text), ("AA".into(), "CS-2".into()), "{text}");
}

#[test]
fn full_storage_answers_a_negative_ack() {
    // The outbox byte limit (1 MiB, the minimum) with no broker to drain it.
    let d = Daemon::start_with(NO_BROKER, "[outbox]\nmax_bytes = 1048576\n");
    let mut c = MllpClient::connect(d.addr());
    let mut refused = None;
    for i in 0..40 {
        let mut m = adt(&format!("FULL-{i}"));
        m.extend(b"NTE|1||");
        m.extend(std::iter::repeat_n(b'x', 60_000));
        m.push(b'\r');
        let ack = c.send(&m);
        match msa(&ack).0.as_str() {
            "AA" => {}
            "AE" => {
                refused = Some((i, ack));
                break;
            }
            other => panic!("unexpected {other}: {ack}"),
        }
    }
    let (i, ack) = refused.expect("the outbox filled up within 40 messages of 60 kB");
    assert!(i >= 10, "about 17 fit in 1 MiB, refused at {i}");
    assert!(err_text(&ack).contains("storage full"), "{ack}");
    assert_eq!(msa(&ack).1, format!("FULL-{i}"));
    drop(d);
    // The free-disk guard: demand more free space than any disk has.
    let d = Daemon::start_with(
        NO_BROKER,
        "[outbox]\nmin_free_disk_bytes = 9000000000000000000\n",
    );
    let ack = MllpClient::connect(d.addr()).send(&adt("DISK-1"));
    assert_eq!(msa(&ack).0, "AE", "{ack}");
    assert!(err_text(&ack).contains("disk nearly full"), "{ack}");
}

#[test]
fn ack_after_mapping_refuses_what_cannot_be_mapped() {
    let d = Daemon::start_feed(NO_BROKER, "", "ack_after = \"mapping\"\n", "");
    let mut c = MllpClient::connect(d.addr());
    let ack = c.send(&fixture("adt_a01_uk.hl7"));
    assert_eq!(msa(&ack).0, "AA", "{ack}");
    let ack = c.send(b"MSH|^~\\&|PAS|RRV|EDGE|RRV|2026||ZZZ^Z99^ZZZ_Z99|MAP-1|P|2.5\rZZZ|1\r");
    assert_eq!(msa(&ack), ("AE".into(), "MAP-1".into()), "{ack}");
    assert!(err_text(&ack).contains("cannot be mapped"), "{ack}");
    let mut d = d;
    assert!(d.stop());
    assert_eq!(
        d.stored_control_ids(),
        vec!["MSG00001"],
        "the refused message is not stored"
    );
}

#[test]
fn allow_list_refuses_other_senders_with_ar() {
    let d = Daemon::start_feed(NO_BROKER, "", "", "allow = [\"10.0.0.0/8\"]\n");
    let mut c = MllpClient::connect_with_timeout(d.addr(), Duration::from_secs(10));
    let ack = c.send(&adt("ACL-1"));
    assert_eq!(msa(&ack), ("AR".into(), "ACL-1".into()), "{ack}");
    assert!(err_text(&ack).contains("not allowed"), "{ack}");
    let rest = c.read_to_close().expect("the server closes the connection");
    assert!(rest.is_empty());
    let mut d = d;
    assert!(d.stop());
    assert!(d.stored_control_ids().is_empty());
}

#[test]
fn sigterm_under_load_loses_nothing_acked_and_acks_nothing_partial() {
    let mut d = Daemon::start(NO_BROKER);
    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut senders = Vec::new();
    for t in 0..8 {
        let (addr, acked, stop) = (d.addr(), acked.clone(), stop.clone());
        senders.push(std::thread::spawn(move || {
            let Ok(mut s) = TcpStream::connect(addr) else {
                return;
            };
            let _ = s.set_read_timeout(Some(Duration::from_secs(20)));
            let mut c = MllpClientWrap(s.try_clone().expect("clone"));
            for i in 0.. {
                if stop.load(Ordering::Relaxed) && i % 2 == 1 {
                    // Leave a half-sent frame behind.
                    let m = adt(&format!("T{t}-HALF"));
                    let _ = s.write_all(&[0x0b]);
                    let _ = s.write_all(&m[..20]);
                    return;
                }
                let ctrl = format!("T{t}-{i}");
                match c.send(&adt(&ctrl)) {
                    Some(ack) if msa(&ack) == ("AA".into(), ctrl.clone()) => {
                        acked.lock().expect("lock").push(ctrl)
                    }
                    _ => return,
                }
            }
        }));
    }
    wait_for("some load", Duration::from_secs(20), || {
        (acked.lock().expect("lock").len() > 200).then_some(())
    });
    stop.store(true, Ordering::Relaxed);
    d.sigterm();
    let (ok, took) = d.wait_exit(Duration::from_secs(25));
    assert!(ok, "clean exit:\n{}", d.log_text());
    assert!(took < Duration::from_secs(10), "stopped in {took:?}");
    for s in senders {
        let _ = s.join();
    }
    let stored: HashSet<String> = d.stored_control_ids().into_iter().collect();
    let acked = acked.lock().expect("lock").clone();
    for a in &acked {
        assert!(stored.contains(a), "{a} was ACKed but is not stored");
    }
    assert!(
        !stored.iter().any(|s| s.ends_with("HALF")),
        "a partial frame was stored"
    );
    eprintln!(
        "acked {} before SIGTERM, stored {}, stopped in {took:?}",
        acked.len(),
        stored.len()
    );
}

/// A tiny MLLP client for threads: `None` when the connection ends.
struct MllpClientWrap(TcpStream);

impl MllpClientWrap {
    fn send(&mut self, msg: &[u8]) -> Option<String> {
        use std::io::Read;
        let mut framed = vec![0x0b];
        framed.extend_from_slice(msg);
        framed.extend_from_slice(&[0x1c, 0x0d]);
        self.0.write_all(&framed).ok()?;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 1024];
        while !buf.ends_with(&[0x1c, 0x0d]) {
            let n = self.0.read(&mut chunk).ok()?;
            if n == 0 {
                return None;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        let start = buf.iter().position(|b| *b == 0x0b)?;
        Some(String::from_utf8_lossy(&buf[start + 1..buf.len() - 2]).into_owned())
    }
}
