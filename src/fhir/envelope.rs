//! The message Bundle around a mapping's resources: `MessageHeader` first, the mapped resources,
//! then a `Provenance` naming the appliance (assembler), the sending organisation and the SHA-256
//! of the original v2 bytes. The envelope is fixed by the London profile, so it lives here in code
//! rather than in every mapping.

use super::tree::{Json, Obj, obj};
use base64::Engine;

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
pub fn assemble(input: &EnvelopeInput<'_>, mapped: MapResult) -> Json {
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

    let reference_to = |id: &uuid::Uuid| obj([("reference", ids::urn(id).into())]);
    let reference = |i: usize| mapped.resources.get(i).map(|r| reference_to(&r.id));
    let meta = || obj([("source", appliance.as_str().into())]);
    let device = || {
        obj([
            ("type", "Device".into()),
            (
                "identifier",
                obj([
                    ("system", "urn:ietf:rfc:3986".into()),
                    ("value", appliance.as_str().into()),
                ]),
            ),
        ])
    };
    let participant = |code: &str| {
        obj([(
            "coding",
            Json::Arr(vec![obj([
                (
                    "system",
                    "http://terminology.hl7.org/CodeSystem/provenance-participant-type".into(),
                ),
                ("code", code.into()),
            ])]),
        )])
    };

    let mut mh = Obj::with_capacity(9);
    mh.insert("resourceType", "MessageHeader");
    mh.insert("id", ids::text(&header_id));
    mh.insert("meta", meta());
    mh.insert(
        "eventCoding",
        obj([
            (
                "system",
                "http://terminology.hl7.org/CodeSystem/v2-0003".into(),
            ),
            ("code", h.message_type.trigger.as_str().into()),
        ]),
    );
    mh.insert(
        "destination",
        Json::Arr(vec![obj([(
            "endpoint",
            site.exchange_endpoint.as_str().into(),
        )])]),
    );
    if let Some(s) = mapped.sender.and_then(reference) {
        mh.insert("sender", s);
    }
    let mut source = Obj::with_capacity(4);
    if !h.sending_application.is_empty() {
        source.insert("name", h.sending_application.as_str());
    }
    source.insert("software", "hl7-edge");
    source.insert("version", env!("CARGO_PKG_VERSION"));
    source.insert("endpoint", appliance.as_str());
    mh.insert("source", source);
    let focus: Vec<Json> = mapped.focus.iter().filter_map(|i| reference(*i)).collect();
    if !focus.is_empty() {
        mh.insert("focus", focus);
    }

    let mut targets = Vec::with_capacity(mapped.resources.len() + 1);
    targets.push(reference_to(&header_id));
    targets.extend(mapped.resources.iter().map(|r| reference_to(&r.id)));
    let digest = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(input.raw_sha256);
    let mut agents = vec![obj([("type", participant("assembler")), ("who", device())])];
    if let Some(s) = mapped.sender.and_then(reference) {
        agents.push(obj([("type", participant("author")), ("who", s)]));
    }
    let provenance = obj([
        ("resourceType", "Provenance".into()),
        ("id", ids::text(&provenance_id).into()),
        ("meta", meta()),
        ("target", targets.into()),
        ("recorded", received.into()),
        ("agent", agents.into()),
        (
            "entity",
            Json::Arr(vec![obj([
                ("role", "source".into()),
                (
                    "what",
                    obj([
                        (
                            "identifier",
                            obj([
                                ("system", "urn:ietf:rfc:3986".into()),
                                ("value", format!("ni:///sha-256;{digest}").into()),
                            ]),
                        ),
                        (
                            "display",
                            source_display(h, &mapped.unmapped_segments).into(),
                        ),
                    ]),
                ),
            ])]),
        ),
    ]);

    // The resources are moved in, not copied.
    let entry = |full_url: String, resource: Json| {
        obj([("fullUrl", full_url.into()), ("resource", resource)])
    };
    let mut entries = Vec::with_capacity(mapped.resources.len() + 2);
    entries.push(entry(ids::urn(&header_id), Json::Obj(mh)));
    for r in mapped.resources {
        entries.push(entry(ids::urn(&r.id), Json::Obj(r.json)));
    }
    entries.push(entry(ids::urn(&provenance_id), provenance));

    obj([
        ("resourceType", "Bundle".into()),
        ("id", ids::text(&bundle_id).into()),
        ("meta", meta()),
        (
            "identifier",
            obj([
                ("system", site.local_system("message-id").into()),
                ("value", h.control_id.as_str().into()),
            ]),
        ),
        ("type", "message".into()),
        ("timestamp", timestamp.into()),
        ("entry", entries.into()),
    ])
}
