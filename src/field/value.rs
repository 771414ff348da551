//! Values in Modbus registers: decoding readings, encoding writes, parsing command payloads
//! and formatting what is published.

use crate::config::{Layout, Order, ValueType};

/// A decoded reading before scaling.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Raw {
    Bool(bool),
    Unsigned(u64),
    Signed(i64),
    Float(f64),
}

/// A reading after `scale` and `offset`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Reading {
    Bool(bool),
    /// Unscaled integers stay exact (a u64 counter does not fit an f64).
    Unsigned(u64),
    Signed(i64),
    Float(f64),
}

impl Reading {
    /// The number the deadband compares.
    pub fn as_f64(self) -> f64 {
        match self {
            Reading::Bool(b) => f64::from(u8::from(b)),
            Reading::Unsigned(n) => n as f64,
            Reading::Signed(n) => n as f64,
            Reading::Float(x) => x,
        }
    }

    /// `25.5`, `true`, `-3`: as published with `payload = "plain"`.
    pub fn plain(self) -> String {
        match self {
            Reading::Bool(b) => b.to_string(),
            Reading::Unsigned(n) => n.to_string(),
            Reading::Signed(n) => n.to_string(),
            Reading::Float(x) => format_float(x),
        }
    }

    /// `{"value":25.5,"ts":1732550000000}`; with a wall clock that is not trusted yet
    /// (promise 7) `{"value":25.5,"ts":5000,"clock":"untrusted"}`.
    pub fn json(self, unix_ms: u64, clock_trusted: bool) -> String {
        let value = match self {
            Reading::Float(x) if !x.is_finite() => format!("\"{}\"", format_float(x)),
            other => other.plain(),
        };
        let clock = if clock_trusted {
            ""
        } else {
            ",\"clock\":\"untrusted\""
        };
        format!("{{\"value\":{value},\"ts\":{unix_ms}{clock}}}")
    }
}

/// Shortest text that reads back as the same f64, with scaling noise removed
/// (`255 * 0.1` is `25.500000000000004` in binary; users want `25.5`).
fn format_float(x: f64) -> String {
    if !x.is_finite() {
        return x.to_string();
    }
    let rounded: f64 = format!("{x:.12e}").parse().unwrap_or(x);
    rounded.to_string()
}

/// The registers as the value's bytes, most significant first.
fn ordered_bytes(words: &[u16], layout: Layout) -> Vec<u8> {
    let mut words = words.to_vec();
    if layout.word_order == Order::Little {
        words.reverse();
    }
    words
        .iter()
        .flat_map(|word| match layout.byte_order {
            Order::Big => word.to_be_bytes(),
            Order::Little => word.to_le_bytes(),
        })
        .collect()
}

/// Inverse of [`ordered_bytes`].
fn ordered_words(bytes: &[u8], layout: Layout) -> Vec<u16> {
    let mut words: Vec<u16> = bytes
        .chunks_exact(2)
        .map(|pair| match layout.byte_order {
            Order::Big => u16::from_be_bytes([pair[0], pair[1]]),
            Order::Little => u16::from_le_bytes([pair[0], pair[1]]),
        })
        .collect();
    if layout.word_order == Order::Little {
        words.reverse();
    }
    words
}

/// Decodes `layout.value_type.registers()` registers; `None` when fewer were given.
pub fn decode(words: &[u16], layout: Layout) -> Option<Raw> {
    let n = usize::from(layout.value_type.registers());
    let words = words.get(..n)?;
    let bytes = ordered_bytes(words, layout);
    let array = |len: usize| {
        let mut out = [0u8; 8];
        out[8 - len..].copy_from_slice(&bytes);
        out
    };
    Some(match layout.value_type {
        ValueType::Bool => Raw::Bool(words[0] != 0),
        ValueType::U16 => Raw::Unsigned(u64::from(u16::from_be_bytes([bytes[0], bytes[1]]))),
        ValueType::I16 => Raw::Signed(i64::from(i16::from_be_bytes([bytes[0], bytes[1]]))),
        ValueType::U32 => Raw::Unsigned(u64::from_be_bytes(array(4))),
        ValueType::I32 => Raw::Signed(i64::from(i32::from_be_bytes([
            bytes[0], bytes[1], bytes[2], bytes[3],
        ]))),
        ValueType::F32 => Raw::Float(f64::from(f32::from_be_bytes([
            bytes[0], bytes[1], bytes[2], bytes[3],
        ]))),
        ValueType::U64 => Raw::Unsigned(u64::from_be_bytes(array(8))),
        ValueType::I64 => Raw::Signed(i64::from_be_bytes(array(8))),
        ValueType::F64 => Raw::Float(f64::from_be_bytes(array(8))),
    })
}

