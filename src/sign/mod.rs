//! Signing FHIR message Bundles so the regional exchange can verify which appliance sent them.
//!
//! # What is signed, and how
//!
//! [`sign_bundle`] removes any existing `Bundle.signature`, canonicalises the rest of the Bundle
//! with RFC 8785 JCS ([`jcs`]), signs that with the appliance's Ed25519 key ([`key`]) as a
//! detached JWS ([`jws`], header `{"alg":"EdDSA","kid":"<RFC 7638 thumbprint>"}`), and stores the
//! JWS in `Bundle.signature` as a FHIR R4 `Signature`:
//!
//! ```json
//! "signature": {
//!   "type": [{"system": "urn:iso-astm:E1762-95:2013", "code": "1.2.840.10065.1.12.1.14",
//!             "display": "Source Signature"}],
//!   "when": "2026-07-15T10:15:00+01:00",
//!   "who": {"identifier": {"system": "...", "value": "..."}},
//!   "targetFormat": "application/fhir+json",
//!   "sigFormat": "application/jose",
//!   "data": "<base64 of the ASCII detached JWS header..signature>"
//! }
//! ```
//!
//! The exchange verifies by removing `signature`, canonicalising with any RFC 8785
//! implementation, base64url-encoding that as the JWS payload and checking the JWS with the
//! appliance's public JWK (its `.pub.jwk` file). [`verify_bundle`] does exactly that.
//!
//! # Why this design
//!
//! - **JCS, not the bytes we sent**: the Bundle crosses MQTT, an outbox and the exchange's own
//!   parsers; any of them may re-serialise it. A canonical form lets the signature survive
//!   re-serialisation while any change to a value breaks it.
//! - **Detached JWS**: the Bundle *is* the payload, so it is not repeated inside the signature.
//! - **`kid` = JWK thumbprint**: a key names itself; the exchange needs no side registry.
//!
//! # Properties to know
//!
//! - **Numbers are signed by value.** JCS writes `1.50` and `1.5` identically, so changing one into
//!   the other leaves the signature valid (tested as `trailing_zero_change_still_verifies`). FHIR
//!   uses trailing zeros to state precision; the signature does not protect that convention, only
//!   the numeric value. Numbers a double cannot hold exactly (e.g. 18 significant digits) are
//!   refused at signing time ([`jcs::canonicalize_strict`]) so a value is never silently
//!   unprotected.
//! - **`when` and `who` are not covered.** As FHIR specifies, the signature is over the Bundle
//!   without `Bundle.signature`; the signer's identity is proven by the key (`kid` is inside the
//!   protected header), not by `who`. Use `Bundle.timestamp` (signed) for trusted timing.
//! - **Duplicate JSON member names** are resolved by the JSON parser before JCS sees them
//!   (`serde_json` keeps the last); a receiver should reject duplicates when parsing.

pub mod jcs;
pub mod jws;
pub mod key;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde_json::Value;

use crate::fhir::tree::{Json, obj};

pub use jws::{VerifiedBy, VerifyError};
pub use key::{KeyError, SigningKey, VerifyingKey};

/// `Signature.type` system: ASTM E1762-95 signature types.
pub const SIGNATURE_TYPE_SYSTEM: &str = "urn:iso-astm:E1762-95:2013";
/// `Signature.type` code for "Source Signature" (the data's origin vouches for it).
pub const SIGNATURE_TYPE_SOURCE: &str = "1.2.840.10065.1.12.1.14";
/// `Signature.sigFormat` for a JWS.
pub const SIG_FORMAT: &str = "application/jose";
/// `Signature.targetFormat`: what was signed.
pub const TARGET_FORMAT: &str = "application/fhir+json";

/// Why a Bundle could not be signed. No Bundle contents appear in messages.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignError {
    /// Not a JSON object with `resourceType` `Bundle`.
    #[error("only a FHIR Bundle (a JSON object with resourceType \"Bundle\") can be signed")]
    NotABundle,
    /// `when` is not a FHIR `instant`.
    #[error(
        "signature time is not a FHIR instant (YYYY-MM-DDThh:mm:ss[.fff](Z|+hh:mm|-hh:mm)); \
         seconds and a UTC offset are required"
    )]
    BadWhen,
    /// `who` is not a usable Reference.
    #[error(
        "signature `who` must be a FHIR Reference object with a `reference` or an `identifier`"
    )]
    BadWho,
    /// The Bundle has no canonical form; nothing was changed.
    #[error("the Bundle cannot be canonicalised for signing: {0}")]
    Canonicalize(#[from] jcs::JcsError),
}

