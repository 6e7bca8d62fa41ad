//! The Bundle as it travels through the appliance: mapped, assembled, validated, signed and
//! written out, all on this one tree.
//!
//! Why not `serde_json::Value`: with `preserve_order` its objects are IndexMaps keyed by owned
//! `String`s and hashed with SipHash. A Bundle of twenty resources has about a thousand keys, so
//! building one as a `Value` cost a thousand small allocations and hashes (about a quarter of
//! mapping time) only to be walked in order afterwards. Here an object is a vector of pairs in
//! insertion order (FHIR elements have a handful of keys, found faster by comparison than by
//! hashing), and keys are `&'static str` borrowed from the FHIR R4 element catalogue whenever
//! the element is known (always, for mapped resources), so a key costs nothing.
//!
//! Numbers keep their text (`1.50` stays `1.50`): they are `serde_json::Number`s, which this
//! crate builds with `arbitrary_precision`.
//!
//! The rest of the crate and its users can still have a `Value` ([`Json::to_value`], and
//! `From<Value>`), e.g. to pretty-print a Bundle or to compare it in a test.

mod de;

use std::borrow::Cow;

use serde::ser::{SerializeMap, SerializeSeq};
use serde_json::{Number, Value};

/// An object key: a catalogue or literal name (free to copy), or an owned string.
pub type Key = Cow<'static, str>;

/// A JSON value.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum Json {
    #[default]
    Null,
    Bool(bool),
    /// The number's text, as written.
    Num(Number),
    Str(String),
    Arr(Vec<Json>),
    Obj(Obj),
}

/// A JSON object: members in insertion order, keys unique.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Obj(Vec<(Key, Json)>);

static NULL: Json = Json::Null;

impl Obj {
    pub fn new() -> Obj {
        Obj(Vec::new())
    }

    pub fn with_capacity(n: usize) -> Obj {
        Obj(Vec::with_capacity(n))
    }

