//! Bundle signing tests: round trip, tampering, keys, hostile headers and data.

use super::*;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::json;

/// [`super::sign_bundle`] on a `Value` (the tests build and inspect Bundles as `Value`s, as an
/// exchange would; the appliance signs its own tree).
fn sign_bundle(b: &mut Value, key: &SigningKey, when: &str, who: Value) -> Result<(), SignError> {
    let mut tree = Json::from(b.clone());
    super::sign_bundle(&mut tree, key, when, Json::from(who))?;
    *b = tree.to_value();
    Ok(())
}

const WHEN: &str = "2026-07-15T10:15:00+01:00";

fn who() -> Value {
    json!({"identifier": {"system": "https://example.org/appliance", "value": "edge-01"}})
}

/// A small message Bundle, parsed from text so numbers keep their text (arbitrary_precision).
fn bundle() -> Value {
    serde_json::from_str(
        r#"{
          "resourceType": "Bundle",
          "id": "c67309c5-9629-5778-9f9e-612df19c898c",
          "type": "message",
          "timestamp": "2026-07-15T10:15:00+01:00",
          "entry": [
            {"fullUrl": "urn:uuid:0b8e3f61-5d1e-5a5c-9d7e-3a1f2b4c5d6e",
             "resource": {"resourceType": "MessageHeader", "eventCoding": {"code": "ADT^A01"}}},
            {"fullUrl": "urn:uuid:7cb5eb26-25e0-57c6-96a6-adc3a94eb477",
             "resource": {"resourceType": "Patient",
                          "identifier": [{"system": "https://fhir.nhs.uk/Id/nhs-number",
                                          "value": "9449305552"}],
                          "name": [{"family": "Smith", "given": ["Jane"]}]}},
            {"resource": {"resourceType": "Observation",
                          "valueQuantity": {"value": 1.50, "unit": "mmol/L"},
                          "signature": "not the Bundle's"}}
          ]
        }"#,
    )
    .unwrap()
}

fn signed() -> (Value, SigningKey) {
    let (key, _) = SigningKey::generate().unwrap();
    let mut b = bundle();
    sign_bundle(&mut b, &key, WHEN, who()).unwrap();
    (b, key)
}

/// Re-encodes the JWS inside `bundle.signature.data` after `f` edits its header JSON.
fn with_header(bundle: &Value, f: impl Fn(&mut Value)) -> Value {
    let mut b = bundle.clone();
    let data = b["signature"]["data"].as_str().unwrap();
    let jws = String::from_utf8(STANDARD.decode(data).unwrap()).unwrap();
    let (h, s) = jws.split_once("..").unwrap();
    let mut header: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(h).unwrap()).unwrap();
    f(&mut header);
    let h = URL_SAFE_NO_PAD.encode(header.to_string());
    b["signature"]["data"] = json!(STANDARD.encode(format!("{h}..{s}")));
    b
}

#[test]
fn round_trip() {
    let (b, key) = signed();
    let by = verify_bundle(&b, &[key.verifying_key()]).unwrap();
    assert_eq!(by.kid, key.kid());

    let sig = &b["signature"];
    assert_eq!(
        sig["type"],
        json!([{"system": "urn:iso-astm:E1762-95:2013", "code": "1.2.840.10065.1.12.1.14",
                "display": "Source Signature"}])
    );
    assert_eq!(sig["when"], WHEN);
    assert_eq!(sig["who"], who());
    assert_eq!(sig["targetFormat"], "application/fhir+json");
    assert_eq!(sig["sigFormat"], "application/jose");
    // Member order of the Bundle is kept, signature last.
    let keys: Vec<&str> = b.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(keys.first(), Some(&"resourceType"));
    assert_eq!(keys.last(), Some(&"signature"));
    // data is base64 of an ASCII detached JWS.
    let jws = String::from_utf8(STANDARD.decode(sig["data"].as_str().unwrap()).unwrap()).unwrap();
    assert!(jws.is_ascii());
    assert_eq!(jws.split('.').count(), 3);
    assert_eq!(jws.split('.').nth(1), Some(""));
}

