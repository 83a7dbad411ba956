//! The input files exactly as written: serde types with `deny_unknown_fields`, so a typo is an
//! error with a location. Values are checked afterwards, in [`crate::spec`], which can then
//! report every problem at once.

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// `services.yaml`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServicesFile {
    /// Which image tags are accepted.
    pub image_policy: Option<RawImagePolicy>,
    /// Values every service inherits.
    pub defaults: Option<RawDefaults>,
    /// The services, by name.
    pub services: Option<UniqueMap<RawService>>,
    /// The Flotilla daemons' own units.
    pub platform: Option<RawPlatform>,
}

/// `image_policy:`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawImagePolicy {
    /// Tags that move and are therefore refused.
    pub moving_tags: Option<Vec<String>>,
    /// A regex every tag must match.
    pub tag_pattern: Option<String>,
}

/// `defaults:`: the inheritable subset of a service.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDefaults {
    pub instances: Option<u32>,
    pub env: Option<UniqueMap<Scalar>>,
    pub labels: Option<UniqueMap<Scalar>>,
    pub memory: Option<Scalar>,
    pub cpus: Option<f64>,
    pub health: Option<RawHealth>,
    pub flotilla: Option<RawFlotilla>,
    pub constraints: Option<RawConstraints>,
    pub restart_sec: Option<Scalar>,
    pub start_timeout: Option<Scalar>,
    pub stop_timeout: Option<Scalar>,
    pub pull: Option<bool>,
    pub rollout: Option<RawRollout>,
}

/// `rollout:`: how `unitgen rollout` replaces instances.
#[derive(Debug, Default, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct RawRollout {
    pub max_unavailable: Option<Scalar>,
    pub max_surge: Option<Scalar>,
    pub progress_deadline: Option<Scalar>,
}

/// One entry of `services:`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawService {
    pub image: Option<String>,
    pub tag: Option<Scalar>,
    pub digest: Option<String>,
    pub description: Option<String>,
    pub instances: Option<u32>,
    pub ports: Option<Vec<RawPort>>,
    pub env: Option<UniqueMap<Scalar>>,
    pub labels: Option<UniqueMap<Scalar>>,
    pub command: Option<Vec<Scalar>>,
    pub volumes: Option<Vec<RawVolume>>,
    pub memory: Option<Scalar>,
    pub cpus: Option<f64>,
    pub health: Option<RawHealth>,
    pub depends_on: Option<Vec<String>>,
    pub sidekick_of: Option<String>,
    pub flotilla: Option<RawFlotilla>,
    pub constraints: Option<RawConstraints>,
    pub restart_sec: Option<Scalar>,
    pub start_timeout: Option<Scalar>,
    pub stop_timeout: Option<Scalar>,
    pub pull: Option<bool>,
    pub rollout: Option<RawRollout>,
}

impl RawService {
    /// Every service this one runs beside, with the field that names it: `depends_on[i]`
    /// entries, then `sidekick_of`.
    pub fn dependencies(&self) -> Vec<(String, String, Option<usize>)> {
        let mut out: Vec<(String, String, Option<usize>)> = self
            .depends_on
            .iter()
            .flatten()
            .enumerate()
            .map(|(i, d)| (d.clone(), "depends_on".to_string(), Some(i)))
            .collect();
        if let Some(main) = &self.sidekick_of {
            out.push((main.clone(), "sidekick_of".to_string(), None));
        }
        out
    }
}

/// `health:`.
#[derive(Debug, Default, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct RawHealth {
    pub cmd: Option<String>,
    pub interval: Option<Scalar>,
    pub timeout: Option<Scalar>,
    pub start_period: Option<Scalar>,
    pub retries: Option<u32>,
}

/// `flotilla:`: how presence registers the service.
#[derive(Debug, Default, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct RawFlotilla {
    pub service: Option<String>,
    pub tags: Option<Vec<String>>,
    pub ignore: Option<bool>,
}

/// `constraints:`.
#[derive(Debug, Default, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct RawConstraints {
    pub metadata: Option<UniqueMap<OneOrMany>>,
    pub max_per_host: Option<u32>,
    pub spread: Option<String>,
}

