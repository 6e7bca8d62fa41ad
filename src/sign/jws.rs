//! Detached JWS (RFC 7515, Appendix F) with EdDSA (RFC 8037).
//!
//! Why detached: the payload (the canonical Bundle) already travels as the Bundle itself;
//! embedding it again in the JWS would double the message and create two copies that could
//! disagree. The detached form `header..signature` carries only what the verifier cannot
//! recompute; the verifier re-derives the payload from the Bundle it received.
//!
//! Why JWS rather than a bare signature: FHIR's `Signature.sigFormat` `application/jose` is what
//! exchanges expect, and the protected header binds the algorithm and the key id into the signed
//! bytes, so neither can be swapped. Only `EdDSA` is accepted on verification (never taken from
//! the header as a choice), which closes the classic `alg: none` and algorithm-confusion holes.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};

use super::key::{SigningKey, VerifyingKey};

/// The only `alg` produced and accepted.
pub const ALG: &str = "EdDSA";

/// Which key a valid signature was made with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedBy {
    /// The signer's key id (RFC 7638 thumbprint).
    pub kid: String,
}

/// Why a signature was not accepted. Messages name the problem, never Bundle contents.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// The Bundle has no `signature`.
    #[error("the Bundle has no signature")]
    NoSignature,
    /// The signature or JWS is structurally wrong.
    #[error("the signature is malformed: {0}")]
    BadFormat(&'static str),
    /// The `kid` is not among the trusted keys.
    #[error(
        "the signature was made with key {0:?}, which is not a trusted key; add its public JWK if \
         the sender is genuine"
    )]
    UnknownKey(String),
    /// The header names an algorithm other than EdDSA.
    #[error("the signature uses algorithm {0:?}; only EdDSA is accepted")]
    AlgorithmNotAllowed(String),
    /// The signature does not match: the Bundle was changed after signing, or the key differs.
    #[error("the signature does not match the Bundle: it was altered after signing")]
    Invalid,
    /// The Bundle has no canonical form (see [`crate::sign::jcs`]).
    #[error("the Bundle cannot be canonicalised: {0}")]
    Canonicalize(#[from] crate::sign::jcs::JcsError),
}

/// Attacker-supplied strings are shortened before going into errors and logs.
fn clip(s: &str) -> String {
    const MAX: usize = 64;
    match s.char_indices().nth(MAX) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_owned(),
    }
}

/// `header_b64 . base64url(payload)`, the bytes the signature covers. The payload is encoded
/// straight into the input (a Bundle's is ~23 KB: no second buffer and copy of it).
fn signing_input(header_b64: &str, payload: &[u8]) -> Vec<u8> {
    let head = header_b64.len() + 1;
    let mut input = vec![0; head + base64::encoded_len(payload.len(), false).unwrap_or(0)];
    input[..header_b64.len()].copy_from_slice(header_b64.as_bytes());
    input[header_b64.len()] = b'.';
    match URL_SAFE_NO_PAD.encode_slice(payload, &mut input[head..]) {
        Ok(n) => input.truncate(head + n),
        // Only on a length overflow (a payload near `usize::MAX`): encode the slow way.
        Err(_) => {
            input.truncate(head);
            input.extend_from_slice(URL_SAFE_NO_PAD.encode(payload).as_bytes());
        }
    }
    input
}

/// Signs `payload`; returns the detached compact JWS `b64url(header)..b64url(signature)` with
/// protected header `{"alg":"EdDSA","kid":"<thumbprint>"}`.
pub fn sign_detached(payload: &[u8], key: &SigningKey) -> String {
    // `kid` is base64url, so the header needs no escaping; serde_json writes it in this order.
    let header = json!({ "alg": ALG, "kid": key.kid() }).to_string();
    let header_b64 = URL_SAFE_NO_PAD.encode(header.as_bytes());
    let signature = key.sign(&signing_input(&header_b64, payload));
    format!("{header_b64}..{}", URL_SAFE_NO_PAD.encode(signature))
}

/// Verifies a detached compact JWS over `payload` against `keys` (matched by `kid`).
pub fn verify_detached(
    jws: &str,
    payload: &[u8],
    keys: &[VerifyingKey],
) -> Result<VerifiedBy, VerifyError> {
    verify_detached_with(jws, keys, || Ok(payload.to_vec()))
}

