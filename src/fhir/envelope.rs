//! The message Bundle around a mapping's resources: `MessageHeader` first, the mapped resources,
//! then a `Provenance` naming the appliance (assembler), the sending organisation and the SHA-256
//! of the original v2 bytes. The envelope is fixed by the London profile, so it lives here in code
//! rather than in every mapping.

use base64::Engine;
use serde_json::{Map, Value, json};

use super::{ids, time};
use crate::config::SiteConfig;
use crate::hl7::Header;
use crate::map::MapResult;

/// Everything the envelope needs besides the mapped resources.
pub struct EnvelopeInput<'a> {
    pub site: &'a SiteConfig,
    pub tz: &'a jiff::tz::TimeZone,
    pub header: &'a Header,
    /// When the appliance durably received the message.
    pub received_at: jiff::Timestamp,
    /// SHA-256 of the original message bytes, as received.
    pub raw_sha256: [u8; 32],
}

/// The FHIR `instant` for a moment, in the site's zone.
pub fn instant(ts: jiff::Timestamp, tz: &jiff::tz::TimeZone) -> String {
    let zoned = ts.to_zoned(tz.clone());
    zoned.strftime("%Y-%m-%dT%H:%M:%S%:z").to_string()
}

/// The Provenance's description of the original message: type, control id, and the segments
/// no mapping rule read (names and counts only), so content the Bundle does not carry is
/// visible at the exchange rather than dropped silently.
fn source_display(h: &Header, unmapped: &[(String, usize)]) -> String {
    let mut s = format!(
        "HL7 v2 {}^{} message, control id {}",
        h.message_type.code, h.message_type.trigger, h.control_id
    );
    if !unmapped.is_empty() {
        s.push_str("; segments not mapped: ");
        let list: Vec<String> = unmapped
            .iter()
            .map(|(n, c)| {
                if *c > 1 {
                    format!("{n} x{c}")
                } else {
                    n.clone()
                }
            })
            .collect();
        s.push_str(&list.join(", "));
    }
    s
}

/// Builds the unsigned Bundle.
pub fn assemble(input: &EnvelopeInput<'_>, mapped: MapResult) -> Value {
    let h = input.header;
    let site = input.site;
    let key = |kind: &str| {
        ids::resource_uuid(&[
            &site.ods_code,
            kind,
            &h.sending_application,
            &h.sending_facility,
            &h.control_id,
        ])
    };
    // Formatted once: the envelope names the appliance five times.
    let appliance = site.appliance_uri();
    let bundle_id = key("Bundle");
    let header_id = key("MessageHeader");
    let provenance_id = key("Provenance");
    let received = instant(input.received_at, input.tz);
    let timestamp =
        time::hl7_to_fhir_instant(&h.timestamp, input.tz, time::AmbiguityPolicy::Earlier)
            .map(|t| t.value)
            .unwrap_or_else(|_| received.clone());

    let reference = |i: usize| {
        mapped
            .resources
            .get(i)
            .map(|r| json!({ "reference": ids::urn(&r.id) }))
    };

    let mut mh = Map::new();
    mh.insert("resourceType".into(), json!("MessageHeader"));
    mh.insert("id".into(), json!(header_id.to_string()));
    mh.insert("meta".into(), json!({ "source": appliance }));
    mh.insert(
        "eventCoding".into(),
        json!({ "system": "http://terminology.hl7.org/CodeSystem/v2-0003", "code": h.message_type.trigger }),
    );
    mh.insert(
        "destination".into(),
        json!([{ "endpoint": site.exchange_endpoint }]),
    );
    if let Some(s) = mapped.sender.and_then(reference) {
        mh.insert("sender".into(), s);
    }
    let mut source = Map::new();
    if !h.sending_application.is_empty() {
        source.insert("name".into(), json!(h.sending_application));
    }
    source.insert("software".into(), json!("hl7-edge"));
    source.insert("version".into(), json!(env!("CARGO_PKG_VERSION")));
    source.insert("endpoint".into(), json!(appliance));
    mh.insert("source".into(), Value::Object(source));
    let focus: Vec<Value> = mapped.focus.iter().filter_map(|i| reference(*i)).collect();
    if !focus.is_empty() {
        mh.insert("focus".into(), Value::Array(focus));
    }

    let mut targets = vec![json!({ "reference": ids::urn(&header_id) })];
    targets.extend(
        mapped
            .resources
            .iter()
            .map(|r| json!({ "reference": ids::urn(&r.id) })),
    );
    let digest = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(input.raw_sha256);
    let mut agents = vec![json!({
        "type": { "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type", "code": "assembler" }] },
        "who": { "type": "Device", "identifier": { "system": "urn:ietf:rfc:3986", "value": appliance } }
    })];
    if let Some(s) = mapped.sender.and_then(reference) {
        agents.push(json!({
            "type": { "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type", "code": "author" }] },
            "who": s
        }));
    }
    let provenance = json!({
        "resourceType": "Provenance",
        "id": provenance_id.to_string(),
        "meta": { "source": appliance },
        "target": targets,
        "recorded": received,
        "agent": agents,
        "entity": [{
            "role": "source",
            "what": {
                "identifier": { "system": "urn:ietf:rfc:3986", "value": format!("ni:///sha-256;{digest}") },
                "display": source_display(h, &mapped.unmapped_segments)
            }
        }]
    });

    // Entries are built by moving the resources in: `json!` would deep-copy every resource
    // (it serialises embedded `Value`s again), which was a third of the mapping benchmark.
    let entry = |full_url: String, resource: Value| {
        let mut e = Map::new();
        e.insert("fullUrl".into(), Value::String(full_url));
        e.insert("resource".into(), resource);
        Value::Object(e)
    };
    let mut entries = Vec::with_capacity(mapped.resources.len() + 2);
    entries.push(entry(ids::urn(&header_id), Value::Object(mh)));
    for r in mapped.resources {
        entries.push(entry(ids::urn(&r.id), Value::Object(r.json)));
    }
    entries.push(entry(ids::urn(&provenance_id), provenance));

    let mut bundle = match json!({
        "resourceType": "Bundle",
        "id": bundle_id.to_string(),
        "meta": { "source": appliance },
        "identifier": { "system": site.local_system("message-id"), "value": h.control_id },
        "type": "message",
        "timestamp": timestamp,
    }) {
        Value::Object(m) => m,
        _ => Map::new(),
    };
    bundle.insert("entry".into(), Value::Array(entries));
    Value::Object(bundle)
}
