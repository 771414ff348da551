//! The config file as written: every key optional, durations and sizes as raw TOML values,
//! so that one bad value does not hide the others. `validate` turns it into `Config`.

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;
use toml::Value;

use super::locate::KeyPath;
use super::rule::RawRule;

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawConfig {
    pub gateway: RawGateway,
    pub local: RawLocal,
    pub cloud: RawCloud,
    pub queue: RawQueue,
    pub uplink: Vec<RawUplink>,
    pub downlink: Vec<RawDownlink>,
    pub modbus: Vec<RawModbus>,
    pub serial: Vec<RawSerial>,
    pub rule: Vec<RawRule>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawGateway {
    pub id: Option<String>,
    pub data_dir: Option<String>,
    pub metrics_topic: Option<String>,
    pub metrics_interval: Option<Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawLocal {
    pub listen: Option<String>,
    pub listen_v5: Option<String>,
    pub max_payload: Option<Value>,
    pub max_connections: Option<i64>,
    pub connect_timeout: Option<Value>,
    pub max_keep_alive: Option<Value>,
    pub password_file: Option<String>,
    pub allow_anonymous: Option<bool>,
    pub acl_file: Option<String>,
    pub max_subscriptions: Option<i64>,
    pub tls_listen: Option<String>,
    pub cert_file: Option<String>,
    pub key_file: Option<String>,
    pub ca_file: Option<String>,
    pub require_certificate: Option<bool>,
    pub use_identity_as_username: Option<bool>,
    pub max_retained_size: Option<Value>,
    pub max_queued_messages: Option<i64>,
    pub max_queued_bytes: Option<Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawCloud {
    /// One URL, or a list of the nodes to fail over across.
    pub url: Option<Value>,
    pub client_id: Option<String>,
    pub command_client_id: Option<String>,
    pub keep_alive: Option<Value>,
    pub max_packet_size: Option<Value>,
    pub ca_file: Option<String>,
    pub cert_file: Option<String>,
    pub key_file: Option<String>,
    pub username: Option<String>,
    pub password_file: Option<String>,
    pub status_topic: Option<String>,
    pub max_inflight: Option<i64>,
    pub reconnect_min: Option<Value>,
    pub reconnect_max: Option<Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawQueue {
    pub max_size: Option<Value>,
    pub when_full: Option<String>,
    pub max_age: Option<Value>,
    pub commit_interval: Option<Value>,
    pub commit_batch: Option<i64>,
    pub synchronous: Option<String>,
    pub dead_letter_max_size: Option<Value>,
    pub drain_rate: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawUplink {
    pub topic: Option<String>,
    pub remote_prefix: Option<String>,
    pub qos: Option<i64>,
    pub drain: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawDownlink {
    pub topic: Option<String>,
    pub remote_prefix: Option<String>,
    pub local_prefix: Option<String>,
    pub qos: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawModbus {
    pub name: Option<String>,
    pub transport: Option<String>,
    pub device: Option<String>,
    pub baud: Option<i64>,
    pub parity: Option<String>,
    pub data_bits: Option<i64>,
    pub stop_bits: Option<i64>,
    pub address: Option<String>,
    pub unit: Option<i64>,
    pub poll: Option<Value>,
    pub timeout: Option<Value>,
    pub max_gap: Option<i64>,
    pub read: Vec<RawRead>,
    pub write: Vec<RawWrite>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawRead {
    pub topic: Option<String>,
    pub kind: Option<String>,
    pub address: Option<i64>,
    #[serde(rename = "type")]
    pub value_type: Option<String>,
    pub scale: Option<Value>,
    pub offset: Option<Value>,
    pub byte_order: Option<String>,
    pub word_order: Option<String>,
    pub payload: Option<String>,
    pub on_change: Option<bool>,
    pub deadband: Option<Value>,
    pub heartbeat: Option<Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawWrite {
    pub topic: Option<String>,
    pub kind: Option<String>,
    pub address: Option<i64>,
    #[serde(rename = "type")]
    pub value_type: Option<String>,
    pub scale: Option<Value>,
    pub byte_order: Option<String>,
    pub word_order: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawSerial {
    pub name: Option<String>,
    pub device: Option<String>,
    pub baud: Option<i64>,
    pub parity: Option<String>,
    pub data_bits: Option<i64>,
    pub stop_bits: Option<i64>,
    pub format: Option<String>,
    pub topic: Option<String>,
    pub command_topic: Option<String>,
    pub max_line: Option<Value>,
}

/// What came out of deserializing: the raw config (unless a value had the wrong TOML
/// type, which stops serde) and every unknown key seen.
pub struct Parsed {
    pub config: Result<RawConfig, WrongType>,
    pub unknown_keys: Vec<KeyPath>,
}

pub struct WrongType {
    pub path: KeyPath,
    pub message: String,
    /// Byte range of the offending value, when toml knows it.
    pub span: Option<std::ops::Range<usize>>,
}

pub fn parse(text: &str) -> Parsed {
    let mut unknown_keys = Vec::new();
    let mut note_unknown = |path: serde_ignored::Path<'_>| unknown_keys.push(KeyPath::from(&path));
    let ignoring =
        serde_ignored::Deserializer::new(toml::Deserializer::new(text), &mut note_unknown);
    let config = serde_path_to_error::deserialize(ignoring).map_err(|error| {
        let path = KeyPath::from(error.path());
        WrongType {
            message: in_toml_words(error.inner().message(), &path),
            span: error.inner().span(),
            path,
        }
    });
    Parsed {
        config,
        unknown_keys,
    }
}

/// serde names TOML's tables "map", arrays "sequence", and our types as Rust spells them.
fn in_toml_words(message: &str, path: &KeyPath) -> String {
    let Some((found, expected)) = message.split_once(", expected ") else {
        return message.to_owned();
    };
    let found = match found {
        "invalid type: map" => "invalid type: table".to_owned(),
        "invalid type: sequence" => "invalid type: array".to_owned(),
        _ => match found.strip_prefix("invalid type: floating point") {
            Some(value) => format!("invalid type: float{value}"),
            None => found.to_owned(),
        },
    };
    let expected = match expected {
        "i64" => "an integer".to_owned(),
        "a sequence" => format!("an array of tables, written [[{path}]]"),
        _ if expected.starts_with("struct ") => "a table".to_owned(),
        _ => expected.to_owned(),
    };
    format!("{found}, expected {expected}")
}

/// The keys accepted in the table an unknown key was found in, for the error message.
pub fn accepted_keys(unknown: &KeyPath) -> &'static [&'static str] {
    match unknown.table_name().as_str() {
        "" => field_names::<RawConfig>(),
        "gateway" => field_names::<RawGateway>(),
        "local" => field_names::<RawLocal>(),
        "cloud" => field_names::<RawCloud>(),
        "queue" => field_names::<RawQueue>(),
        "uplink" => field_names::<RawUplink>(),
        "downlink" => field_names::<RawDownlink>(),
        "modbus" => field_names::<RawModbus>(),
        "modbus.read" => field_names::<RawRead>(),
        "modbus.write" => field_names::<RawWrite>(),
        "serial" => field_names::<RawSerial>(),
        "rule" => field_names::<RawRule>(),
        _ => &[],
    }
}

/// The field names serde's derive knows for `T`, so the list in error messages cannot
/// drift from the structs above.
fn field_names<T: for<'de> Deserialize<'de>>() -> &'static [&'static str] {
    let mut names: &'static [&'static str] = &[];
    // The probe always fails once it has seen the fields; the names are what we want.
    let _ = T::deserialize(FieldProbe(&mut names));
    names
}

struct FieldProbe<'a>(&'a mut &'static [&'static str]);

impl<'de> Deserializer<'de> for FieldProbe<'_> {
    type Error = de::value::Error;

    fn deserialize_any<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value, Self::Error> {
        Err(de::Error::custom("only structs are probed"))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, Self::Error> {
        *self.0 = fields;
        Err(de::Error::custom("probed"))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
        ignored_any
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_names_come_from_the_structs() {
        assert_eq!(
            field_names::<RawConfig>(),
            [
                "gateway", "local", "cloud", "queue", "uplink", "downlink", "modbus", "serial",
                "rule"
            ]
        );
        assert_eq!(
            field_names::<RawUplink>(),
            ["topic", "remote_prefix", "qos", "drain"]
        );
        let unknown = KeyPath::default().key("downlink").index(2).key("prefix");
        assert_eq!(
            accepted_keys(&unknown),
            ["topic", "remote_prefix", "local_prefix", "qos"]
        );
    }

    #[test]
    fn collects_every_unknown_key() {
        let parsed = parse("bogus = 1\n[cloud]\nurl = \"x\"\nuRL = 2\n[[uplink]]\ntopic = \"a\"\n[[uplink]]\ntopik = \"b\"\n[bacnet]\nname = \"m\"\n");
        let unknown: Vec<String> = parsed
            .unknown_keys
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(unknown, ["bogus", "cloud.uRL", "uplink[2].topik", "bacnet"]);
        assert!(parsed.config.is_ok());
    }

    #[test]
    fn a_wrong_type_names_its_key() {
        let parsed = parse("[[uplink]]\ntopic = \"a\"\n[[uplink]]\nqos = \"1\"\n");
        let Err(wrong) = parsed.config else {
            panic!("a string qos must not deserialize");
        };
        assert_eq!(wrong.path.to_string(), "uplink[2].qos");
        assert_eq!(
            wrong.message,
            "invalid type: string \"1\", expected an integer"
        );
        assert!(wrong.span.is_some());
    }

    fn wrong_type_message(text: &str) -> String {
        match parse(text).config {
            Ok(config) => panic!("{text:?} must not deserialize: {config:?}"),
            Err(wrong) => format!("{}: {}", wrong.path, wrong.message),
        }
    }

    #[test]
    fn wrong_types_are_told_in_toml_words() {
        assert_eq!(
            wrong_type_message("[uplink]\ntopic = \"a\"\n"),
            "uplink: invalid type: table, expected an array of tables, written [[uplink]]"
        );
        assert_eq!(
            wrong_type_message("gateway = 5\n"),
            "gateway: invalid type: integer `5`, expected a table"
        );
        assert_eq!(
            wrong_type_message("[[uplink]]\nqos = 1.0\n"),
            "uplink[1].qos: invalid type: float `1.0`, expected an integer"
        );
        assert_eq!(
            wrong_type_message("[cloud]\nusername = [\"x\"]\n"),
            "cloud.username: invalid type: array, expected a string"
        );
    }
}