/// value = raw * scale + offset; integers stay exact when there is nothing to scale.
pub fn scaled(raw: Raw, scale: f64, offset: f64) -> Reading {
    let identity = scale == 1.0 && offset == 0.0;
    match raw {
        Raw::Bool(b) => Reading::Bool(b),
        Raw::Unsigned(n) if identity => Reading::Unsigned(n),
        Raw::Signed(n) if identity => Reading::Signed(n),
        Raw::Unsigned(n) => Reading::Float(n as f64 * scale + offset),
        Raw::Signed(n) => Reading::Float(n as f64 * scale + offset),
        Raw::Float(x) => Reading::Float(x * scale + offset),
    }
}

/// A command payload as understood: `ON`/`OFF`, `true`/`false` (any case), or a number.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Command {
    Bool(bool),
    Number(f64),
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CommandError {
    #[error("payload {0:?} is not ON, OFF, true, false, 1, 0 or a number")]
    Unparseable(String),
    #[error("a coil takes ON/OFF, true/false or 1/0, not {0}")]
    NotBool(String),
    #[error("{value} does not fit a {value_type} register value (after scale {scale})")]
    OutOfRange {
        value: String,
        value_type: &'static str,
        scale: f64,
    },
}

pub fn parse_command(payload: &[u8]) -> Result<Command, CommandError> {
    let text = std::str::from_utf8(payload)
        .map_err(|_| CommandError::Unparseable(String::from_utf8_lossy(payload).into_owned()))?
        .trim();
    match text.to_ascii_lowercase().as_str() {
        "on" | "true" => return Ok(Command::Bool(true)),
        "off" | "false" => return Ok(Command::Bool(false)),
        _ => {}
    }
    match text.parse::<f64>() {
        Ok(x) if x.is_finite() => Ok(Command::Number(x)),
        _ => Err(CommandError::Unparseable(text.to_owned())),
    }
}

/// A coil's state from a command: booleans, 1 and 0.
pub fn coil_state(command: Command) -> Result<bool, CommandError> {
    match command {
        Command::Bool(b) => Ok(b),
        Command::Number(1.0) => Ok(true),
        Command::Number(0.0) => Ok(false),
        Command::Number(x) => Err(CommandError::NotBool(format_float(x))),
    }
}

/// The registers a command writes: value / scale, rounded for integer types, in the
/// layout's orders.
pub fn encode(command: Command, layout: Layout, scale: f64) -> Result<Vec<u16>, CommandError> {
    let value = match command {
        Command::Bool(b) => f64::from(u8::from(b)),
        Command::Number(x) => x / scale,
    };
    let out_of_range = || CommandError::OutOfRange {
        value: format_float(value * scale),
        value_type: type_name(layout.value_type),
        scale,
    };
    let integer = |min: f64, max: f64| {
        let rounded = value.round();
        (rounded >= min && rounded <= max)
            .then_some(rounded)
            .ok_or_else(out_of_range)
    };
    let bytes: Vec<u8> = match layout.value_type {
        ValueType::Bool => return Ok(vec![u16::from(value != 0.0)]),
        ValueType::U16 => (integer(0.0, 65_535.0)? as u16).to_be_bytes().to_vec(),
        ValueType::I16 => (integer(-32_768.0, 32_767.0)? as i16)
            .to_be_bytes()
            .to_vec(),
        ValueType::U32 => (integer(0.0, 4_294_967_295.0)? as u32)
            .to_be_bytes()
            .to_vec(),
        ValueType::I32 => (integer(-2_147_483_648.0, 2_147_483_647.0)? as i32)
            .to_be_bytes()
            .to_vec(),
        ValueType::U64 => (integer(0.0, u64::MAX as f64)? as u64)
            .to_be_bytes()
            .to_vec(),
        ValueType::I64 => (integer(i64::MIN as f64, i64::MAX as f64)? as i64)
            .to_be_bytes()
            .to_vec(),
        ValueType::F32 => {
            let narrow = value as f32;
            if !narrow.is_finite() {
                return Err(out_of_range());
            }
            narrow.to_be_bytes().to_vec()
        }
        ValueType::F64 => value.to_be_bytes().to_vec(),
    };
    Ok(ordered_words(&bytes, layout))
}