/// [`verify_detached`] with the payload computed only once the header has been accepted, so a
/// forged or unknown-key signature costs no canonicalisation and gets the more specific error.
pub(crate) fn verify_detached_with(
    jws: &str,
    keys: &[VerifyingKey],
    payload: impl FnOnce() -> Result<Vec<u8>, VerifyError>,
) -> Result<VerifiedBy, VerifyError> {
    let mut parts = jws.split('.');
    let (Some(header_b64), Some(body), Some(sig_b64), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(VerifyError::BadFormat(
            "JWS must have exactly three dot-separated parts",
        ));
    };
    if !body.is_empty() {
        return Err(VerifyError::BadFormat(
            "JWS is not detached (payload part is not empty)",
        ));
    }
    let header_bytes = URL_SAFE_NO_PAD
        .decode(header_b64)
        .map_err(|_| VerifyError::BadFormat("JWS header is not unpadded base64url"))?;
    let header: Value = serde_json::from_slice(&header_bytes)
        .map_err(|_| VerifyError::BadFormat("JWS header is not JSON"))?;
    let header = header
        .as_object()
        .ok_or(VerifyError::BadFormat("JWS header is not a JSON object"))?;
    match header.get("alg") {
        Some(Value::String(alg)) if alg == ALG => {}
        Some(Value::String(alg)) => return Err(VerifyError::AlgorithmNotAllowed(clip(alg))),
        Some(_) => return Err(VerifyError::BadFormat("JWS header alg is not a string")),
        None => return Err(VerifyError::BadFormat("JWS header has no alg")),
    }
    // RFC 7515 4.1.11: extensions listed in `crit` must be understood; we understand none.
    // RFC 7797 `b64: false` would change the signing input; refuse it outright.
    if header.contains_key("crit") || header.contains_key("b64") {
        return Err(VerifyError::BadFormat(
            "JWS header uses an extension (crit/b64) that is not supported",
        ));
    }
    let kid = match header.get("kid") {
        Some(Value::String(kid)) => kid,
        _ => return Err(VerifyError::BadFormat("JWS header has no kid string")),
    };
    let key = keys
        .iter()
        .find(|k| k.kid() == kid)
        .ok_or_else(|| VerifyError::UnknownKey(clip(kid)))?;
    let signature = URL_SAFE_NO_PAD
        .decode(sig_b64)
        .map_err(|_| VerifyError::BadFormat("JWS signature is not unpadded base64url"))?;
    if signature.len() != 64 {
        return Err(VerifyError::BadFormat("Ed25519 signature must be 64 bytes"));
    }
    let payload = payload()?;
    if key.verify(&signing_input(header_b64, &payload), &signature) {
        Ok(VerifiedBy {
            kid: key.kid().to_owned(),
        })
    } else {
        Err(VerifyError::Invalid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signing_input_is_header_dot_base64url_payload_at_every_length() {
        for len in 0..10 {
            let payload: Vec<u8> = (0..len).map(|i| (i * 37 + 250) as u8).collect();
            let input = signing_input("aGVhZA", &payload);
            assert_eq!(
                String::from_utf8(input).unwrap(),
                format!("aGVhZA.{}", URL_SAFE_NO_PAD.encode(&payload)),
                "payload of {len} bytes"
            );
        }
    }

    /// RFC 8037 Appendix A.4: the compact JWS of "Example of Ed25519 signing" with header
    /// `{"alg":"EdDSA"}` (Ed25519 is deterministic, so the signature is fixed).
    #[test]
    fn rfc8037_signature_vector() {
        let seed = URL_SAFE_NO_PAD
            .decode("nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A")
            .unwrap();
        let key = SigningKey::from_seed(&seed).unwrap();
        let input = signing_input("eyJhbGciOiJFZERTQSJ9", b"Example of Ed25519 signing");
        assert_eq!(
            String::from_utf8(input.clone()).unwrap(),
            "eyJhbGciOiJFZERTQSJ9.RXhhbXBsZSBvZiBFZDI1NTE5IHNpZ25pbmc"
        );
        assert_eq!(
            URL_SAFE_NO_PAD.encode(key.sign(&input)),
            "hgyY0il_MGCjP0JzlnLWG1PPOt7-09PGcvMg3AIbQR6dWbhijcNR4ki4iylGjg5BhVsPt9g7sVvpAr_MuM0KAg"
        );
    }

    #[test]
    fn detached_round_trip_and_header_shape() {
        let (key, _) = SigningKey::generate().unwrap();
        let jws = sign_detached(b"payload", &key);
        let (h, rest) = jws.split_once("..").unwrap();
        assert!(!rest.contains('.'));
        let header = URL_SAFE_NO_PAD.decode(h).unwrap();
        assert_eq!(
            String::from_utf8(header).unwrap(),
            format!(r#"{{"alg":"EdDSA","kid":"{}"}}"#, key.kid())
        );
        let keys = [key.verifying_key()];
        assert_eq!(
            verify_detached(&jws, b"payload", &keys).unwrap().kid,
            key.kid()
        );
        assert_eq!(
            verify_detached(&jws, b"payloaD", &keys),
            Err(VerifyError::Invalid)
        );
    }

    #[test]
    fn structural_problems() {
        let (key, _) = SigningKey::generate().unwrap();
        let keys = [key.verifying_key()];
        let jws = sign_detached(b"p", &key);
        let (h, s) = jws.split_once("..").unwrap();
        let attached = format!("{h}.cA.{s}");
        for bad in [
            "",
            "a.b",
            "a..b..c",
            &attached,
            &format!("{h}=..{s}"),
            &format!("!!..{s}"),
            &format!("{h}..{}", &s[..s.len() - 4]),
        ] {
            assert!(
                matches!(
                    verify_detached(bad, b"p", &keys),
                    Err(VerifyError::BadFormat(_))
                ),
                "{bad:?}"
            );
        }
    }
}
