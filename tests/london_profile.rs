//! Issue 6's proof, through the real binary: every golden Bundle and every Bundle made from the
//! third-party corpus passes an independent FHIR R4 validator (fhir.resources, Python) besides
//! hl7-edge's own; every corpus message that does not map is quarantined with a specific
//! reason; and the Europe/London clock-change policy tags, or refuses, what it had to guess.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn hl7_edge(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hl7-edge"))
        .args(args)
        .current_dir(cwd)
        .env_remove("RUST_LOG")
        .output()
        .expect("run hl7-edge")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn json_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).expect("read dir").flatten() {
        let p = e.path();
        if p.is_dir() {
            json_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "json") {
            out.push(p);
        }
    }
}

#[test]
fn every_golden_bundle_passes_the_independent_validator() {
    let mut files = Vec::new();
    json_files(&root().join("mappings/tests"), &mut files);
    assert!(
        files.len() >= 5,
        "expected the shipped golden tests, found {}",
        files.len()
    );
    let bundles: Vec<serde_json::Value> = files
        .iter()
        .map(|f| {
            serde_json::from_str(&std::fs::read_to_string(f).expect("read golden"))
                .unwrap_or_else(|e| panic!("{}: {e}", f.display()))
        })
        .collect();
    common::assert_valid_fhir(&bundles);
}

/// One line of `hl7-edge survey` output.
struct Line {
    ok: bool,
    name: String,
    rest: String,
}

fn survey_lines(out: &str) -> Vec<Line> {
    out.lines()
        .filter_map(|l| {
            let (ok, rest) = if let Some(r) = l.strip_prefix("ok ") {
                (true, r)
            } else if let Some(r) = l.strip_prefix("quarantined ") {
                (false, r)
            } else {
                return None;
            };
            let rest = rest.trim_start();
            let (name, rest) = rest.split_once("  ").unwrap_or((rest, ""));
            Some(Line {
                ok,
                name: name.to_string(),
                rest: rest.trim().to_string(),
            })
        })
        .collect()
}

/// `hl7-edge [--config CONFIG] survey <the corpus> --bundles FILE`: (report, outcomes, Bundles).
fn survey_corpus(config: Option<&str>) -> (String, Vec<Line>, Vec<serde_json::Value>) {
    let corpus = common::corpus_dir().expect("the corpus is in ../shared/corpus beside the clone");
    let work = tempfile::tempdir().expect("tempdir");
    let bundles = work.path().join("bundles.jsonl");
    let dirs = [
        corpus.join("microsoft-fhir-converter/messages"),
        corpus.join("python-hl7/messages"),
        corpus.join("hl7apy/messages"),
    ];
    let mut args = Vec::new();
    if let Some(c) = config {
        let path = work.path().join("config.toml");
        std::fs::write(&path, c).expect("write config");
        args.push("--config".to_string());
        args.push(path.display().to_string());
    }
    args.push("survey".to_string());
    args.extend(dirs.iter().map(|d| d.display().to_string()));
    args.push("--bundles".into());
    args.push(bundles.display().to_string());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = hl7_edge(&args, work.path());
    let report = text(&out);
    assert!(out.status.success(), "survey failed:\n{report}");

    let files: usize = dirs
        .iter()
        .map(|d| std::fs::read_dir(d).expect("corpus folder").count())
        .sum();
    let lines = survey_lines(&report);
    assert!(
        lines.len() >= files,
        "{} outcomes for {files} files:\n{report}",
        lines.len()
    );
    for l in lines.iter().filter(|l| !l.ok) {
        // `<TYPE>  <reason>`: the reason names what is wrong, not just "failed".
        let reason = l.rest.split_once("  ").map(|(_, r)| r).unwrap_or("");
        assert!(
            reason.len() > 15 && !reason.contains("internal error"),
            "{}: quarantined without a specific reason: {:?}",
            l.name,
            l.rest
        );
    }
    let produced: Vec<serde_json::Value> = std::fs::read_to_string(&bundles)
        .expect("bundles file")
        .lines()
        .map(|l| serde_json::from_str(l).expect("bundle JSON"))
        .collect();
    assert_eq!(
        produced.len(),
        lines.iter().filter(|l| l.ok).count(),
        "one Bundle per valid message"
    );
    (report, lines, produced)
}