#[test]
fn survives_reserialisation_and_reordering() {
    let (b, key) = signed();
    let keys = [key.verifying_key()];
    let pretty = serde_json::to_string_pretty(&b).unwrap();
    let reparsed: Value = serde_json::from_str(&pretty).unwrap();
    assert!(verify_bundle(&reparsed, &keys).is_ok());
    // Reverse every object's member order.
    fn reverse(v: &Value) -> Value {
        match v {
            Value::Object(m) => Value::Object(
                m.iter()
                    .rev()
                    .map(|(k, v)| (k.clone(), reverse(v)))
                    .collect(),
            ),
            Value::Array(a) => Value::Array(a.iter().map(reverse).collect()),
            other => other.clone(),
        }
    }
    assert!(verify_bundle(&reverse(&b), &keys).is_ok());
}

#[test]
fn verification_is_independent_of_this_code() {
    // Rebuild the signing input by hand (RFC 7515 detached + RFC 8785) and check with ring.
    let (b, key) = signed();
    let jws = String::from_utf8(
        STANDARD
            .decode(b["signature"]["data"].as_str().unwrap())
            .unwrap(),
    )
    .unwrap();
    let (h, s) = jws.split_once("..").unwrap();
    let mut unsigned = b.clone();
    unsigned.as_object_mut().unwrap().shift_remove("signature");
    let payload = jcs::canonicalize(&unsigned).unwrap();
    let input = format!("{h}.{}", URL_SAFE_NO_PAD.encode(payload));
    let sig = URL_SAFE_NO_PAD.decode(s).unwrap();
    ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, key.public_key_bytes())
        .verify(input.as_bytes(), &sig)
        .unwrap();
}

#[test]
fn tampering_is_detected() {
    let (b, key) = signed();
    let keys = [key.verifying_key()];
    let tamper = |f: &dyn Fn(&mut Value)| {
        let mut t = b.clone();
        f(&mut t);
        verify_bundle(&t, &keys)
    };
    type Edit = Box<dyn Fn(&mut Value)>;
    let cases: Vec<(&str, Edit)> = vec![
        (
            "name letter",
            Box::new(|t| t["entry"][1]["resource"]["name"][0]["family"] = json!("Smyth")),
        ),
        (
            "NHS number",
            Box::new(|t| t["entry"][1]["resource"]["identifier"][0]["value"] = json!("9434765919")),
        ),
        (
            "added member",
            Box::new(|t| t["entry"][1]["resource"]["gender"] = json!("female")),
        ),
        (
            "added null member",
            Box::new(|t| t["entry"][1]["resource"]["active"] = Value::Null),
        ),
        (
            "number value",
            Box::new(|t| {
                t["entry"][2]["resource"]["valueQuantity"]["value"] =
                    serde_json::from_str("1.51").unwrap()
            }),
        ),
        (
            "number to string",
            Box::new(|t| t["entry"][2]["resource"]["valueQuantity"]["value"] = json!("1.5")),
        ),
        (
            "removed entry",
            Box::new(|t| {
                t["entry"].as_array_mut().unwrap().pop();
            }),
        ),
        (
            "reordered entries",
            Box::new(|t| t["entry"].as_array_mut().unwrap().swap(0, 1)),
        ),
        (
            "nested signature member",
            Box::new(|t| t["entry"][2]["resource"]["signature"] = json!("changed")),
        ),
        (
            "unicode normalisation",
            Box::new(|t| t["entry"][1]["resource"]["name"][0]["given"][0] = json!("Jane\u{200b}")),
        ),
    ];
    for (what, f) in cases {
        assert_eq!(tamper(&*f), Err(VerifyError::Invalid), "{what}");
    }
}

/// Documented property (module docs): JCS signs numbers by value, so 1.50 -> 1.5 verifies.
#[test]
fn trailing_zero_change_still_verifies() {
    let (mut b, key) = signed();
    assert_eq!(
        b["entry"][2]["resource"]["valueQuantity"]["value"].to_string(),
        "1.50"
    );
    b["entry"][2]["resource"]["valueQuantity"]["value"] = serde_json::from_str("1.5").unwrap();
    assert!(verify_bundle(&b, &[key.verifying_key()]).is_ok());
    b["entry"][2]["resource"]["valueQuantity"]["value"] = serde_json::from_str("15e-1").unwrap();
    assert!(verify_bundle(&b, &[key.verifying_key()]).is_ok());
}

