//! The mapping language as authors use it: `check`, `map --explain`, `test-mappings`, site
//! overlays, routing and CSV value maps, all through the real binary.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{BIN, resource};
use serde_json::Value;

fn hl7_edge(args: &[&str], dir: &Path) -> Output {
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

fn repo(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// A temporary directory with an empty `maps` folder in it, for mapping files.
fn maps_dir() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tmp");
    let maps = dir.path().join("maps");
    std::fs::create_dir_all(&maps).expect("mkdir");
    (dir, maps)
}

/// A temporary directory holding `maps/m.yaml` with `yaml` in it.
fn mappings_with(yaml: &str) -> (tempfile::TempDir, PathBuf) {
    let (dir, maps) = maps_dir();
    std::fs::write(maps.join("m.yaml"), yaml).expect("write");
    (dir, maps)
}

/// Maps `message` (an HL7 text) with the mappings in `maps` through `hl7-edge map`, and returns
/// the Bundle. Exit 1 only says a toy Bundle misses the London overlay's minimums; the Bundle
/// is still printed.
fn map_bundle(dir: &Path, maps: &Path, message: &str) -> Value {
    let msg = dir.join("m.hl7");
    std::fs::write(&msg, message).expect("write");
    let out = hl7_edge(&["map", s(&msg), "--mappings", s(maps)], dir);
    assert!(
        matches!(out.status.code(), Some(0 | 1)),
        "{}",
        text(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("json")
}

/// A copy of the shipped mappings folder (golden tests included) to change freely.
fn copy_mappings(to: &Path) {
    fn copy(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).expect("mkdir");
        for e in std::fs::read_dir(from).expect("read_dir") {
            let p = e.expect("entry").path();
            let dest = to.join(p.file_name().expect("name"));
            if p.is_dir() {
                copy(&p, &dest);
            } else {
                std::fs::copy(&p, &dest).expect("copy");
            }
        }
    }
    copy(&repo("mappings"), to);
}

#[test]
fn check_reports_fhir_path_errors_with_positions_and_suggestions() {
    let (dir, maps) = mappings_with(
        r#"messages:
  m:
    match: ["ADT^A01"]
    resources:
      - name: patient
        type: Patient
        rules:
          - { set: "nmae[0].family", from: PID-5.1 }
          - { set: name.family, from: PID-5.1 }
          - { set: gender, value: mael }
          - { set: gender, from: PID-8, lookup: sex }
          - { set: birthDate, from: PID-55 }
          - { set: "identifier[+]", from: PID-3 }
          - { set: managingOrganization, ref: nobody }
          - { set: "address[+]", for: "PID-11[*]", map: XPN }
          - { set: active, from: PID-3, fn: [trimm] }
          - { set: "telecom[+].value", from: $phone }
valuemaps:
  sex: { entries: { M: man } }
datatypes:
  XPN:
    type: HumanName
    rules:
      - { set: familly, from: .1 }
overlays:
  - message: mm
    remove: [x]
"#,
    );
    let out = hl7_edge(&["check", "--mappings", s(&maps)], dir.path());
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    let err = text(&out.stderr);
    for expect in [
        "m.yaml:8:20: `nmae` is not an element of Patient; did you mean `name`?",
        "m.yaml:9:20: `name` is a list in Patient: write `name[0]`",
        "m.yaml:10:35: `mael` is not a code of `gender`",
        "did you mean `male`?",
        "m.yaml:11:49: value map `sex` gives codes that `gender` does not allow: man",
        "m.yaml:12:37: unknown segment field `PID-55`",
        "m.yaml:13:20: `identifier[+]` is of type Identifier (a structure)",
        "m.yaml:14:47: `ref: nobody` names no resource",
        "m.yaml:15:57: datatype map `XPN` builds a HumanName, but `address[+]` is of type Address",
        "unknown function `trimm`; did you mean `trim`?",
        "unknown variable `$phone`",
        "m.yaml:24:16: `familly` is not an element of HumanName; did you mean `family`?",
        "m.yaml:26:14: overlay of an unknown message mapping `mm`; did you mean `m`?",
    ] {
        assert!(err.contains(expect), "missing {expect:?} in:\n{err}");
    }
}

/// The golden expectations below `dir`'s `adt*` folders that contain `needle`.
fn count_adt_goldens_with(dir: &Path, needle: &str) -> usize {
    let mut n = 0;
    for e in std::fs::read_dir(dir).expect("read tests").flatten() {
        let p = e.path();
        if p.is_dir()
            && p.file_name()
                .is_some_and(|f| f.to_string_lossy().starts_with("adt"))
        {
            for f in std::fs::read_dir(&p).expect("read").flatten() {
                let f = f.path();
                if f.extension().is_some_and(|x| x == "json")
                    && std::fs::read_to_string(&f).is_ok_and(|t| t.contains(needle))
                {
                    n += 1;
                }
            }
        }
    }
    n
}

#[test]
fn golden_tests_pass_then_fail_with_a_readable_diff_then_update() {
    let dir = tempfile::tempdir().expect("tmp");
    let maps = dir.path().join("mappings");
    copy_mappings(&maps);
    let out = hl7_edge(&["test-mappings", "--mappings", s(&maps)], dir.path());
    assert!(
        out.status.success(),
        "the shipped golden tests pass:\n{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(
        text(&out.stdout).contains("0 failed"),
        "{}",
        text(&out.stdout)
    );

    // An author changes a mapping: the golden test shows exactly what changed.
    let adt = maps.join("messages/adt.yaml");
    let yaml = std::fs::read_to_string(&adt).expect("read");
    std::fs::write(
        &adt,
        yaml.replace(
            "- { set: use, value: usual }",
            "- { set: use, value: secondary }",
        ),
    )
    .expect("write");
    let out = hl7_edge(&["test-mappings", "--mappings", s(&maps)], dir.path());
    assert_eq!(out.status.code(), Some(1));
    let report = text(&out.stdout);
    assert!(report.contains("FAIL"), "{report}");
    let line = |mark: &str, what: &str| {
        report
            .lines()
            .any(|l| l.starts_with(mark) && l.trim_end().ends_with(what))
    };
    assert!(line(" - ", r#""use": "usual","#), "{report}");
    assert!(line(" + ", r#""use": "secondary","#), "{report}");
    // Every ADT golden whose Patient has an MRN changes.
    let adt_cases = count_adt_goldens_with(&maps.join("tests"), r#""use": "usual""#);
    assert!(adt_cases >= 4, "{adt_cases}");
    assert!(
        report.contains(&format!("{adt_cases} failed")),
        "{adt_cases} ADT cases changed: {report}"
    );

    let out = hl7_edge(
        &["test-mappings", "--mappings", s(&maps), "--update"],
        dir.path(),
    );
    assert!(out.status.success(), "{}", text(&out.stdout));
    assert!(
        text(&out.stdout).contains(&format!("{adt_cases} updated")),
        "{}",
        text(&out.stdout)
    );
    let out = hl7_edge(&["test-mappings", "--mappings", s(&maps)], dir.path());
    assert!(out.status.success(), "{}", text(&out.stdout));
}

#[test]
fn explain_names_the_rule_of_each_element_and_what_was_not_read() {
    let dir = tempfile::tempdir().expect("tmp");
    let out = hl7_edge(
        &[
            "map",
            s(&repo("tests/fixtures/adt_a01_uk.hl7")),
            "--mappings",
            s(&repo("mappings")),
            "--explain",
        ],
        dir.path(),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let bundle: Value = serde_json::from_slice(&out.stdout).expect("stdout is still the Bundle");
    assert_eq!(bundle["type"], "message");
    let x = text(&out.stderr);
    assert!(x.contains("explain: message mapping `adt-visit`"), "{x}");
    assert!(
        x.lines()
            .any(|l| l.trim_start().starts_with("gender ") && l.contains("messages/adt.yaml:")),
        "{x}"
    );
    assert!(
        x.lines()
            .any(|l| l.contains("name[0].family") && l.contains("datatypes/people.yaml:")),
        "{x}"
    );
    // EVN is read only when PV1-44 is absent (period.start) or for a transfer (A02): unread here.
    assert!(x.contains("segment EVN (line 2)"), "{x}");
    assert!(x.contains("field PID-1 (line 3)"), "{x}");
    assert!(!x.contains("field PID-8"), "PID-8 is read: {x}");
    assert!(
        !x.contains("O'BRIEN"),
        "no patient data in the explanation: {x}"
    );
}

#[test]
fn a_site_overlay_changes_the_shipped_mappings_without_copying_them() {
    let dir = tempfile::tempdir().expect("tmp");
    let site = dir.path().join("site");
    std::fs::create_dir_all(&site).expect("mkdir");
    std::fs::write(
        site.join("rrv.yaml"),
        r#"# Our PAS sends X for "not known".
overlays:
  - valuemap: administrative-gender
    entries: { X: unknown, F: female }
  - message: adt-visit
    resources:
      - name: patient
        remove_rules: [ethnic-category, gp-practice]
        replace:
          - { id: gender, set: gender, value: other, when: { path: PID-8, exists: true } }
        rules:
          - { set: "meta.tag[+]", join: ["${site.source_system}"], when: { path: PID-3, exists: true } }
          - { set: "identifier[+]", for: "PID-3[CX.5=MR]", map: CX-Identifier }
    add:
      - name: gp
        type: Organization
        each: PD1-3
        rules:
          - set: identifier[0]
            object:
              - { set: system, value: "https://fhir.nhs.uk/Id/ods-organization-code" }
              - { set: value, from: .3 }
    # The shipped GP practice is replaced by ours (same ODS id: both would be one entry).
    remove: [gp-practice]
"#,
    )
    .expect("write");
    // A site variable from the configuration.
    let cfg = dir.path().join("c.toml");
    std::fs::write(
        &cfg,
        format!(
            "site_mappings_dir = {:?}\n[profile]\nuk_core_profiles = false\n[site]\nods_code = \"RRV\"\n[site.variables]\nsource_system = \"pas-x\"\n",
            s(&site)
        ),
    )
    .expect("write");
    let out = hl7_edge(
        &[
            "map",
            s(&repo("tests/fixtures/adt_a01_uk.hl7")),
            "--config",
            s(&cfg),
        ],
        dir.path(),
    );
    // `join` with a constant only is not message data, and meta.tag is a Coding: a type error.
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stdout));
    let err = text(&out.stderr);
    assert!(err.contains("rrv.yaml:12:"), "{err}");
    assert!(err.contains("`meta.tag[+]` is of type Coding"), "{err}");

    let yaml = std::fs::read_to_string(site.join("rrv.yaml")).expect("read");
    std::fs::write(
        site.join("rrv.yaml"),
        yaml.replace(
            r#"- { set: "meta.tag[+]", join: ["${site.source_system}"], when: { path: PID-3, exists: true } }"#,
            r#"- { set: "meta.tag[+].code", value: "${site.source_system}" }"#,
        ),
    )
    .expect("write");
    let out = hl7_edge(
        &[
            "map",
            s(&repo("tests/fixtures/adt_a01_uk.hl7")),
            "--config",
            s(&cfg),
        ],
        dir.path(),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let b: Value = serde_json::from_slice(&out.stdout).expect("json");
    let p = resource(&b, "Patient");
    assert_eq!(p["gender"], "other", "replaced by id");
    assert!(p.get("extension").is_none(), "removed by id: {p}");
    assert_eq!(p["meta"]["tag"][0]["code"], "pas-x");
    assert_eq!(
        p["meta"]["profile"][0],
        "https://fhir.hl7.org.uk/StructureDefinition/UKCore-Patient"
    );
    let ids = p["identifier"].as_array().expect("ids");
    assert!(ids.iter().any(|i| i["assigner"]["display"] == "RRV"), "{p}");
    let gp = resource(&b, "Organization");
    assert!(
        b["entry"]
            .as_array()
            .expect("e")
            .iter()
            .any(|e| e["resource"]["identifier"][0]["value"] == "F83004"),
        "the added GP practice: {gp}"
    );

    // A site variable that the configuration lacks is a load error, not an empty value.
    std::fs::write(&cfg, format!("site_mappings_dir = {:?}\n", s(&site))).expect("write");
    let out = hl7_edge(&["check", "--config", s(&cfg)], dir.path());
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("`${site.source_system}` is not set in the configuration"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn routing_prefers_structure_then_trigger_then_version_and_reads_csv_value_maps() {
    let (dir, maps) = maps_dir();
    let mapping = |name: &str, pattern: &str, versions: &str| {
        format!(
            r#"  {name}:
    match: ["{pattern}"]
    versions: [{versions}]
    resources:
      - name: p
        type: Patient
        rules:
          - {{ set: "identifier[0].value", from: PID-3.1 }}
          - {{ set: "identifier[0].system", value: "urn:route:{name}" }}
          - {{ set: gender, from: PID-8, lookup: sex }}
"#
        )
    };
    std::fs::write(
        maps.join("m.yaml"),
        format!(
            "messages:\n{}{}{}{}valuemaps:\n  sex: {{ csv: tables/sex.csv, default: unknown }}\n",
            mapping("any-adt", "ADT^*", ""),
            mapping("a03", "ADT^A03", ""),
            mapping("a03-uk", "ADT^A03^ADT_A02", ""),
            mapping("a03-v24", "ADT^A03", "\"2.4\""),
        ),
    )
    .expect("write");
    std::fs::create_dir_all(maps.join("tables")).expect("mkdir");
    std::fs::write(
        maps.join("tables/sex.csv"),
        "source,target,display\nM,male,\nF,female,\"Female, adult\"\n",
    )
    .expect("write");
    let route = |msh9: &str, version: &str| -> (String, String) {
        let b = map_bundle(
            dir.path(),
            &maps,
            &format!(
                "MSH|^~\\&|A|B|C|D|20260101000000||{msh9}|1|P|{version}\rPID|1||123||X^Y||19800101|F\r"
            ),
        );
        let p = resource(&b, "Patient");
        (
            p["identifier"][0]["system"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            p["gender"].as_str().unwrap_or_default().to_string(),
        )
    };
    assert_eq!(route("ADT^A03^ADT_A02", "2.4").0, "urn:route:a03-uk");
    assert_eq!(route("ADT^A03^ADT_A03", "2.4").0, "urn:route:a03-v24");
    assert_eq!(route("ADT^A03", "2.5.1").0, "urn:route:a03");
    let (r, g) = route("ADT^A28^ADT_A05", "2.4");
    assert_eq!(r, "urn:route:any-adt");
    assert_eq!(g, "female", "from the CSV table");
}

/// Nothing empty reaches a Bundle (FHIR forbids empty strings, objects and lists): a value
/// map translating to "", an empty profile and a reference with no target leave no trace.
#[test]
fn empty_values_and_unresolved_references_leave_nothing_behind() {
    let (dir, maps) = mappings_with(
        r#"messages:
  adt:
    match: ["ADT^A01"]
    resources:
      - name: p
        type: Patient
        profile: ""
        rules:
          - { set: "identifier[0].value", from: PID-3.1 }
          - { set: "name[0].text", from: PID-8, lookup: blank }
          - { set: "name[0].family", from: PID-5.1 }
      - name: e
        type: Encounter
        rules:
          - { set: "identifier[0].value", from: PV1-19 }
          - { set: subject, ref: p }
          - { set: "participant[+].individual", ref: nobody }
          - { set: "participant[0].type[0].text", value: "kept beside a dropped reference" }
          - { set: "location[+].location", ref: nobody }
      - name: nobody
        type: Practitioner
        when: { path: ZZZ-1, exists: true }
        rules:
          - { set: "identifier[0].value", from: ZZZ-1 }
valuemaps:
  blank: { entries: { F: "" } }
"#,
    );
    let b = map_bundle(
        dir.path(),
        &maps,
        "MSH|^~\\&|A|B|C|D|20260101000000||ADT^A01|1|P|2.4\rPID|1||123||X^Y||19800101|F\rPV1|1|I|||||||||||||||||V1\r",
    );
    let p = resource(&b, "Patient");
    assert_eq!(p["name"][0]["family"], "X", "{p}");
    assert!(p["name"][0].get("text").is_none(), "{p}");
    assert!(p["meta"].get("profile").is_none(), "{p}");
    let e = resource(&b, "Encounter");
    let patient_url = b["entry"]
        .as_array()
        .and_then(|es| {
            es.iter()
                .find(|x| x["resource"]["resourceType"] == "Patient")
        })
        .map(|x| x["fullUrl"].clone())
        .expect("patient entry");
    assert_eq!(e["subject"]["reference"], patient_url, "{e}");
    assert_eq!(
        e["participant"],
        serde_json::json!([{ "type": [{ "text": "kept beside a dropped reference" }] }]),
        "{e}"
    );
    assert!(e.get("location").is_none(), "{e}");
    let body = b.to_string();
    assert!(!body.contains("null") && !body.contains("\"\""), "{body}");
}

/// A resource's JSON starts with `resourceType`, `id` and `meta`, wherever its rules write, and
/// rules writing into `meta` add to what the runtime generates (the declared profile first,
/// then `source`).
#[test]
fn a_resource_starts_with_its_type_id_and_meta_whoever_writes_them() {
    let (dir, maps) = mappings_with(
        r#"messages:
  adt:
    match: ["ADT^A01"]
    resources:
      - name: p
        type: Patient
        profile: "https://example.org/fhir/StructureDefinition/declared"
        rules:
          - { set: "identifier[0].value", from: PID-3.1 }
          - { set: "meta.profile[+]", value: "https://example.org/fhir/StructureDefinition/extra" }
          - { set: "meta.tag[+].code", value: "mapped" }
          - { set: "name[0].family", from: PID-5.1 }
      - name: e
        type: Encounter
        rules:
          - { set: "identifier[0].value", from: PV1-19 }
          - { set: "meta.tag[+].code", value: "first-rule-writes-meta" }
"#,
    );
    let b = map_bundle(
        dir.path(),
        &maps,
        "MSH|^~\\&|A|B|C|D|20260101000000||ADT^A01|1|P|2.4\rPID|1||123||X^Y||19800101|F\rPV1|1|I|||||||||||||||||V1\r",
    );
    let head = |r: &Value| -> Vec<String> {
        r.as_object()
            .map(|o| o.keys().take(3).cloned().collect())
            .unwrap_or_default()
    };
    let p = resource(&b, "Patient");
    assert_eq!(head(p), ["resourceType", "id", "meta"], "{p}");
    assert_eq!(
        p["meta"]["profile"],
        serde_json::json!([
            "https://example.org/fhir/StructureDefinition/declared",
            "https://example.org/fhir/StructureDefinition/extra"
        ]),
        "{p}"
    );
    assert_eq!(p["meta"]["tag"][0]["code"], "mapped", "{p}");
    assert!(p["meta"]["source"].as_str().is_some(), "{p}");
    assert_eq!(p["name"][0]["family"], "X", "{p}");
    let e = resource(&b, "Encounter");
    assert_eq!(head(e), ["resourceType", "id", "meta"], "{e}");
    assert_eq!(e["meta"]["tag"][0]["code"], "first-rule-writes-meta", "{e}");
}

/// Every text function of the library, through `hl7-edge map`: the values are compared with
/// what the reference (README of `mappings/`) says each does.
#[test]
fn the_function_library_transforms_values_as_documented() {
    let rules = [
        (r#"PID-3.1, fn: [trim]"#, "ab c"),
        (r#"PID-3.1, fn: [trim, upper]"#, "AB C"),
        (r#"PID-3.1, fn: [trim, "prefix('urn:x:')"]"#, "urn:x:ab c"),
        (r#"PID-3.1, fn: [trim, "suffix('-z')"]"#, "ab c-z"),
        (r#"PID-3.1, fn: [trim, "replace(' ', '_')"]"#, "ab_c"),
        (r#"PID-3.1, fn: [trim, "split(' ', -1)"]"#, "c"),
        (r#"PID-2, fn: [lower]"#, "untrimmed"),
        (
            r#"PID-2, fn: [hash]"#,
            // sha256("UNTRIMMED")
            "3387f5069f56e5759ff17c02eaf4b9a0524c2106610efcf8792bbf83d14c0098",
        ),
    ];
    let mut yaml = String::from(
        "messages:\n  fns:\n    match: [\"ADT^*\"]\n    resources:\n      - name: p\n        type: Patient\n        rules:\n",
    );
    for (i, (rule, _)) in rules.iter().enumerate() {
        yaml.push_str(&format!(
            "          - {{ set: \"identifier[{i}].value\", from: {rule} }}\n          - {{ set: \"identifier[{i}].system\", value: \"urn:fn:{i}\" }}\n"
        ));
    }
    let (dir, maps) = mappings_with(&yaml);
    let b = map_bundle(
        dir.path(),
        &maps,
        "MSH|^~\\&|A|B|C|D|20260101000000||ADT^A28|1|P|2.4\rPID|1|UNTRIMMED|  ab c  ||X^Y||19800101|F\r",
    );
    let p = resource(&b, "Patient");
    for (i, (rule, want)) in rules.iter().enumerate() {
        let got = p["identifier"]
            .as_array()
            .and_then(|ids| {
                ids.iter()
                    .find(|id| id["system"] == format!("urn:fn:{i}").as_str())
            })
            .map(|id| id["value"].clone());
        assert_eq!(got, Some(Value::from(*want)), "{rule}");
    }
}

#[test]
fn shipped_mappings_note_no_value_map_miss_that_a_later_rule_covers() {
    // A code system name that is not in `coding-system` (LOCAL, HL70063, a lab's own) still gets
    // a system: from the `HL7nnnn` rule or the feed's local system. A note that the element was
    // left out would be false, and 80 of them across the golden inputs hid the notes that matter.
    // The same holds for `practitioner-id-system`, whose miss keeps the site's system, and for
    // `adt-location-status`, which lists every event whose location has a status.
    let dir = tempfile::tempdir().expect("tmp");
    let mut inputs = Vec::new();
    let mut stack = vec![repo("mappings/tests")];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read_dir").flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "hl7") {
                inputs.push(p);
            }
        }
    }
    assert!(inputs.len() > 20, "only {} golden inputs", inputs.len());
    let maps = repo("mappings");
    let mut false_notes = Vec::new();
    for input in &inputs {
        let mut args = vec!["map", s(input), "--mappings", s(&maps)];
        // A case folder with its own mapping (datatypes) loads it on top, as test-mappings does.
        let folder = input.parent().expect("folder");
        let own = std::fs::read_dir(folder)
            .expect("read_dir")
            .flatten()
            .any(|e| e.path().extension().is_some_and(|x| x == "yaml"));
        if own {
            args.extend(["--site-mappings", s(folder)]);
        }
        let out = hl7_edge(&args, dir.path());
        assert!(
            matches!(out.status.code(), Some(0 | 1)),
            "{}: {}",
            input.display(),
            text(&out.stderr)
        );
        for line in text(&out.stderr).lines() {
            if line.starts_with("note:")
                && [
                    "`coding-system`",
                    "`practitioner-id-system`",
                    "`adt-location-status`",
                ]
                .iter()
                .any(|m| line.contains(m))
            {
                false_notes.push(format!("{}: {line}", input.display()));
            }
        }
    }
    assert!(false_notes.is_empty(), "{}", false_notes.join("\n"));
}

#[test]
fn check_explains_yaml_mistakes_in_authors_words() {
    // One mistake per file, so that `check` reports each (a file that does not parse stops at
    // its first error). Each is named at its position, without the parser's own prefix or its
    // internal names, and a misspelt key gets the closest valid one.
    let (dir, maps) = maps_dir();
    let files = [
        (
            "a_list.yaml",
            "messages:\n  m:\n    match: { code: ADT }\n    resources: []\n",
            "a_list.yaml:3:12: expected a list here",
        ),
        (
            "b_key.yaml",
            "messages:\n  m:\n    match: [\"ADT^A01\"]\n    resorces: []\n",
            "b_key.yaml:4:5: unknown field `resorces`, expected one of description, match, versions, focus, sender, constants, vars, groups, resources; did you mean `resources`?",
        ),
        (
            "c_twice.yaml",
            "messages:\n  m:\n    match: [\"ADT^A01\"]\n    match: [\"ADT^A02\"]\n",
            "c_twice.yaml:4:5: `match` is given twice in this map",
        ),
        (
            "d_tab.yaml",
            "messages:\n\tm: {}\n",
            "d_tab.yaml:2:2: a tab in the indentation: YAML indents with spaces only",
        ),
        (
            "e_map.yaml",
            "messages: 5\n",
            "e_map.yaml:1:11: expected a map here",
        ),
        (
            "f_flow.yaml",
            "messages:\n  m:\n    match: [\"ADT^A01\"]\n    resources:\n      - name: p\n        type: Patient\n        rules:\n          - { set: name[0].family, from: PID-5.1 }\n",
            "f_flow.yaml:8:24: while parsing a flow mapping, did not find expected ',' or '}': inside `{ ... }` or `[ ... ]`, quote a value holding `[`, `]`, `{`, `}` or `,` (`set: \"name[0].family\"`)",
        ),
    ];
    for (name, text, _) in &files {
        std::fs::write(maps.join(name), text).expect("write");
    }
    let out = hl7_edge(&["check", "--mappings", s(&maps)], dir.path());
    let err = text(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{err}");
    for (_, _, want) in &files {
        assert!(err.contains(want), "missing `{want}` in:\n{err}");
    }
    for internal in [
        "error: line",
        "sequence start",
        "mapping start",
        "DuplicateKeyPolicy",
    ] {
        assert!(!err.contains(internal), "`{internal}` in:\n{err}");
    }
}

#[test]
fn first_takes_the_first_source_that_has_a_value() {
    let (dir, maps) = mappings_with(
        r#"messages:
  firsts:
    match: ["ADT^*"]
    vars:
      seen: { first: [EVN-6, EVN-2] }
    resources:
      - name: p
        type: Patient
        rules:
          - { set: "identifier[0].value", first: [PID-2, PID-4, PID-3.1], fn: [lower] }
          - { set: "identifier[0].system", value: "urn:first" }
          - { set: "name[0].family", first: [PID-5.3, $seen, PID-5.1] }
          - { set: birthDate, first: [PID-7] }
"#,
    );
    let msg = |pid2: &str, evn6: &str| {
        format!(
            "MSH|^~\\&|A|B|C|D|20260101000000||ADT^A28|1|P|2.4\rEVN|A28|20260101000000||||{evn6}\rPID|1|{pid2}|PID3||SMITH^JOHN||19800101|F\r"
        )
    };
    // PID-2 absent, then `""` (HL7's null counts as absent): the next path. Nothing in any: the
    // element is left out.
    for (pid2, evn6, id, family) in [
        ("", "20251231", Some("pid3"), "20251231"),
        ("\"\"", "", Some("pid3"), "20260101000000"),
        ("ABC", "", Some("abc"), "20260101000000"),
    ] {
        let b = map_bundle(dir.path(), &maps, &msg(pid2, evn6));
        let p = resource(&b, "Patient");
        assert_eq!(
            p["identifier"][0]["value"].as_str(),
            id,
            "PID-2 {pid2:?}: {p}"
        );
        assert_eq!(p["name"][0]["family"], family, "EVN-6 {evn6:?}: {p}");
        assert_eq!(p["birthDate"], "1980-01-01", "{p}");
    }

    // `first` is one source among `from`, `join`, `value`...; it needs at least one path.
    let (dir, maps) = mappings_with(
        r#"messages:
  bad:
    match: ["ADT^*"]
    resources:
      - name: p
        type: Patient
        rules:
          - { set: gender, first: [PID-8], from: PID-8 }
          - { set: birthDate, first: [] }
          - { set: "name[0].family", first: [PID-5.1, PID-55] }
"#,
    );
    let out = hl7_edge(&["check", "--mappings", s(&maps)], dir.path());
    let err = text(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{err}");
    for want in [
        "m.yaml:8:20: `set: gender` needs exactly one source: `from`, `first`, `join`, `value`, `ref`, `object` or `map` (found 2)",
        "m.yaml:9:20: `first:` needs at least one HL7 path or `$var`",
        "unknown segment field `PID-55`",
    ] {
        assert!(err.contains(want), "missing `{want}` in:\n{err}");
    }
}