#[test]
fn the_corpus_maps_to_valid_bundles_or_is_quarantined_with_a_specific_reason() {
    // The London overlay as shipped: the corpus is American and international (no NHS numbers,
    // no UK addresses), so what maps is held back for the overlay's minimums, each with its reason.
    let (report, lines, produced) = survey_corpus(None);
    if !produced.is_empty() {
        common::assert_valid_fhir(&produced);
    }
    let held_back = lines
        .iter()
        .filter(|l| !l.ok && l.rest.contains("London profile:"))
        .count();
    assert!(
        held_back >= 55,
        "the London minimums should hold back the corpus's non-UK patients:\n{report}"
    );

    // With the overlay's minimums relaxed (a site may), the same messages show what the mappings
    // make of foreign feeds: FHIR R4 Bundles that both validators accept.
    let relaxed = "[profile]\npatient_nhs_number = false\npatient_mrn = false\npatient_name = false\n\
                   patient_gender_birth_date = false\npatient_address = false\nencounter_minimums = false\n";
    let (report, lines, produced) = survey_corpus(Some(relaxed));
    let ok = lines.iter().filter(|l| l.ok).count();
    // 55 when this was written (every ADT of a covered trigger and every ORU^R01, less two A01s
    // that are only an MSH); a regression in routing, mapping or validation shows here.
    assert!(ok >= 55, "only {ok} corpus messages mapped:\n{report}");
    common::assert_valid_fhir(&produced);
    eprintln!("{report}");
}

#[test]
fn broken_fragments_are_quarantined_never_mapped_and_never_crash() {
    let corpus = common::corpus_dir().expect("the corpus is in ../shared/corpus beside the clone");
    let work = tempfile::tempdir().expect("tempdir");
    let dir = corpus.join("python-hl7/fragments");
    let out = hl7_edge(&["survey", &dir.display().to_string()], work.path());
    let report = text(&out);
    assert!(out.status.success(), "survey failed:\n{report}");
    let lines = survey_lines(&report);
    assert!(!lines.is_empty(), "{report}");
    for l in &lines {
        assert!(
            !l.ok,
            "{} is a broken fragment but mapped:\n{report}",
            l.name
        );
    }
}

/// An A01 whose admission time is 01:30 on 25 October 2026, the repeated hour of the autumn
/// clock change in Europe/London.
fn clock_change_message() -> Vec<u8> {
    common::with_fields(
        &common::fixture("adt_a01_uk.hl7"),
        "PV1",
        &[(44, "202610250130")],
    )
}

#[test]
fn a_local_time_in_the_repeated_hour_is_tagged_or_refused_by_policy() {
    let work = tempfile::tempdir().expect("tempdir");
    let msg = work.path().join("a01.hl7");
    std::fs::write(&msg, clock_change_message()).expect("write");

    // Default policy `earlier`: BST (+01:00), and the Encounter says so in a tag.
    let out = hl7_edge(&["map", &msg.display().to_string()], work.path());
    assert!(out.status.success(), "{}", text(&out));
    let bundle: serde_json::Value = serde_json::from_slice(&out.stdout).expect("Bundle JSON");
    let encounter = common::resource(&bundle, "Encounter");
    assert_eq!(encounter["period"]["start"], "2026-10-25T01:30:00+01:00");
    let tags = encounter["meta"]["tag"].as_array().expect("meta.tag");
    assert!(
        tags.iter().any(|t| t["code"] == "clock-change-ambiguous"
            && t["system"]
                .as_str()
                .is_some_and(|s| s.ends_with("/CodeSystem/hl7-edge-flag"))),
        "{tags:?}"
    );

    // `map` under a site configuration with this policy.
    let map_with = |policy: &str| {
        let conf = work.path().join(format!("{policy}.toml"));
        std::fs::write(&conf, format!("[site]\nclock_change = \"{policy}\"\n")).expect("write");
        let (conf, msg) = (conf.display().to_string(), msg.display().to_string());
        hl7_edge(&["--config", &conf, "map", &msg], work.path())
    };

    // `later`: GMT (+00:00).
    let out = map_with("later");
    assert!(out.status.success(), "{}", text(&out));
    let later = String::from_utf8_lossy(&out.stdout);
    assert!(later.contains("2026-10-25T01:30:00+00:00"), "{later}");

    // `reject`: the message would be quarantined, with a reason that names the rule, not the time.
    let out = map_with("reject");
    let err = text(&out);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("refused by policy"), "{err}");
    assert!(
        err.contains("adt.yaml:"),
        "the reason names the rule: {err}"
    );
    assert!(!err.contains("202610250130"), "no values in reasons: {err}");
}

#[test]
fn a_feed_variable_that_is_not_a_site_variable_is_an_error_at_start() {
    let work = tempfile::tempdir().expect("tempdir");
    let adapters = work.path().join("adapters");
    std::fs::create_dir(&adapters).expect("mkdir");
    let conf = work.path().join("config.toml");
    std::fs::write(
        &conf,
        format!("adapters_dir = \"{}\"\n", adapters.display()),
    )
    .expect("write");
    // `hl7-edge check` with a feed whose `[variables]` table is `variables`.
    let check_with = |variables: &str| {
        std::fs::write(
            adapters.join("pas.toml"),
            format!("name = \"pas\"\n[variables]\n{variables}\n[transport]\nkind = \"mllp\"\nbind = \"127.0.0.1:0\"\n"),
        )
        .expect("write");
        hl7_edge(
            &["--config", &conf.display().to_string(), "check"],
            work.path(),
        )
    };

    let out = check_with("nhs_numbr_field = \"PID-19\"");
    let t = text(&out);
    assert!(!out.status.success(), "{t}");
    assert!(t.contains("nhs_numbr_field"), "{t}");
    assert!(t.contains("nhs_number_field"), "lists the real names: {t}");

    // A known variable with a value outside its allowed set is an error too.
    let out = check_with("nhs_number_field = \"PID-4\"");
    let t = text(&out);
    assert!(!out.status.success(), "{t}");
    assert!(t.contains("PID-19"), "names the allowed values: {t}");
}