#[test]
fn wrong_key() {
    let (b, key) = signed();
    let (other, _) = SigningKey::generate().unwrap();
    assert_eq!(
        verify_bundle(&b, &[other.verifying_key()]),
        Err(VerifyError::UnknownKey(key.kid().to_owned()))
    );
    assert!(verify_bundle(&b, &[]).is_err());
    // Several trusted keys: the right one is picked by kid.
    assert!(verify_bundle(&b, &[other.verifying_key(), key.verifying_key()]).is_ok());
    // A signature by `other` claiming `key`'s kid is invalid.
    let forged = with_header(&b, |_| {});
    let mut forged_by_other = bundle();
    sign_bundle(&mut forged_by_other, &other, WHEN, who()).unwrap();
    let other_jws = String::from_utf8(
        STANDARD
            .decode(forged_by_other["signature"]["data"].as_str().unwrap())
            .unwrap(),
    )
    .unwrap();
    let our_jws = String::from_utf8(
        STANDARD
            .decode(forged["signature"]["data"].as_str().unwrap())
            .unwrap(),
    )
    .unwrap();
    let spliced = format!(
        "{}..{}",
        our_jws.split_once("..").unwrap().0,
        other_jws.split_once("..").unwrap().1
    );
    let mut t = b.clone();
    t["signature"]["data"] = json!(STANDARD.encode(spliced));
    assert_eq!(
        verify_bundle(&t, &[key.verifying_key()]),
        Err(VerifyError::Invalid)
    );
}

