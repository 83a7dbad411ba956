//! Field paths (`services.web.ports[0].container`) and finding them again in the YAML text.
//!
//! serde_norway reports a line and column for the errors it raises itself (syntax, wrong type,
//! unknown field), but the semantic checks that run after deserialization (a moving tag, a
//! `depends_on` naming nobody, an impossible constraint) only know *which field* is wrong. To
//! point at it, [`locate`] re-reads the document with serde_norway and a probe that walks down
//! the path and fails on purpose at the node it names: serde_norway then attaches that node's
//! start mark to the failure, which is exactly the location we want. The YAML parser that
//! produced the data therefore also produces the location, so flow style, quoting, comments and
//! anchors cannot make the two disagree.

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use std::fmt;

/// One step of a [`FieldPath`]: a mapping key or a sequence index.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Seg {
    /// A mapping key.
    Key(String),
    /// A sequence index, from 0.
    Index(usize),
}

/// The path of a value inside a YAML document, displayed like serde_norway's own paths:
/// `services.web.ports[0].container`.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct FieldPath(Vec<Seg>);

impl FieldPath {
    /// The document root.
    pub fn root() -> Self {
        FieldPath(Vec::new())
    }

    /// A path made of mapping keys only.
    pub fn keys(keys: &[&str]) -> Self {
        FieldPath(keys.iter().map(|k| Seg::Key((*k).to_string())).collect())
    }

    /// This path extended by a mapping key.
    pub fn key(&self, key: &str) -> Self {
        let mut segs = self.0.clone();
        segs.push(Seg::Key(key.to_string()));
        FieldPath(segs)
    }

    /// This path extended by a sequence index.
    pub fn index(&self, index: usize) -> Self {
        let mut segs = self.0.clone();
        segs.push(Seg::Index(index));
        FieldPath(segs)
    }

    /// The steps of this path.
    pub fn segments(&self) -> &[Seg] {
        &self.0
    }

    /// The path without its last step (the root stays the root).
    pub fn parent(&self) -> Self {
        let mut segs = self.0.clone();
        segs.pop();
        FieldPath(segs)
    }
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str(".");
        }
        for (i, seg) in self.0.iter().enumerate() {
            match seg {
                Seg::Key(k) if i == 0 => f.write_str(k)?,
                Seg::Key(k) => write!(f, ".{k}")?,
                Seg::Index(n) => write!(f, "[{n}]")?,
            }
        }
        Ok(())
    }
}

/// A 1-based line and column in a source file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Location {
    /// Line, from 1.
    pub line: usize,
    /// Column, from 1.
    pub column: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.column)
    }
}

/// Marker the probe puts in its deliberate failure, so it is never mistaken for a real error.
const PROBE_HIT: &str = "\u{1}unitgen-probe-hit\u{1}";

/// Where the value at `path` starts in `text`, or `None` when the document has no such value
/// (for instance, when it was inherited from `defaults`) or does not parse.
pub fn locate(text: &str, path: &FieldPath) -> Option<Location> {
    let de = serde_norway::Deserializer::from_str(text);
    match (Probe { path: &path.0 }).deserialize(de) {
        Err(err) if err.to_string().contains(PROBE_HIT) => err.location().map(|l| Location {
            line: l.line(),
            column: l.column(),
        }),
        _ => None,
    }
}

/// Like [`locate`], but falls back to the nearest ancestor that exists, so a missing field is
/// reported where it would have to be added. `None` only when not even the root can be found.
pub fn locate_nearest(text: &str, path: &FieldPath) -> Option<(FieldPath, Location)> {
    let mut candidate = path.clone();
    loop {
        if let Some(loc) = locate(text, &candidate) {
            return Some((candidate, loc));
        }
        if candidate.0.is_empty() {
            return None;
        }
        candidate = candidate.parent();
    }
}

struct Probe<'p> {
    path: &'p [Seg],
}

impl<'de> DeserializeSeed<'de> for Probe<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        if self.path.is_empty() {
            // Every visit method of `Hit` keeps serde's default, which fails with "invalid type
            // ..., expected <Hit::expecting>"; serde_norway adds the node's position to it.
            d.deserialize_any(Hit).map(|_| ())
        } else {
            d.deserialize_any(Walk { path: self.path })
        }
    }
}

struct Hit;

