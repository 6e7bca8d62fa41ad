//! Deterministic FHIR resource ids.
//!
//! Why UUIDv5: HL7 v2 senders re-send messages (after a lost ACK, a restart, a replay from their
//! own queue). If every mapping run minted random ids, one admission would become several
//! Patients/Encounters at the exchange. A name-based UUID (RFC 9562 version 5, SHA-1) of the
//! resource's identifying fields gives the same id for the same facts on every run and on every
//! appliance, with no state to keep, while still being a valid `urn:uuid:` for Bundle
//! `fullUrl`s. SHA-1's collision weakness does not matter here: the inputs are not adversarial
//! and the ids are not a security boundary (the Bundle signature is).
//!
//! The namespace is [`NAMESPACE`], itself `UUIDv5(NAMESPACE_URL, "urn:hl7-edge:fhir-resource-id:v1")`.
//! Changing it (or the encoding below) changes every id ever emitted, so it is versioned in the
//! name and pinned by a test.
//!
//! Parts are encoded as netstrings (`<byte length>:<bytes>,` each) before hashing, so part
//! boundaries cannot be confused: `["ab", "c"]` and `["a", "bc"]` hash different inputs, and no
//! choice of separator character has to be kept out of the data.

use uuid::Uuid;

/// The name hashed (in the URL namespace) to obtain [`NAMESPACE`].
pub const NAMESPACE_NAME: &str = "urn:hl7-edge:fhir-resource-id:v1";

/// hl7-edge's UUIDv5 namespace for resource ids: `UUIDv5(NAMESPACE_URL, NAMESPACE_NAME)`.
pub const NAMESPACE: Uuid = Uuid::from_u128(NAMESPACE_U128);
const NAMESPACE_U128: u128 = 0x7cb5_eb26_25e0_57c6_96a6_adc3_a94e_b477;

/// A deterministic id for a resource identified by `parts` (e.g.
/// `["Patient", "https://fhir.nhs.uk/Id/nhs-number", "9449305552"]`). Include the resource type
/// and the identifier system among the parts so that unrelated resources cannot collide.
///
/// The same UUID as `Uuid::new_v5(&NAMESPACE, netstrings)`, computed with the `sha1` crate's
/// hardware SHA-1 where the CPU has one (see Cargo.toml): a message takes ~20 ids, and `uuid`'s
/// portable SHA-1 plus a buffer and a length string per part were ~7% of mapping time. The name is laid out in a
/// stack buffer (a heap one past 512 bytes) and hashed in one call: feeding ring four small
/// updates per part cost more than the hashing. The test `matches_uuid_new_v5` pins the
/// equivalence.
pub fn resource_uuid(parts: &[&str]) -> Uuid {
    const STACK: usize = 512;
    let len = NAMESPACE.as_bytes().len()
        + parts
            .iter()
            .map(|p| p.len() + 22) // at most 20 digits, `:` and `,`
            .sum::<usize>();
    let mut stack = [0u8; STACK];
    let mut heap = Vec::new();
    let buf: &mut [u8] = if len <= STACK {
        &mut stack
    } else {
        heap.resize(len, 0);
        &mut heap
    };
    let mut at = 0;
    let mut put = |bytes: &[u8]| {
        if let Some(dst) = buf.get_mut(at..at + bytes.len()) {
            dst.copy_from_slice(bytes);
            at += bytes.len();
        }
    };
    put(NAMESPACE.as_bytes());
    for part in parts {
        put(decimal(part.len(), &mut [0; 20]));
        put(b":");
        put(part.as_bytes());
        put(b",");
    }
    let name = buf.get(..at).unwrap_or_default();
    let digest = <sha1::Sha1 as sha1::Digest>::digest(name);
    let mut bytes = [0u8; 16];
    for (b, d) in bytes.iter_mut().zip(digest.iter()) {
        *b = *d;
    }
    uuid::Builder::from_sha1_bytes(bytes).into_uuid()
}

/// A map keyed by resource id, for the per-message tables of the mapping runtime.
pub type IdMap<V> = std::collections::HashMap<Uuid, V, std::hash::BuildHasherDefault<IdHasher>>;