#[test]
fn hostile_headers() {
    let (b, key) = signed();
    let keys = [key.verifying_key()];
    for alg in ["none", "None", "HS256", "RS256", "ES256", "Ed25519"] {
        let t = with_header(&b, |h| h["alg"] = json!(alg));
        assert_eq!(
            verify_bundle(&t, &keys),
            Err(VerifyError::AlgorithmNotAllowed(alg.into())),
            "{alg}"
        );
    }
    // alg none with an empty signature, the classic downgrade.
    let kid = key.kid().to_owned();
    let none_header = URL_SAFE_NO_PAD.encode(format!(r#"{{"alg":"none","kid":"{kid}"}}"#));
    let mut t = b.clone();
    t["signature"]["data"] = json!(STANDARD.encode(format!("{none_header}..")));
    assert!(matches!(
        verify_bundle(&t, &keys),
        Err(VerifyError::AlgorithmNotAllowed(_))
    ));
    for f in [
        (|h: &mut Value| {
            h.as_object_mut().unwrap().remove("alg");
        }) as fn(&mut Value),
        |h| h["alg"] = json!(["EdDSA"]),
        |h| {
            h.as_object_mut().unwrap().remove("kid");
        },
        |h| h["kid"] = json!(7),
        |h| h["crit"] = json!(["exp"]),
        |h| h["b64"] = json!(false),
    ] {
        assert!(matches!(
            verify_bundle(&with_header(&b, f), &keys),
            Err(VerifyError::BadFormat(_))
        ));
    }
    // An extra, harmless header member changes the signed header bytes: invalid.
    let t = with_header(&b, |h| h["typ"] = json!("JOSE"));
    assert_eq!(verify_bundle(&t, &keys), Err(VerifyError::Invalid));
    // Unknown kid is reported clipped.
    let t = with_header(&b, |h| h["kid"] = json!("x".repeat(10_000)));
    match verify_bundle(&t, &keys) {
        Err(VerifyError::UnknownKey(k)) => assert!(k.len() < 100),
        other => panic!("{other:?}"),
    }
}

#[test]
fn malformed_signature_elements() {
    let (b, key) = signed();
    let keys = [key.verifying_key()];
    let data = b["signature"]["data"].as_str().unwrap().to_owned();
    let edit = |f: &dyn Fn(&mut Value)| {
        let mut t = b.clone();
        f(&mut t);
        verify_bundle(&t, &keys)
    };
    // Truncated data, at several lengths.
    for cut in [1, 4, 10, data.len() / 2, data.len() - 1] {
        let d = data[..data.len() - cut].to_owned();
        let r = edit(&move |t| t["signature"]["data"] = json!(d.clone()));
        assert!(
            matches!(r, Err(VerifyError::BadFormat(_))),
            "cut {cut}: {r:?}"
        );
    }
    assert_eq!(
        edit(&|t| {
            t.as_object_mut().unwrap().shift_remove("signature");
        }),
        Err(VerifyError::NoSignature)
    );
    assert_eq!(
        edit(&|t| t["signature"] = Value::Null),
        Err(VerifyError::NoSignature)
    );
    for f in [
        (|t: &mut Value| t["signature"] = json!([1])) as fn(&mut Value),
        |t| t["signature"]["sigFormat"] = json!("application/pkcs7-signature"),
        |t| t["signature"]["targetFormat"] = json!("application/fhir+xml"),
        |t| {
            t["signature"].as_object_mut().unwrap().remove("data");
        },
        |t| t["signature"]["data"] = json!("%%%"),
        |t| t["signature"]["data"] = json!(STANDARD.encode([0xff, 0xfe, b'.', b'.'])),
        |t| t["resourceType"] = json!("Patient"),
    ] {
        assert!(matches!(edit(&f), Err(VerifyError::BadFormat(_))));
    }
    // Line-wrapped base64 (allowed in base64Binary) still verifies.
    let wrapped: String = data
        .as_bytes()
        .chunks(76)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect::<Vec<_>>()
        .join("\n");
    assert!(edit(&|t| t["signature"]["data"] = json!(wrapped.clone())).is_ok());
}

#[test]
fn resigning_replaces_the_signature() {
    let (mut b, key) = signed();
    let first = b["signature"].clone();
    sign_bundle(
        &mut b,
        &key,
        "2026-07-15T11:00:00Z",
        json!({"reference": "urn:uuid:1"}),
    )
    .unwrap();
    assert_ne!(b["signature"], first);
    assert_eq!(b["signature"]["when"], "2026-07-15T11:00:00Z");
    // Ed25519 is deterministic and `when`/`who` are not signed: same JWS.
    assert_eq!(b["signature"]["data"], first["data"]);
    assert!(verify_bundle(&b, &[key.verifying_key()]).is_ok());
}

#[test]
fn sign_refuses_bad_input_and_leaves_bundle_unchanged() {
    let (key, _) = SigningKey::generate().unwrap();
    let mut not_bundle = json!({"resourceType": "Patient"});
    assert_eq!(
        sign_bundle(&mut not_bundle, &key, WHEN, who()),
        Err(SignError::NotABundle)
    );
    assert_eq!(
        sign_bundle(&mut json!([1]), &key, WHEN, who()),
        Err(SignError::NotABundle)
    );
    let mut b = bundle();
    for when in [
        "",
        "2026-07-15",
        "2026-07-15T10:15:00",
        "2026-07-15T10:15+01:00",
    ] {
        assert_eq!(
            sign_bundle(&mut b, &key, when, who()),
            Err(SignError::BadWhen),
            "{when}"
        );
    }
    for w in [
        json!("Device/1"),
        json!({}),
        json!({"display": "x"}),
        Value::Null,
    ] {
        assert_eq!(sign_bundle(&mut b, &key, WHEN, w), Err(SignError::BadWho));
    }
    assert_eq!(b, bundle());

    // An inexact number is refused, and an existing signature is left in place.
    let (mut signed_b, _) = signed();
    let before = signed_b.clone();
    signed_b["entry"][2]["resource"]["valueQuantity"]["value"] =
        serde_json::from_str("1.2345678901234567890").unwrap();
    let snapshot = signed_b.clone();
    let err = sign_bundle(&mut signed_b, &key, WHEN, who()).unwrap_err();
    assert!(matches!(
        err,
        SignError::Canonicalize(jcs::JcsError::InexactNumber { ref path })
            if path == "/entry/2/resource/valueQuantity/value"
    ));
    assert_eq!(signed_b, snapshot);
    assert_ne!(before, snapshot);
}

#[test]
fn errors_carry_no_patient_data() {
    let (b, key) = signed();
    let mut t = b.clone();
    t["entry"][1]["resource"]["name"][0]["family"] = json!("Smyth");
    let msg = verify_bundle(&t, &[key.verifying_key()])
        .unwrap_err()
        .to_string();
    assert!(
        !msg.contains("Smyth") && !msg.contains("9449305552"),
        "{msg}"
    );
}