impl<'de> Visitor<'de> for Hit {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(PROBE_HIT)
    }
}

struct Walk<'p> {
    path: &'p [Seg],
}

impl<'de> Visitor<'de> for Walk<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let (first, rest) = self.path.split_first().expect("Walk has a non-empty path");
        while let Some(key) = map.next_key::<KeyText>()? {
            match (first, key.0) {
                (Seg::Key(want), Some(got)) if *want == got => {
                    map.next_value_seed(Probe { path: rest })?;
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let (first, rest) = self.path.split_first().expect("Walk has a non-empty path");
        let mut index = 0;
        loop {
            let found = match first {
                Seg::Index(want) if *want == index => {
                    seq.next_element_seed(Probe { path: rest })?
                }
                _ => seq.next_element::<IgnoredAny>()?.map(|_| ()),
            };
            if found.is_none() {
                return Ok(());
            }
            index += 1;
        }
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
    fn visit_enum<A: de::EnumAccess<'de>>(self, data: A) -> Result<(), A::Error> {
        // A tagged value (`!tag x`): the path cannot continue through it.
        let (IgnoredAny, variant) = data.variant::<IgnoredAny>()?;
        de::VariantAccess::newtype_variant::<IgnoredAny>(variant)?;
        Ok(())
    }
}

/// A mapping key as text, when it is a scalar; `None` for keys that are mappings or sequences.
struct KeyText(Option<String>);

impl<'de> de::Deserialize<'de> for KeyText {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = KeyText;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a mapping key")
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<KeyText, E> {
                Ok(KeyText(Some(v.to_string())))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<KeyText, E> {
                Ok(KeyText(Some(v.to_string())))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<KeyText, E> {
                Ok(KeyText(Some(v.to_string())))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<KeyText, E> {
                Ok(KeyText(Some(v.to_string())))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<KeyText, E> {
                Ok(KeyText(Some(v.to_string())))
            }
            fn visit_unit<E: de::Error>(self) -> Result<KeyText, E> {
                Ok(KeyText(None))
            }
            fn visit_none<E: de::Error>(self) -> Result<KeyText, E> {
                Ok(KeyText(None))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<KeyText, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(KeyText(None))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<KeyText, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(KeyText(None))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = "\
# a comment
services:
  web:
    image: \"acme/web:git-1\"
    ports: [80, {container: 443, host: 8443}]
    env:
      A: b
  db: {image: db:1, instances: 2}
";

    fn at(path: &FieldPath) -> Option<(usize, usize)> {
        locate(DOC, path).map(|l| (l.line, l.column))
    }

    #[test]
    fn finds_block_and_flow_values() {
        assert_eq!(
            at(&FieldPath::keys(&["services", "web", "image"])),
            Some((4, 12))
        );
        assert_eq!(
            at(&FieldPath::keys(&["services", "web", "env", "A"])),
            Some((7, 10))
        );
        assert_eq!(
            at(&FieldPath::keys(&["services", "db", "instances"])),
            Some((8, 32))
        );
        let ports = FieldPath::keys(&["services", "web", "ports"]);
        assert_eq!(at(&ports.index(0)), Some((5, 13)));
        assert_eq!(at(&ports.index(1).key("host")), Some((5, 40)));
    }

    #[test]
    fn missing_paths_are_none_and_nearest_falls_back() {
        let missing = FieldPath::keys(&["services", "web", "instances"]);
        assert_eq!(at(&missing), None);
        assert_eq!(
            at(&FieldPath::keys(&["services", "web", "ports"]).index(5)),
            None
        );
        let (found, loc) = locate_nearest(DOC, &missing).unwrap();
        assert_eq!(found.to_string(), "services.web");
        assert_eq!((loc.line, loc.column), (4, 5));
    }

    #[test]
    fn follows_aliases_to_the_anchor() {
        let doc = "base: &b {x: 1}\nuse: *b\n";
        let loc = locate(doc, &FieldPath::keys(&["use", "x"])).unwrap();
        assert_eq!((loc.line, loc.column), (1, 14));
    }

    #[test]
    fn displays_like_serde_norway() {
        let p = FieldPath::keys(&["services", "web", "ports"])
            .index(2)
            .key("host");
        assert_eq!(p.to_string(), "services.web.ports[2].host");
        assert_eq!(FieldPath::root().to_string(), ".");
    }
}