/// `platform:`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPlatform {
    pub etcd: Option<RawEtcd>,
    pub environment_file: Option<String>,
    pub node_env_file: Option<String>,
    pub presence: Option<RawPresence>,
    pub confgen: Option<RawConfgen>,
}

/// `platform.etcd:`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEtcd {
    pub endpoints: Option<Vec<String>>,
    pub prefix: Option<String>,
    pub cacert: Option<String>,
    pub cert: Option<String>,
    pub key: Option<String>,
    pub user: Option<String>,
    pub password_file: Option<String>,
}

/// `platform.presence:`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPresence {
    pub binary: Option<String>,
    pub ttl: Option<Scalar>,
    pub resync: Option<Scalar>,
    pub explicit: Option<bool>,
    pub docker_host: Option<String>,
    pub state_file: Option<String>,
    pub metrics_addr: Option<String>,
    pub log_format: Option<String>,
    pub metadata: Option<UniqueMap<OneOrMany>>,
    pub args: Option<Vec<Scalar>>,
}

/// `platform.confgen:`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfgen {
    pub binary: Option<String>,
    pub confdir: Option<String>,
    pub metrics_addr: Option<String>,
    pub log_format: Option<String>,
    pub metadata: Option<UniqueMap<OneOrMany>>,
    pub args: Option<Vec<Scalar>>,
}

/// `hosts.yaml`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHostsFile {
    pub hosts: Option<UniqueMap<RawHost>>,
}

/// One host of `hosts.yaml`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHost {
    pub address: Option<String>,
    pub metadata: Option<UniqueMap<Scalar>>,
}

/// The placement lock.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLock {
    pub services: Option<BTreeMap<String, BTreeMap<u32, String>>>,
    pub deployed: Option<BTreeMap<String, RawDeployed>>,
}

/// `deployed.<service>` in the lock: the tags `unitgen rollout` deployed.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDeployed {
    /// The image as services.yaml gave it when the rollout ran.
    pub spec: Option<String>,
    /// Instance number → deployed tag.
    pub tags: Option<BTreeMap<u32, String>>,
}

/// A mapping with string keys that refuses duplicate keys (serde's maps keep the last one
/// silently), pointing at the second occurrence.
#[derive(Debug, Clone)]
pub struct UniqueMap<V>(pub BTreeMap<String, V>);

impl<V> Default for UniqueMap<V> {
    fn default() -> Self {
        UniqueMap(BTreeMap::new())
    }
}

impl<'de, V: Deserialize<'de>> Deserialize<'de> for UniqueMap<V> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct MapV<V>(std::marker::PhantomData<V>);
        impl<'de, V: Deserialize<'de>> Visitor<'de> for MapV<V> {
            type Value = UniqueMap<V>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a mapping")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out = BTreeMap::new();
                let mut seen = BTreeSet::new();
                while let Some(key) = map.next_key_seed(NewKey { seen: &seen })? {
                    seen.insert(key.clone());
                    let value = map.next_value::<V>()?;
                    out.insert(key, value);
                }
                Ok(UniqueMap(out))
            }
        }
        d.deserialize_map(MapV(std::marker::PhantomData))
    }
}

/// Deserializes a key and fails, at the key's position, if it was seen before.
struct NewKey<'s> {
    seen: &'s BTreeSet<String>,
}

