//! The JSON tree a resource is built in, turned into the Bundle's [`Json`] tree once complete.
//!
//! Like [`Json`] (see `fhir::tree` for why not `serde_json::Value`), an object is a short vector
//! of members and keys are catalogue names (the compiled plan's target steps point into the FHIR
//! R4 catalogue) or literals, so a write of `name[0].given[1]` costs comparisons, not hashes and
//! allocations. The one addition is the reference placeholder, a variant of its own so finding
//! one is a match rather than a string parse; the conversion at the end is a move, which also
//! drops the empty elements FHIR forbids.

use crate::fhir::tree::{self, Json, Key};

/// A JSON value under construction. Its variants mirror [`Json`]'s (same size), so the final
/// conversion reuses every vector in place rather than allocating the tree again.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Node {
    Obj(Obj),
    Arr(Vec<Node>),
    Str(String),
    Bool(bool),
    /// A number keeps its text: `1.50` stays `1.50`.
    Num(serde_json::Number),
    /// A reference to pending reference `n`, replaced by a `urn:uuid:` (or removed) once every
    /// resource of the message is built. Only ever the value of a `reference` key.
    Ref(usize),
}

/// A JSON object in insertion order.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Obj(Vec<(Key, Node)>);

impl Obj {
    pub fn new() -> Self {
        Obj(Vec::new())
    }

    pub fn with_capacity(n: usize) -> Self {
        Obj(Vec::with_capacity(n))
    }

    pub fn get(&self, key: &str) -> Option<&Node> {
        self.0
            .iter()
            .find(|(k, _)| same_key(k, key))
            .map(|(_, v)| v)
    }

    pub fn get_mut(&mut self, key: &str) -> Option<&mut Node> {
        self.0
            .iter_mut()
            .find(|(k, _)| same_key(k, key))
            .map(|(_, v)| v)
    }

    /// The value of `key`, inserted with `make` at the end if absent.
    pub fn entry(&mut self, key: impl Into<Key>, make: impl FnOnce() -> Node) -> &mut Node {
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

    /// Sets `key`: an existing key keeps its position (as `IndexMap::insert` does).
    pub fn insert(&mut self, key: impl Into<Key>, value: Node) {
        let key = key.into();
        match self.get_mut(&key) {
            Some(slot) => *slot = value,
            None => self.0.push((key, value)),
        }
    }

    /// Sets `key` at position `at` (or where it already is).
    pub fn insert_at(&mut self, at: usize, key: impl Into<Key>, value: Node) {
        let key = key.into();
        match self.get_mut(&key) {
            Some(slot) => *slot = value,
            None => self.0.insert(at.min(self.0.len()), (key, value)),
        }
    }

    pub fn remove(&mut self, key: &str) -> Option<Node> {
        let i = self.0.iter().position(|(k, _)| same_key(k, key))?;
        Some(self.0.remove(i).1)
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut Node> {
        self.0.iter_mut().map(|(_, v)| v)
    }

    /// The finished object, without its empty members (see [`Node::into_pruned_json`]). Its
    /// keys are unique: every write went through `insert`/`entry`.
    pub fn into_pruned_json(self) -> tree::Obj {
        tree::Obj::from_unique(
            self.0
                .into_iter()
                .filter_map(|(k, v)| Some((k, v.into_pruned_json()?)))
                .collect(),
        )
    }
}

/// Key equality, cheap in the common cases: a target step's name is the catalogue's own
/// `&'static str`, so equal keys are usually the same pointer, and unequal ones usually differ
/// in length or first letter (no `memcmp` call for either).
fn same_key(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && (std::ptr::eq(a.as_ptr(), b.as_ptr())
            || (a.as_bytes().first() == b.as_bytes().first() && a == b))
}

impl Node {
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Node::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The JSON value without empty objects, arrays and strings (FHIR forbids them), or `None`
    /// if nothing is left of it. A [`Node::Ref`] still here had no target (see
    /// [`super::set::resolve_refs`]): it goes too, and so does its `reference` element if that
    /// was all it held. One walk that moves every vector in place (same layout).
    pub fn into_pruned_json(self) -> Option<Json> {
        match self {
            Node::Obj(o) => {
                let o = o.into_pruned_json();
                (!o.is_empty()).then_some(Json::Obj(o))
            }
            Node::Arr(a) => {
                let a: Vec<Json> = a.into_iter().filter_map(Node::into_pruned_json).collect();
                (!a.is_empty()).then_some(Json::Arr(a))
            }
            Node::Str(s) => (!s.is_empty()).then_some(Json::Str(s)),
            Node::Bool(b) => Some(Json::Bool(b)),
            Node::Num(n) => Some(Json::Num(n)),
            Node::Ref(_) => None,
        }
    }

    /// The pending reference this element stands for: an object whose `reference` is a
    /// placeholder.
    pub fn placeholder(&self) -> Option<usize> {
        match self {
            Node::Obj(o) => match o.get("reference") {
                Some(Node::Ref(i)) => Some(*i),
                _ => None,
            },
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_have_the_size_of_the_finished_trees_members() {
        assert_eq!(
            std::mem::size_of::<(Key, Node)>(),
            std::mem::size_of::<(Key, Json)>()
        );
        assert_eq!(std::mem::size_of::<Node>(), std::mem::size_of::<Json>());
    }

    #[test]
    fn objects_keep_insertion_order_and_replace_in_place() {
        let mut o = Obj::new();
        o.insert("b", Node::Str("1".into()));
        o.insert("a", Node::Str("2".into()));
        o.insert("b", Node::Str("3".into()));
        o.insert_at(0, "resourceType", Node::Str("Patient".into()));
        o.insert_at(0, "a", Node::Str("4".into()));
        let v = Json::Obj(o.into_pruned_json());
        assert_eq!(
            serde_json::to_string(&v).expect("json"),
            r#"{"resourceType":"Patient","b":"3","a":"4"}"#
        );
    }

    #[test]
    fn pruning_removes_empty_elements_and_unresolved_references() {
        let mut inner = Obj::new();
        inner.insert("reference", Node::Ref(0));
        let mut o = Obj::new();
        o.insert("subject", Node::Obj(inner));
        o.insert(
            "name",
            Node::Arr(vec![Node::Obj(Obj::new()), Node::Str(String::new())]),
        );
        o.insert("active", Node::Bool(false));
        assert_eq!(
            Json::Obj(o.into_pruned_json()).to_value(),
            serde_json::json!({ "active": false })
        );
        let mut empty = Obj::new();
        empty.insert("name", Node::Arr(vec![Node::Str(String::new())]));
        assert_eq!(Node::Obj(empty).into_pruned_json(), None);
    }
}