/// The ORU mapping carries its own copy of the Patient's identifier rules (the mapping language
/// cannot share a resource between message mappings); this keeps the copy from drifting away
/// from the ADT original, so a lab result and an admission name the same Patient.
#[test]
fn the_oru_patient_identifier_rules_are_the_adt_ones() {
    let rules = |file: &str| -> String {
        let text = std::fs::read_to_string(root().join(file)).expect("mapping");
        let patient = text
            .find("      - name: patient\n")
            .expect("a patient resource");
        let from = patient
            + text[patient..]
                .find("          - id: nhs-number\n")
                .expect("the NHS number rule");
        let to = from
            + text[from..]
                .find("          - { id: name,")
                .expect("the name rule after the identifiers");
        text[from..to].to_string()
    };
    let adt = rules("mappings/messages/adt.yaml");
    let oru = rules("mappings/messages/oru.yaml");
    assert!(adt.contains("nhs_field"), "{adt}");
    assert_eq!(
        adt, oru,
        "copy the identifier rules of messages/adt.yaml's patient into messages/oru.yaml"
    );
}

/// The operator's loop for a feed that sends the NHS number where the site does not expect it:
/// the daemon ACKs and quarantines (never forwards) the message, `hl7-edge quarantine` shows why,
/// the feed is told where its NHS number is (`[variables] nhs_number_field`), and
/// `quarantine retry --all` sends the stored message on: nothing re-sent by the hospital.
#[test]
fn quarantined_messages_are_listed_then_retried_after_the_feed_is_fixed() {
    use common::{Broker, Daemon, MllpClient, Subscriber, field, fixture};
    use std::time::Duration;
    let t = Duration::from_secs(20);
    let broker = Broker::start();
    let sub = Subscriber::start(broker.port, "hl7-edge/#");
    let mut d = Daemon::start(&broker.url());

    // The NHS number in PID-19 (and not in PID-3), as some older PAS feeds send it.
    let msg = common::with_fields(
        &fixture("adt_a01_uk.hl7"),
        "PID",
        &[(3, "RRV1234567^^^RRV^MR"), (19, "944 930 5552")],
    );
    let mut c = MllpClient::connect(d.addr());
    let ack = c.send(&msg);
    assert_eq!(
        field(&ack, "MSA", 1),
        "AA",
        "stored, so acknowledged: {ack}"
    );
    drop(c);

    let json = |out: std::process::Output| -> serde_json::Value {
        assert!(out.status.success(), "{}", text(&out));
        serde_json::from_slice(&out.stdout).expect("JSON")
    };
    let listed = common::wait_for("the message quarantined", t, || {
        let v = json(d.cli(&["quarantine", "list", "--json"]));
        v.as_array().filter(|a| a.len() == 1).map(|a| a[0].clone())
    });
    let reason = listed["reason"].as_str().expect("reason");
    assert!(reason.contains("no valid NHS number"), "{reason}");
    assert!(!reason.contains("9449305552"), "no patient data: {reason}");
    let id = listed["id"].as_u64().expect("id").to_string();
    let shown = json(d.cli(&["quarantine", "show", &id, "--json"]));
    assert_eq!(shown["state"], "quarantined", "{shown}");
    let plain = text(&d.cli(&["quarantine", "list"]));
    assert!(
        plain.contains("quarantined") && plain.contains("no valid NHS number"),
        "{plain}"
    );
    assert!(
        sub.drain_for(Duration::from_millis(300)).is_empty(),
        "nothing forwarded"
    );

    // The fix: this feed sends its NHS number in PID-19.
    assert!(d.stop(), "clean stop");
    d.feed_extra = "[variables]\nnhs_number_field = \"PID-19\"\n".into();
    d.write_config();
    d.start_again();
    let out = d.cli(&["quarantine", "retry", "--all"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains(&format!("#{id} is now received")),
        "{}",
        text(&out)
    );

    let got = sub.take(1, t);
    let bundle: serde_json::Value = serde_json::from_str(&got[0].1).expect("Bundle");
    let patient = common::resource(&bundle, "Patient");
    assert!(
        patient["identifier"]
            .as_array()
            .expect("ids")
            .iter()
            .any(|i| i["system"] == "https://fhir.nhs.uk/Id/nhs-number"
                && i["value"] == "9449305552"),
        "{patient}"
    );
    let left = json(d.cli(&["quarantine", "list", "--json"]));
    assert_eq!(left.as_array().map(Vec::len), Some(0), "{left}");
    let nothing = d.cli(&["quarantine", "retry", "--all"]);
    assert!(text(&nothing).contains("no quarantined records"));
}