impl<'de> DeserializeSeed<'de> for NewKey<'_> {
    type Value = String;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<String, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for NewKey<'_> {
    type Value = String;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string key")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<String, E> {
        if self.seen.contains(v) {
            return Err(E::custom(format!(
                "duplicate key `{v}`; each key may appear once"
            )));
        }
        Ok(v.to_string())
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<String, E> {
        self.visit_str(&v.to_string())
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<String, E> {
        self.visit_str(&v.to_string())
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<String, E> {
        self.visit_str(&v.to_string())
    }
}

/// Implements `Deserialize` for a value written in a short form, a string or one of the
/// listed scalar kinds (`u64`, `i64`, `bool`) taken as its text, and maybe a long form: the
/// further visitor methods in braces (`visit_map`, `visit_seq`), or refusals (`visit_f64`).
/// Arguments: the type, what it expects (the error message's words), the scalar kinds, the
/// value of a text `|text| …`, the further methods.
macro_rules! short_or_long {
    (
        $ty:ident, $expecting:expr,
        scalars: [$($scalar:ident),*],
        short: |$text:ident| $short:expr,
        { $($long:tt)* }
    ) => {
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl<'de> Visitor<'de> for V {
                    type Value = $ty;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        f.write_str($expecting)
                    }
                    fn visit_str<E: de::Error>(self, v: &str) -> Result<$ty, E> {
                        let $text = v.to_string();
                        Ok($short)
                    }
                    $(short_or_long!(@scalar $scalar);)*
                    $($long)*
                }
                d.deserialize_any(V)
            }
        }
    };
    (@scalar u64) => {
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
            self.visit_str(&v.to_string())
        }
    };
    (@scalar i64) => {
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
            self.visit_str(&v.to_string())
        }
    };
    (@scalar bool) => {
        fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
            self.visit_str(&v.to_string())
        }
    };
}

/// A scalar written as a string, an integer or a boolean, kept as text (`8080`, `true`).
/// Floats are refused, because YAML would reformat them (`1.10` reads as `1.1`): quote them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scalar(pub String);

short_or_long! {
    Scalar, "a string, an integer or a boolean",
    scalars: [u64, i64, bool],
    short: |text| Scalar(text),
    {
        fn visit_f64<E: de::Error>(self, v: f64) -> Result<Scalar, E> {
            Err(E::custom(format!(
                "the number {v} would be reformatted by YAML; write it as a quoted string"
            )))
        }
    }
}

/// A string or a list of strings (`role: web` or `role: [web, edge]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OneOrMany(pub Vec<Scalar>);

short_or_long! {
    OneOrMany, "a value or a list of values",
    scalars: [u64, i64, bool],
    short: |text| OneOrMany(vec![Scalar(text)]),
    {
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<OneOrMany, A::Error> {
            let mut out = Vec::new();
            while let Some(v) = seq.next_element::<Scalar>()? {
                out.push(v);
            }
            Ok(OneOrMany(out))
        }
    }
}

/// A published port: `80`, `"8080:80"`, `"127.0.0.1:8080:80/udp"`, or the long form
/// `{container: 80, host: 8080, ip: 127.0.0.1, proto: tcp, service: web-http}`.
#[derive(Debug, Clone)]
pub enum RawPort {
    /// The short form, parsed later.
    Short(String),
    /// The long form.
    Long(RawPortLong),
}

/// The long form of a port.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPortLong {
    pub container: Option<u32>,
    pub host: Option<u32>,
    pub ip: Option<String>,
    pub proto: Option<String>,
    pub service: Option<String>,
}

short_or_long! {
    RawPort, "a port (`80`, `\"8080:80/tcp\"`) or a mapping with `container:`",
    scalars: [u64, i64],
    short: |text| RawPort::Short(text),
    {
        fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<RawPort, A::Error> {
            RawPortLong::deserialize(de::value::MapAccessDeserializer::new(map)).map(RawPort::Long)
        }
    }
}

/// A volume: `"/srv/data:/data:ro"`, `"cache:/cache"`, or
/// `{source: /srv/data, target: /data, read_only: true}`.
#[derive(Debug, Clone)]
pub enum RawVolume {
    /// The short form, parsed later.
    Short(String),
    /// The long form.
    Long(RawVolumeLong),
}

/// The long form of a volume.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawVolumeLong {
    pub source: Option<String>,
    pub target: Option<String>,
    pub read_only: Option<bool>,
}

short_or_long! {
    RawVolume, "a volume (`\"/src:/dst[:ro]\"`) or a mapping with `source:` and `target:`",
    scalars: [],
    short: |text| RawVolume::Short(text),
    {
        fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<RawVolume, A::Error> {
            RawVolumeLong::deserialize(de::value::MapAccessDeserializer::new(map))
                .map(RawVolume::Long)
        }
    }
}