pub fn type_name(value_type: ValueType) -> &'static str {
    match value_type {
        ValueType::U16 => "u16",
        ValueType::I16 => "i16",
        ValueType::U32 => "u32",
        ValueType::I32 => "i32",
        ValueType::F32 => "f32",
        ValueType::U64 => "u64",
        ValueType::I64 => "i64",
        ValueType::F64 => "f64",
        ValueType::Bool => "bool",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(value_type: ValueType, byte_order: Order, word_order: Order) -> Layout {
        Layout {
            value_type,
            byte_order,
            word_order,
        }
    }

    /// The four orders, named as device manuals do: ABCD, CDAB, BADC, DCBA.
    const ORDERS: [(&str, Order, Order); 4] = [
        ("ABCD", Order::Big, Order::Big),
        ("CDAB", Order::Big, Order::Little),
        ("BADC", Order::Little, Order::Big),
        ("DCBA", Order::Little, Order::Little),
    ];

    /// `bytes` (most significant first) laid out in registers the way `name` says.
    fn registers(name: &str, bytes: &[u8]) -> Vec<u16> {
        let mut words: Vec<u16> = bytes
            .chunks(2)
            .map(|p| u16::from_be_bytes([p[0], p[1]]))
            .collect();
        if name.starts_with('B') || name.starts_with('D') {
            words = words.iter().map(|w| w.swap_bytes()).collect();
        }
        if name.starts_with('C') || name.starts_with('D') {
            words.reverse();
        }
        words
    }

    fn check(value_type: ValueType, bytes: &[u8], expected: Raw) {
        for (name, byte_order, word_order) in ORDERS {
            let layout = layout(value_type, byte_order, word_order);
            let words = registers(name, bytes);
            assert_eq!(
                decode(&words, layout),
                Some(expected),
                "{value_type:?} {name} from {words:04x?}"
            );
            if let Raw::Float(x) = expected {
                let encoded = encode(Command::Number(x), layout, 1.0).expect("encodes");
                assert_eq!(encoded, words, "{value_type:?} {name} encoding");
            }
        }
    }

    #[test]
    fn every_type_decodes_in_all_four_orders() {
        check(
            ValueType::U16,
            &0xBEEFu16.to_be_bytes(),
            Raw::Unsigned(0xBEEF),
        );
        check(
            ValueType::I16,
            &(-1234i16).to_be_bytes(),
            Raw::Signed(-1234),
        );
        check(
            ValueType::U32,
            &0xDEAD_BEEFu32.to_be_bytes(),
            Raw::Unsigned(0xDEAD_BEEF),
        );
        check(
            ValueType::I32,
            &(-123_456_789i32).to_be_bytes(),
            Raw::Signed(-123_456_789),
        );
        check(ValueType::F32, &25.5f32.to_be_bytes(), Raw::Float(25.5));
        check(
            ValueType::U64,
            &0x0102_0304_0506_0708u64.to_be_bytes(),
            Raw::Unsigned(0x0102_0304_0506_0708),
        );
        check(
            ValueType::I64,
            &(-9_000_000_000_123i64).to_be_bytes(),
            Raw::Signed(-9_000_000_000_123),
        );
        check(
            ValueType::F64,
            &(-1234.5678f64).to_be_bytes(),
            Raw::Float(-1234.5678),
        );
        check(ValueType::Bool, &[0, 1], Raw::Bool(true));
        check(ValueType::Bool, &[0, 0], Raw::Bool(false));
    }

    #[test]
    fn the_orders_differ_on_a_known_u32() {
        let words = [0x0102, 0x0304];
        let decoded: Vec<Option<Raw>> = ORDERS
            .iter()
            .map(|(_, b, w)| decode(&words, layout(ValueType::U32, *b, *w)))
            .collect();
        assert_eq!(
            decoded,
            [
                Some(Raw::Unsigned(0x0102_0304)),
                Some(Raw::Unsigned(0x0304_0102)),
                Some(Raw::Unsigned(0x0201_0403)),
                Some(Raw::Unsigned(0x0403_0201)),
            ]
        );
    }

    #[test]
    fn too_few_registers_decode_to_nothing() {
        let f64_layout = layout(ValueType::F64, Order::Big, Order::Big);
        assert_eq!(decode(&[1, 2, 3], f64_layout), None);
    }

    #[test]
    fn integers_encode_in_every_order() {
        for (name, byte_order, word_order) in ORDERS {
            let l = layout(ValueType::I32, byte_order, word_order);
            let words = encode(Command::Number(-123_456_789.0), l, 1.0).expect("fits");
            assert_eq!(words, registers(name, &(-123_456_789i32).to_be_bytes()));
            assert_eq!(decode(&words, l), Some(Raw::Signed(-123_456_789)));
        }
        let u64_layout = layout(ValueType::U64, Order::Little, Order::Little);
        let words = encode(Command::Number(1e15), u64_layout, 1.0).expect("fits");
        assert_eq!(
            decode(&words, u64_layout),
            Some(Raw::Unsigned(1_000_000_000_000_000))
        );
    }

    #[test]
    fn scaling_is_applied_and_printed_without_noise() {
        assert_eq!(scaled(Raw::Signed(255), 0.1, 0.0).plain(), "25.5");
        assert_eq!(scaled(Raw::Signed(-40), 0.5, 10.0).plain(), "-10");
        assert_eq!(scaled(Raw::Unsigned(3), 0.1, 0.0).plain(), "0.3");
        assert_eq!(
            scaled(Raw::Unsigned(u64::MAX), 1.0, 0.0).plain(),
            "18446744073709551615"
        );
        assert_eq!(scaled(Raw::Bool(true), 2.0, 1.0).plain(), "true");
        assert_eq!(
            scaled(Raw::Float(21.25), 1.0, 0.0).json(1_700_000_000_000, true),
            r#"{"value":21.25,"ts":1700000000000}"#
        );
        assert_eq!(
            scaled(Raw::Float(f64::NAN), 1.0, 0.0).json(5, true),
            r#"{"value":"NaN","ts":5}"#
        );
        assert_eq!(
            scaled(Raw::Signed(7), 1.0, 0.0).json(5000, false),
            r#"{"value":7,"ts":5000,"clock":"untrusted"}"#
        );
    }

    #[test]
    fn command_payloads() {
        assert_eq!(parse_command(b"ON"), Ok(Command::Bool(true)));
        assert_eq!(parse_command(b"off"), Ok(Command::Bool(false)));
        assert_eq!(parse_command(b"True"), Ok(Command::Bool(true)));
        assert_eq!(parse_command(b"false\n"), Ok(Command::Bool(false)));
        assert_eq!(parse_command(b"1"), Ok(Command::Number(1.0)));
        assert_eq!(parse_command(b" -2.5 "), Ok(Command::Number(-2.5)));
        assert!(parse_command(b"maybe").is_err());
        assert!(parse_command(b"NaN").is_err());
        assert!(parse_command(&[0xff, 0xfe]).is_err());
        assert_eq!(coil_state(Command::Number(0.0)), Ok(false));
        assert_eq!(coil_state(Command::Number(1.0)), Ok(true));
        assert!(coil_state(Command::Number(2.0)).is_err());
    }

    #[test]
    fn writes_scale_round_and_refuse_what_does_not_fit() {
        let u16_layout = layout(ValueType::U16, Order::Big, Order::Big);
        assert_eq!(
            encode(Command::Number(21.5), u16_layout, 0.1),
            Ok(vec![215])
        );
        assert_eq!(encode(Command::Bool(true), u16_layout, 1.0), Ok(vec![1]));
        assert!(encode(Command::Number(-1.0), u16_layout, 1.0).is_err());
        assert!(encode(Command::Number(70_000.0), u16_layout, 1.0).is_err());
        let i16_layout = layout(ValueType::I16, Order::Big, Order::Big);
        assert_eq!(
            encode(Command::Number(-2.0), i16_layout, 1.0),
            Ok(vec![0xFFFE])
        );
        let f32_layout = layout(ValueType::F32, Order::Big, Order::Big);
        assert!(encode(Command::Number(1e300), f32_layout, 1.0).is_err());
    }
}