/// Hashes resource ids for [`IdMap`]. The ids are SHA-1 output, uniformly spread already, so a
/// multiply-rotate fold of their bytes is a good hash; SipHash was ~2% of mapping a message.
/// SipHash's defence against chosen keys buys little here: a table lives for one message, and
/// a sender that crafted colliding ids would only slow the lookups of its own message.
#[derive(Default)]
pub struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut w = [0u8; 8];
            if let Some(dst) = w.get_mut(..chunk.len()) {
                dst.copy_from_slice(chunk);
            }
            self.0 =
                (self.0.rotate_left(5) ^ u64::from_le_bytes(w)).wrapping_mul(0x517c_c1b7_2722_0a95);
        }
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// `n` in decimal ASCII, written at the end of `buf` (a `usize` has at most 20 digits).
fn decimal(mut n: usize, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        if let Some(b) = buf.get_mut(i) {
            // `n % 10` is below 10, so the cast cannot truncate.
            *b = b'0' + (n % 10) as u8;
        }
        n /= 10;
        if n == 0 || i == 0 {
            break;
        }
    }
    buf.get(i..).unwrap_or_default()
}

/// `urn:uuid:<lower-case hyphenated uuid>`, the form FHIR uses for `Bundle.entry.fullUrl` and
/// references inside a transaction/message Bundle.
pub fn urn(u: &Uuid) -> String {
    let mut s = String::with_capacity(URN_PREFIX.len() + uuid::fmt::Hyphenated::LENGTH);
    s.push_str(URN_PREFIX);
    s.push_str(
        u.hyphenated()
            .encode_lower(&mut uuid::Uuid::encode_buffer()),
    );
    s
}

const URN_PREFIX: &str = "urn:uuid:";

/// The lower-case hyphenated form of `u` (a resource's `id`), as `u.to_string()` writes it but
/// without the formatting machinery: a message writes ~20 of these and as many `urn`s.
pub fn text(u: &Uuid) -> String {
    // `to_string()` on the `&mut str` that `encode_lower` returns goes through `Display`.
    String::from(
        &*u.hyphenated()
            .encode_lower(&mut uuid::Uuid::encode_buffer()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespace_is_derived_as_documented() {
        assert_eq!(
            NAMESPACE,
            Uuid::new_v5(&Uuid::NAMESPACE_URL, NAMESPACE_NAME.as_bytes())
        );
    }

    #[test]
    fn stable_known_output() {
        let u = resource_uuid(&["Patient", "https://fhir.nhs.uk/Id/nhs-number", "9449305552"]);
        // Computed independently (Python `uuid.uuid5`) when the scheme was fixed; must never change.
        assert_eq!(u.to_string(), "c67309c5-9629-5778-9f9e-612df19c898c");
        assert_eq!(u.get_version_num(), 5);
        assert_eq!(text(&u), u.to_string());
        assert_eq!(urn(&u), "urn:uuid:c67309c5-9629-5778-9f9e-612df19c898c");
    }

    #[test]
    fn matches_uuid_new_v5() {
        let long = "x".repeat(1234);
        let cases: [&[&str]; 5] = [
            &[],
            &[""],
            &["Patient", "https://fhir.nhs.uk/Id/nhs-number", "9449305552"],
            &["RRV", "Observation", "key", "8867-4", "", "Zoë"],
            &[&long, "a"],
        ];
        for parts in cases {
            let mut name = Vec::new();
            for p in parts {
                name.extend_from_slice(format!("{}:{p},", p.len()).as_bytes());
            }
            assert_eq!(resource_uuid(parts), Uuid::new_v5(&NAMESPACE, &name));
        }
        assert_eq!(decimal(0, &mut [0; 20]), b"0");
        assert_eq!(
            decimal(usize::MAX, &mut [0; 20]),
            usize::MAX.to_string().as_bytes()
        );
    }

    #[test]
    fn different_parts_give_different_ids() {
        let a = resource_uuid(&["Patient", "x", "1"]);
        let b = resource_uuid(&["Patient", "x", "2"]);
        assert_ne!(a, b);
        assert_eq!(a, resource_uuid(&["Patient", "x", "1"]));
    }

    #[test]
    fn part_boundaries_are_unambiguous() {
        assert_ne!(resource_uuid(&["ab", "c"]), resource_uuid(&["a", "bc"]));
        assert_ne!(resource_uuid(&["a", ""]), resource_uuid(&["a"]));
        assert_ne!(resource_uuid(&[]), resource_uuid(&[""]));
        // A part that looks like an encoded boundary cannot forge another split.
        assert_ne!(resource_uuid(&["1:a,1:b"]), resource_uuid(&["a", "b"]));
    }

    #[test]
    fn urn_form() {
        let u = Uuid::from_u128(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef);
        assert_eq!(urn(&u), "urn:uuid:01234567-89ab-cdef-0123-456789abcdef");
    }
}