    /// An object of `members`, which the caller guarantees have distinct keys (a builder of
    /// a fixed shape, or a tree whose objects were built with [`Obj::insert`]).
    pub(crate) fn from_unique(members: Vec<(Key, Json)>) -> Obj {
        debug_assert!(
            members
                .iter()
                .enumerate()
                .all(|(i, (k, _))| members[..i].iter().all(|(o, _)| o != k)),
            "duplicate key"
        );
        Obj(members)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn get(&self, key: &str) -> Option<&Json> {
        self.0
            .iter()
            .find(|(k, _)| same_key(k, key))
            .map(|(_, v)| v)
    }

    #[inline]
    pub fn get_mut(&mut self, key: &str) -> Option<&mut Json> {
        self.0
            .iter_mut()
            .find(|(k, _)| same_key(k, key))
            .map(|(_, v)| v)
    }

    /// The value of `key`, inserted with `make` at the end if absent.
    #[inline]
    pub(crate) fn entry(&mut self, key: impl Into<Key>, make: impl FnOnce() -> Json) -> &mut Json {
        let key = key.into();
        let at = match self.0.iter().position(|(k, _)| same_key(k, &key)) {
            Some(i) => i,
            None => {
                self.0.push((key, make()));
                self.0.len() - 1
            }
        };
        &mut self.0[at].1
    }

    pub fn contains_key(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    /// Sets `key`: an existing key keeps its position (as `IndexMap::insert` does), a new one
    /// goes at the end.
    ///
    /// Inlined, as `entry` and `get_mut` are: the mapping runtime calls them for every value it
    /// writes, and a call passes the value through memory it has just written. Without LTO
    /// that was 3-4% of `benches/mapping.rs` (measured together with a shortcut for text values,
    /// since removed); the release profile's LTO build did not move.
    #[inline]
    pub fn insert(&mut self, key: impl Into<Key>, value: impl Into<Json>) {
        let key = key.into();
        let value = value.into();
        match self.get_mut(&key) {
            Some(slot) => *slot = value,
            None => self.0.push((key, value)),
        }
    }

    /// Removes `key`, keeping the order of the others.
    pub fn remove(&mut self, key: &str) -> Option<Json> {
        let i = self.0.iter().position(|(k, _)| same_key(k, key))?;
        Some(self.0.remove(i).1)
    }

    /// The members as stored, keys with their kind (the JSON writer skips the escape scan of
    /// catalogue names).
    pub(crate) fn members(&self) -> &[(Key, Json)] {
        &self.0
    }

    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&str, &Json)> {
        self.0.iter().map(|(k, v)| (k.as_ref(), v))
    }

    fn to_map(&self) -> serde_json::Map<String, Value> {
        self.iter()
            .map(|(k, v)| (k.to_owned(), v.to_value()))
            .collect()
    }
}

/// Key equality, cheap in the common cases: a mapped element's name is the FHIR catalogue's own
/// `&'static str`, so equal keys are usually the same pointer, and unequal ones usually differ
/// in length or first letter (no `memcmp` call for either). Building a resource looks keys up
/// about a thousand times.
fn same_key(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && (std::ptr::eq(a.as_ptr(), b.as_ptr())
            || (a.as_bytes().first() == b.as_bytes().first() && a == b))
}

/// Builds an object from `(key, value)` pairs with literal keys: `obj([("a", x.into())])`.
/// A repeated key keeps its first position and its last value.
pub fn obj<const N: usize>(members: [(&'static str, Json); N]) -> Json {
    let mut o = Obj::with_capacity(N);
    for (k, v) in members {
        o.insert(k, v);
    }
    Json::Obj(o)
}

impl Json {
    /// The member `key` of an object.
    pub fn get(&self, key: &str) -> Option<&Json> {
        match self {
            Json::Obj(o) => o.get(key),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Json::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Json::Bool(b) => Some(*b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&Vec<Json>> {
        match self {
            Json::Arr(a) => Some(a),
            _ => None,
        }
    }

    pub fn as_object(&self) -> Option<&Obj> {
        match self {
            Json::Obj(o) => Some(o),
            _ => None,
        }
    }

    pub fn as_object_mut(&mut self) -> Option<&mut Obj> {
        match self {
            Json::Obj(o) => Some(o),
            _ => None,
        }
    }

    pub fn is_null(&self) -> bool {
        matches!(self, Json::Null)
    }

    /// The value at a JSON Pointer (RFC 6901), as `serde_json::Value::pointer`.
    pub fn pointer(&self, pointer: &str) -> Option<&Json> {
        if pointer.is_empty() {
            return Some(self);
        }
        let rest = pointer.strip_prefix('/')?;
        let mut here = self;
        for token in rest.split('/') {
            let token: Cow<str> = if token.contains('~') {
                Cow::Owned(token.replace("~1", "/").replace("~0", "~"))
            } else {
                Cow::Borrowed(token)
            };
            here = match here {
                Json::Obj(o) => o.get(&token)?,
                Json::Arr(a) => {
                    if token.len() > 1 && token.starts_with('0') {
                        return None;
                    }
                    a.get(token.parse::<usize>().ok()?)?
                }
                _ => return None,
            };
        }
        Some(here)
    }

    /// A `serde_json::Value` copy (for display and tests; not on the message path).
    pub fn to_value(&self) -> Value {
        match self {
            Json::Null => Value::Null,
            Json::Bool(b) => Value::Bool(*b),
            Json::Num(n) => Value::Number(n.clone()),
            Json::Str(s) => Value::String(s.clone()),
            Json::Arr(a) => Value::Array(a.iter().map(Json::to_value).collect()),
            Json::Obj(o) => Value::Object(o.to_map()),
        }
    }
}

impl std::ops::Index<&str> for Json {
    type Output = Json;

    /// The member `key`, or `null` if there is none (as `Value`'s indexing).
    fn index(&self, key: &str) -> &Json {
        self.get(key).unwrap_or(&NULL)
    }
}

impl std::ops::Index<usize> for Json {
    type Output = Json;

    /// Item `i` of an array, or `null`.
    fn index(&self, i: usize) -> &Json {
        self.as_array().and_then(|a| a.get(i)).unwrap_or(&NULL)
    }
}

impl From<Value> for Json {
    fn from(v: Value) -> Json {
        match v {
            Value::Null => Json::Null,
            Value::Bool(b) => Json::Bool(b),
            Value::Number(n) => Json::Num(n),
            Value::String(s) => Json::Str(s),
            Value::Array(a) => Json::Arr(a.into_iter().map(Json::from).collect()),
            Value::Object(m) => Json::Obj(Obj(m
                .into_iter()
                .map(|(k, v)| (Key::Owned(k), Json::from(v)))
                .collect())),
        }
    }
}

impl From<&str> for Json {
    fn from(s: &str) -> Json {
        Json::Str(s.to_owned())
    }
}

impl From<String> for Json {
    fn from(s: String) -> Json {
        Json::Str(s)
    }
}

impl From<Obj> for Json {
    fn from(o: Obj) -> Json {
        Json::Obj(o)
    }
}

impl From<Vec<Json>> for Json {
    fn from(a: Vec<Json>) -> Json {
        Json::Arr(a)
    }
}

impl std::fmt::Display for Json {
    /// Compact JSON, as `serde_json::Value` displays.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let bytes = super::json::to_vec(self);
        f.write_str(std::str::from_utf8(&bytes).map_err(|_| std::fmt::Error)?)
    }
}

impl serde::Serialize for Json {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Json::Null => s.serialize_unit(),
            Json::Bool(b) => s.serialize_bool(*b),
            Json::Num(n) => n.serialize(s),
            Json::Str(v) => s.serialize_str(v),
            Json::Arr(a) => {
                let mut seq = s.serialize_seq(Some(a.len()))?;
                for item in a {
                    seq.serialize_element(item)?;
                }
                seq.end()
            }
            Json::Obj(o) => {
                let mut map = s.serialize_map(Some(o.len()))?;
                for (k, v) in o.iter() {
                    map.serialize_entry(k, v)?;
                }
                map.end()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn converts_both_ways_keeping_order_and_number_text() {
        let v: Value = serde_json::from_str(r#"{"z":1.50,"a":[true,null,"x",{"k":-0}],"m":{}}"#)
            .expect("json");
        let t = Json::from(v.clone());
        assert_eq!(t.to_value(), v);
        assert_eq!(
            serde_json::to_string(&t).expect("serialise"),
            r#"{"z":1.50,"a":[true,null,"x",{"k":-0}],"m":{}}"#
        );
    }

    #[test]
    fn objects_keep_insertion_order_and_replace_in_place() {
        let mut o = Obj::new();
        o.insert("b", "1");
        o.insert("a", "2");
        o.insert("b", "3");
        assert_eq!(o.remove("x"), None);
        o.insert("c", "4");
        assert_eq!(o.remove("a"), Some(Json::from("2")));
        assert_eq!(Json::Obj(o).to_value(), json!({ "b": "3", "c": "4" }));
    }

    #[test]
    fn lookups_follow_serde_json() {
        let v = json!({ "a": [ { "b~/c": 1 } ], "s": "x" });
        let t = Json::from(v.clone());
        for p in [
            "",
            "/a",
            "/a/0",
            "/a/0/b~0~1c",
            "/a/1",
            "/a/00",
            "/s/0",
            "/nope",
            "a",
        ] {
            assert_eq!(
                t.pointer(p).map(Json::to_value),
                v.pointer(p).cloned(),
                "{p}"
            );
        }
        assert_eq!(t["s"].as_str(), Some("x"));
        assert!(t["nope"].is_null() && t["a"][5].is_null() && t["s"][0].is_null());
        assert_eq!(t["a"][0].as_object().map(Obj::len), Some(1));
    }
}