fn is_bundle(v: &Value) -> bool {
    v.get("resourceType").and_then(Value::as_str) == Some("Bundle")
}

fn is_bundle_tree(v: &Json) -> bool {
    v.get("resourceType").and_then(Json::as_str) == Some("Bundle")
}

/// Signs `bundle` in place (see the module docs): replaces any `signature` with a new FHIR R4
/// `Signature` whose `data` is the base64 of a detached EdDSA JWS over the JCS form of the Bundle
/// without `signature`. `when` must be a FHIR `instant`; `who` a Reference
/// (`{"identifier": {...}}` or `{"reference": "urn:uuid:..."}`). On error the Bundle is unchanged.
pub fn sign_bundle(
    bundle: &mut Json,
    key: &SigningKey,
    when: &str,
    who: Json,
) -> Result<(), SignError> {
    if !is_bundle_tree(bundle) {
        return Err(SignError::NotABundle);
    }
    if !crate::fhir::time::is_fhir_instant(when) {
        return Err(SignError::BadWhen);
    }
    let who_ok = who
        .as_object()
        .is_some_and(|r| r.contains_key("reference") || r.contains_key("identifier"));
    if !who_ok {
        return Err(SignError::BadWho);
    }
    let payload = jcs::canonicalize_strict_without(bundle, "signature")?;
    let jws = jws::sign_detached(&payload, key);
    let signature = obj([
        (
            "type",
            Json::Arr(vec![obj([
                ("system", SIGNATURE_TYPE_SYSTEM.into()),
                ("code", SIGNATURE_TYPE_SOURCE.into()),
                ("display", "Source Signature".into()),
            ])]),
        ),
        ("when", when.into()),
        ("who", who),
        ("targetFormat", TARGET_FORMAT.into()),
        ("sigFormat", SIG_FORMAT.into()),
        ("data", STANDARD.encode(jws.as_bytes()).into()),
    ]);
    let Some(members) = bundle.as_object_mut() else {
        return Err(SignError::NotABundle);
    };
    // Removing keeps the other members in order (resourceType stays first); `signature` is the
    // last element of Bundle in FHIR's element order, so it goes at the end.
    members.remove("signature");
    members.insert("signature", signature);
    Ok(())
}

/// Verifies `bundle.signature` against the trusted `keys`; returns the signing key's id.
///
/// Checks, in order: there is a signature object; `sigFormat` is `application/jose` (and
/// `targetFormat`, if present, `application/fhir+json`); `data` is base64 of an ASCII detached JWS;
/// its header's `alg` is `EdDSA` (anything else, `none` included, is refused) and its `kid` is a
/// trusted key; the signature verifies over the JCS form of the Bundle without `signature`.
pub fn verify_bundle(bundle: &Value, keys: &[VerifyingKey]) -> Result<VerifiedBy, VerifyError> {
    if !is_bundle(bundle) {
        return Err(VerifyError::BadFormat("not a FHIR Bundle"));
    }
    let signature = match bundle.get("signature") {
        None | Some(Value::Null) => return Err(VerifyError::NoSignature),
        Some(Value::Object(s)) => s,
        Some(_) => return Err(VerifyError::BadFormat("Bundle.signature is not an object")),
    };
    if signature.get("sigFormat").and_then(Value::as_str) != Some(SIG_FORMAT) {
        return Err(VerifyError::BadFormat("sigFormat is not application/jose"));
    }
    if signature
        .get("targetFormat")
        .is_some_and(|t| t.as_str() != Some(TARGET_FORMAT))
    {
        return Err(VerifyError::BadFormat(
            "targetFormat is not application/fhir+json",
        ));
    }
    let data = signature
        .get("data")
        .and_then(Value::as_str)
        .ok_or(VerifyError::BadFormat("signature data is missing"))?;
    // FHIR base64Binary may contain whitespace (line breaks); the alphabet is standard base64.
    let compact: String = data.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    let jws_bytes = STANDARD
        .decode(compact)
        .map_err(|_| VerifyError::BadFormat("signature data is not valid base64"))?;
    let jws = std::str::from_utf8(&jws_bytes)
        .ok()
        .filter(|s| s.is_ascii())
        .ok_or(VerifyError::BadFormat("signature data is not an ASCII JWS"))?;
    jws::verify_detached_with(jws, keys, || {
        Ok(jcs::canonicalize_strict_without(bundle, "signature")?)
    })
}

#[cfg(test)]
mod tests;
