//! Reading a typed model (fhir-sdk's `Bundle`, for validation) straight from a [`Json`] tree,
//! borrowing its strings, as `serde_json` does from a `&Value`.
//!
//! Numbers are offered as what they are: an integer as `u64`/`i64`, anything else as the
//! nearest `f64`. (A `Value` built with `arbitrary_precision` offers a decimal such as `4.20`
//! as a one-entry map instead, which typed models that buffer their input cannot read.)

use serde::de::value::{BorrowedStrDeserializer, MapDeserializer, SeqDeserializer};
use serde::de::{self, Error as _, IntoDeserializer, Visitor};

use super::Json;

/// A message naming what did not fit (element names and types, never values).
pub type Error = de::value::Error;

impl<'de> IntoDeserializer<'de, Error> for &'de Json {
    type Deserializer = Self;

    fn into_deserializer(self) -> Self {
        self
    }
}

impl<'de> de::Deserializer<'de> for &'de Json {
    type Error = Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match self {
            Json::Null => visitor.visit_unit(),
            Json::Bool(b) => visitor.visit_bool(*b),
            Json::Num(n) => {
                if let Some(u) = n.as_u64() {
                    visitor.visit_u64(u)
                } else if let Some(i) = n.as_i64() {
                    visitor.visit_i64(i)
                } else if let Some(f) = n.as_f64().filter(|f| f.is_finite()) {
                    visitor.visit_f64(f)
                } else {
                    Err(Error::custom("a number outside the range of a double"))
                }
            }
            Json::Str(s) => visitor.visit_borrowed_str(s),
            Json::Arr(a) => {
                let mut seq = SeqDeserializer::new(a.iter());
                let v = visitor.visit_seq(&mut seq)?;
                seq.end()?;
                Ok(v)
            }
            Json::Obj(o) => {
                let mut map = MapDeserializer::new(
                    o.iter()
                        .map(|(k, v)| (BorrowedStrDeserializer::<Error>::new(k), v)),
                );
                let v = visitor.visit_map(&mut map)?;
                map.end()?;
                Ok(v)
            }
        }
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match self {
            Json::Null => visitor.visit_none(),
            _ => visitor.visit_some(self),
        }
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Error> {
        visitor.visit_newtype_struct(self)
    }

    /// A unit variant is a string (`"final"`); a variant with data a one-member object.
    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        match self {
            Json::Str(s) => visitor.visit_enum(BorrowedStrDeserializer::<Error>::new(s)),
            Json::Obj(o) if o.len() == 1 => {
                let map = MapDeserializer::new(
                    o.iter()
                        .map(|(k, v)| (BorrowedStrDeserializer::<Error>::new(k), v)),
                );
                visitor.visit_enum(de::value::MapAccessDeserializer::new(map))
            }
            _ => Err(Error::invalid_type(
                unexpected(self),
                &"a string or a one-member object",
            )),
        }
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        unit unit_struct seq tuple tuple_struct map struct identifier ignored_any
    }
}

fn unexpected(v: &Json) -> de::Unexpected<'_> {
    match v {
        Json::Null => de::Unexpected::Unit,
        Json::Bool(b) => de::Unexpected::Bool(*b),
        Json::Num(_) => de::Unexpected::Other("a number"),
        Json::Str(_) => de::Unexpected::Other("a string"),
        Json::Arr(_) => de::Unexpected::Seq,
        Json::Obj(_) => de::Unexpected::Map,
    }
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(rename_all = "camelCase")]
    enum Status {
        Final,
        EnteredInError,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    struct Obs<'a> {
        status: Status,
        #[serde(borrow)]
        code: &'a str,
        value: Option<f64>,
        count: Option<u32>,
        tags: Vec<String>,
        #[serde(flatten)]
        rest: std::collections::BTreeMap<String, serde_json::Value>,
    }

    fn tree(s: &str) -> Json {
        Json::from(serde_json::from_str::<serde_json::Value>(s).expect("json"))
    }

    #[test]
    fn reads_typed_models_borrowing_strings_and_buffering_decimals() {
        // `flatten` buffers every member, decimals included: the path that fails on a `Value`
        // with arbitrary precision.
        let t = tree(
            r#"{"status":"enteredInError","code":"x","value":4.20,"count":3,"tags":["a"],"extra":null}"#,
        );
        let o = Obs::deserialize(&t).expect("reads");
        assert_eq!(o.status, Status::EnteredInError);
        assert_eq!((o.code, o.value, o.count), ("x", Some(4.2), Some(3)));
        assert_eq!(o.rest.len(), 1);
    }

    #[test]
    fn wrong_types_are_errors_not_panics() {
        for bad in [
            r#"{"status":"done","code":"x","tags":[]}"#,
            r#"{"status":"final","code":1,"tags":[]}"#,
            r#"{"status":"final","code":"x","count":-1,"tags":[]}"#,
            r#"{"status":"final","code":"x","value":"4.2","tags":[]}"#,
            r#"{"status":["final"],"code":"x","tags":[]}"#,
            r#"{"status":"final","code":"x","tags":{}}"#,
            r#"{"status":"final","code":"x","value":1e400,"tags":[]}"#,
        ] {
            let t = tree(bad);
            assert!(Obs::deserialize(&t).is_err(), "{bad}");
        }
    }
}
