//! `[[modbus]]` (with its `[[modbus.read]]` and `[[modbus.write]]`) and `[[serial]]`: the
//! typed form and its checks. A bus (serial port or TCP address) may carry several Modbus
//! devices; a serial port is owned by one kind of user only.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use super::locate::KeyPath;
use super::raw::{RawModbus, RawRead, RawSerial, RawWrite};
use super::validate::{Report, Section};
use crate::topics;

pub const BAUD: i64 = 9600;
pub const SERIAL_BAUD: i64 = 115_200;
pub const PARITY: &str = "none";
pub const DATA_BITS: i64 = 8;
pub const STOP_BITS: i64 = 1;
pub const UNIT: i64 = 1;
pub const POLL: &str = "1s";
pub const TIMEOUT: &str = "500ms";
/// Unused registers (or bits) a merged read may read through between two wanted ones.
pub const MAX_GAP: i64 = 16;
pub const VALUE_TYPE: &str = "u16";
pub const ORDER: &str = "big";
pub const PAYLOAD: &str = "plain";
pub const MAX_LINE: &str = "1KiB";
/// Where `{key}` goes in a `[[serial]]` topic.
pub const KEY_PLACEHOLDER: &str = "{key}";

/// One Modbus device: a unit id on a bus.
#[derive(Debug, Clone, PartialEq)]
pub struct ModbusDevice {
    pub name: String,
    pub transport: Transport,
    pub unit: u8,
    pub poll: Duration,
    pub timeout: Duration,
    /// Reads of one kind this close (unused registers or bits between them) share a
    /// request; 0 merges only adjacent reads (for devices that refuse unmapped addresses).
    pub max_gap: u16,
    pub reads: Vec<ModbusRead>,
    pub writes: Vec<ModbusWrite>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Transport {
    Rtu(SerialLine),
    /// `host:port`, resolved at each connect.
    Tcp(String),
}

impl Transport {
    /// What identifies the bus: devices with the same key share one owner task.
    pub fn bus(&self) -> String {
        match self {
            Transport::Rtu(line) => line.device.clone(),
            Transport::Tcp(address) => format!("tcp://{address}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SerialLine {
    pub device: String,
    pub baud: u32,
    pub parity: Parity,
    pub data_bits: u8,
    pub stop_bits: u8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Parity {
    None,
    Even,
    Odd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RegisterKind {
    Holding,
    Input,
    Coil,
    Discrete,
}

impl RegisterKind {
    pub fn is_bits(self) -> bool {
        matches!(self, RegisterKind::Coil | RegisterKind::Discrete)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ValueType {
    U16,
    I16,
    U32,
    I32,
    F32,
    U64,
    I64,
    F64,
    Bool,
}

impl ValueType {
    /// Registers the value spans (1 for bool read from a register).
    pub fn registers(self) -> u16 {
        match self {
            ValueType::U16 | ValueType::I16 | ValueType::Bool => 1,
            ValueType::U32 | ValueType::I32 | ValueType::F32 => 2,
            ValueType::U64 | ValueType::I64 | ValueType::F64 => 4,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Order {
    Big,
    Little,
}

/// How a value lies in its registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Layout {
    pub value_type: ValueType,
    /// Within each register.
    pub byte_order: Order,
    /// Across the registers of one value: big = most significant register first.
    pub word_order: Order,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadFormat {
    /// `25.5`, `true`.
    Plain,
    /// `{"value": 25.5, "ts": <unix ms>}`.
    Json,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModbusRead {
    pub topic: String,
    pub kind: RegisterKind,
    pub address: u16,
    pub layout: Layout,
    pub scale: f64,
    pub offset: f64,
    pub payload: PayloadFormat,
    /// Publish only when the value moved by more than `deadband` (or on the heartbeat).
    pub on_change: Option<OnChange>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct OnChange {
    pub deadband: f64,
    /// Re-publish an unchanged value this often; never when None.
    pub heartbeat: Option<Duration>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteKind {
    Coil,
    Holding,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModbusWrite {
    pub topic: String,
    pub kind: WriteKind,
    pub address: u16,
    pub layout: Layout,
    /// register value = command value / scale.
    pub scale: f64,
}

/// A line-oriented serial sensor.
#[derive(Debug, Clone, PartialEq)]
pub struct SerialSensor {
    pub name: String,
    pub line: SerialLine,
    pub format: LineFormat,
    /// `{key}` is replaced by each key of a kv or json line.
    pub topic: String,
    pub command_topic: Option<String>,
    /// Longer lines are dropped, in bytes.
    pub max_line: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineFormat {
    Kv,
    Json,
    Raw,
}

/// The `[[modbus]]` devices; a device with a problem (already reported) is left out.
pub fn modbus_devices(raw: &[RawModbus], report: &mut Report, id: &str) -> Vec<ModbusDevice> {
    let root = KeyPath::default().key("modbus");
    let devices: Vec<(Option<ModbusDevice>, bool)> = raw
        .iter()
        .enumerate()
        .map(|(i, device)| modbus_device(device, report.section(root.index(i), id)))
        .collect();
    let mut names = HashSet::new();
    let mut lines: HashMap<String, SerialLine> = HashMap::new();
    let mut units = HashSet::new();
    let mut write_topics = HashSet::new();
    for (i, (device, _)) in devices.iter().enumerate() {
        let Some(device) = device else { continue };
        let path = root.index(i);
        for (w, write) in device.writes.iter().enumerate() {
            if !write_topics.insert(write.topic.clone()) {
                report.add(&path.key("write").index(w).key("topic"), format!("{:?} is another [[modbus.write]]'s topic too; one command topic drives one register", write.topic));
            }
        }
        if !names.insert(device.name.clone()) {
            report.add(
                &path.key("name"),
                format!(
                    "{:?} names another [[modbus]] device too; names must be unique",
                    device.name
                ),
            );
        }
        if let Transport::Rtu(line) = &device.transport {
            match lines.get(&line.device) {
                Some(first) if first != line => report.add(
                    &path.key("baud"),
                    format!("{} is shared with another [[modbus]] device with other serial settings (baud, parity, data_bits, stop_bits); devices on one line must agree", line.device),
                ),
                _ => {
                    lines.insert(line.device.clone(), line.clone());
                }
            }
        }
        if !units.insert((device.transport.bus(), device.unit)) {
            report.add(&path.key("unit"), format!("unit {} on {} is also another [[modbus]] device's; give each device on a bus its own unit id", device.unit, device.transport.bus()));
        }
    }
    devices
        .into_iter()
        .filter_map(|(device, valid)| device.filter(|_| valid))
        .collect()
}

/// The device as far as it could be read (for the checks across devices), and whether it
/// is free of problems.
fn modbus_device(raw: &RawModbus, mut s: Section) -> (Option<ModbusDevice>, bool) {
    let before = s.problems();
    let name = s.name("name", &raw.name);
    let transport = match raw.transport.as_deref() {
        None => {
            s.report("transport", r#"missing; "rtu" (a serial line, with device = "/dev/ttyUSB0") or "tcp" (with address = "192.168.1.50:502")"#);
            None
        }
        Some("rtu") => {
            if raw.address.is_some() {
                s.report("address", "is for transport = \"tcp\"; an RTU device is reached through device (its serial port)");
            }
            serial_line(
                &mut s,
                &raw.device,
                raw.baud,
                BAUD,
                &raw.parity,
                raw.data_bits,
                raw.stop_bits,
            )
            .map(Transport::Rtu)
        }
        Some("tcp") => {
            for (key, set) in [
                ("device", raw.device.is_some()),
                ("baud", raw.baud.is_some()),
                ("parity", raw.parity.is_some()),
                ("data_bits", raw.data_bits.is_some()),
                ("stop_bits", raw.stop_bits.is_some()),
            ] {
                if set {
                    s.report(
                        key,
                        "is for transport = \"rtu\"; a TCP device is reached through address",
                    );
                }
            }
            tcp_address(&mut s, &raw.address).map(Transport::Tcp)
        }
        Some(other) => {
            s.report("transport", format!("{other:?} is not one of rtu, tcp"));
            None
        }
    };
    let unit = s.int("unit", raw.unit, UNIT, 0..=247);
    let poll = s.duration(
        "poll",
        &raw.poll,
        POLL,
        Duration::from_millis(10)..=Duration::from_secs(86_400),
    );
    let timeout = s.duration(
        "timeout",
        &raw.timeout,
        TIMEOUT,
        Duration::from_millis(10)..=Duration::from_secs(60),
    );
    let max_gap = s.int("max_gap", raw.max_gap, MAX_GAP, 0..=1999);
    let reads: Vec<ModbusRead> = raw
        .read
        .iter()
        .enumerate()
        .filter_map(|(i, read)| modbus_read(read, s.child(s.path().key("read").index(i))))
        .collect();
    let writes: Vec<ModbusWrite> = raw
        .write
        .iter()
        .enumerate()
        .filter_map(|(i, write)| modbus_write(write, s.child(s.path().key("write").index(i))))
        .collect();
    if raw.read.is_empty() && raw.write.is_empty() {
        s.report(
            "read",
            "no [[modbus.read]] or [[modbus.write]] under this device; it would do nothing",
        );
    }
    let valid = s.problems() == before;
    let device = transport.map(|transport| ModbusDevice {
        name,
        transport,
        unit,
        poll,
        timeout,
        max_gap,
        reads,
        writes,
    });
    (device, valid)
}

fn serial_line(
    s: &mut Section,
    device: &Option<String>,
    baud: Option<i64>,
    default_baud: i64,
    parity: &Option<String>,
    data_bits: Option<i64>,
    stop_bits: Option<i64>,
) -> Option<SerialLine> {
    let device = match device.as_deref() {
        None | Some("") => {
            s.report(
                "device",
                r#"missing; name the serial port, like device = "/dev/ttyUSB0""#,
            );
            None
        }
        Some(device) => Some(device.to_owned()),
    };
    let parities = [
        ("none", Parity::None),
        ("even", Parity::Even),
        ("odd", Parity::Odd),
    ];
    let line = SerialLine {
        device: device.unwrap_or_default(),
        baud: s.int("baud", baud, default_baud, 50..=4_000_000),
        parity: s.choice("parity", parity, PARITY, &parities),
        data_bits: s.int("data_bits", data_bits, DATA_BITS, 5..=8),
        stop_bits: s.int("stop_bits", stop_bits, STOP_BITS, 1..=2),
    };
    (!line.device.is_empty()).then_some(line)
}

fn tcp_address(s: &mut Section, raw: &Option<String>) -> Option<String> {
    let Some(text) = raw.as_deref() else {
        s.report(
            "address",
            r#"missing; name the device's host and port, like address = "192.168.1.50:502""#,
        );
        return None;
    };
    let port = text
        .rsplit_once(':')
        .filter(|(host, _)| !host.is_empty())
        .and_then(|(_, port)| port.parse::<u16>().ok());
    match port {
        Some(port) if port > 0 => Some(text.to_owned()),
        _ => {
            s.report(
                "address",
                format!(r#"{text:?} is not a host and port like "192.168.1.50:502""#),
            );
            None
        }
    }
}

fn modbus_read(raw: &RawRead, mut s: Section) -> Option<ModbusRead> {
    let before = s.problems();
    let kinds = [
        ("holding", RegisterKind::Holding),
        ("input", RegisterKind::Input),
        ("coil", RegisterKind::Coil),
        ("discrete", RegisterKind::Discrete),
    ];
    let topic = s.required_topic("topic", &raw.topic);
    let kind = match raw.kind.as_deref() {
        None => {
            s.report("kind", "missing; one of holding, input, coil, discrete");
            RegisterKind::Holding
        }
        Some(_) => s.choice("kind", &raw.kind, "holding", &kinds),
    };
    let default_type = if kind.is_bits() { "bool" } else { VALUE_TYPE };
    let layout = layout(
        &mut s,
        &raw.value_type,
        default_type,
        &raw.byte_order,
        &raw.word_order,
    );
    if kind.is_bits() && layout.value_type != ValueType::Bool {
        s.report(
            "type",
            format!("a {} is one bit: its type is bool", kind_name(kind)),
        );
    }
    let address = s.required_address("address", raw.address, layout.value_type.registers());
    let payloads = [
        ("plain", PayloadFormat::Plain),
        ("json", PayloadFormat::Json),
    ];
    let on_change = match raw.on_change.unwrap_or(false) {
        true => Some(OnChange {
            deadband: s.number("deadband", &raw.deadband, 0.0).abs(),
            heartbeat: raw.heartbeat.as_ref().map(|_| {
                s.duration(
                    "heartbeat",
                    &raw.heartbeat,
                    "1s",
                    Duration::from_millis(10)..=Duration::MAX,
                )
            }),
        }),
        false => {
            for (key, set) in [
                ("deadband", raw.deadband.is_some()),
                ("heartbeat", raw.heartbeat.is_some()),
            ] {
                if set {
                    s.report(
                        key,
                        "has no effect without on_change = true; every poll publishes",
                    );
                }
            }
            None
        }
    };
    let read = ModbusRead {
        topic,
        kind,
        address,
        layout,
        scale: s.number("scale", &raw.scale, 1.0),
        offset: s.number("offset", &raw.offset, 0.0),
        payload: s.choice("payload", &raw.payload, PAYLOAD, &payloads),
        on_change,
    };
    if read.scale == 0.0 {
        s.report(
            "scale",
            "is 0; every value would read 0 (value = raw * scale + offset)",
        );
    }
    (s.problems() == before).then_some(read)
}

fn modbus_write(raw: &RawWrite, mut s: Section) -> Option<ModbusWrite> {
    let before = s.problems();
    let topic = s.required_topic("topic", &raw.topic);
    let kind = match raw.kind.as_deref() {
        None => {
            s.report("kind", "missing; coil or holding");
            WriteKind::Coil
        }
        Some(_) => s.choice(
            "kind",
            &raw.kind,
            "coil",
            &[("coil", WriteKind::Coil), ("holding", WriteKind::Holding)],
        ),
    };
    let default_type = match kind {
        WriteKind::Coil => "bool",
        WriteKind::Holding => VALUE_TYPE,
    };
    let layout = layout(
        &mut s,
        &raw.value_type,
        default_type,
        &raw.byte_order,
        &raw.word_order,
    );
    if kind == WriteKind::Coil && layout.value_type != ValueType::Bool {
        s.report("type", "a coil is one bit: its type is bool");
    }
    let address = s.required_address("address", raw.address, layout.value_type.registers());
    let scale = s.number("scale", &raw.scale, 1.0);
    if scale == 0.0 {
        s.report("scale", "is 0; register value = command / scale");
    }
    let write = ModbusWrite {
        topic,
        kind,
        address,
        layout,
        scale,
    };
    (s.problems() == before).then_some(write)
}

fn layout(
    s: &mut Section,
    value_type: &Option<String>,
    default_type: &str,
    byte_order: &Option<String>,
    word_order: &Option<String>,
) -> Layout {
    let types = [
        ("u16", ValueType::U16),
        ("i16", ValueType::I16),
        ("u32", ValueType::U32),
        ("i32", ValueType::I32),
        ("f32", ValueType::F32),
        ("u64", ValueType::U64),
        ("i64", ValueType::I64),
        ("f64", ValueType::F64),
        ("bool", ValueType::Bool),
    ];
    let orders = [("big", Order::Big), ("little", Order::Little)];
    Layout {
        value_type: s.choice("type", value_type, default_type, &types),
        byte_order: s.choice("byte_order", byte_order, ORDER, &orders),
        word_order: s.choice("word_order", word_order, ORDER, &orders),
    }
}

fn kind_name(kind: RegisterKind) -> &'static str {
    match kind {
        RegisterKind::Holding => "holding register",
        RegisterKind::Input => "input register",
        RegisterKind::Coil => "coil",
        RegisterKind::Discrete => "discrete input",
    }
}

/// The `[[serial]]` sensors; a sensor with a problem (already reported) is left out. A
/// port may not also be a Modbus line.
pub fn serial_sensors(
    raw: &[RawSerial],
    modbus: &[RawModbus],
    report: &mut Report,
    id: &str,
) -> Vec<SerialSensor> {
    let root = KeyPath::default().key("serial");
    let mut ports: HashSet<String> = modbus
        .iter()
        .filter(|d| d.transport.as_deref() == Some("rtu"))
        .filter_map(|d| d.device.clone())
        .collect();
    let mut names = HashSet::new();
    let mut sensors = Vec::new();
    for (i, sensor) in raw.iter().enumerate() {
        let (Some(sensor), valid) = serial_sensor(sensor, report.section(root.index(i), id)) else {
            continue;
        };
        let path = root.index(i);
        if !names.insert(sensor.name.clone()) {
            report.add(
                &path.key("name"),
                format!(
                    "{:?} names another [[serial]] sensor too; names must be unique",
                    sensor.name
                ),
            );
        }
        if !ports.insert(sensor.line.device.clone()) {
            report.add(&path.key("device"), format!("{} is already used by another [[serial]] or [[modbus]] entry; a port has one owner", sensor.line.device));
        }
        if valid {
            sensors.push(sensor);
        }
    }
    sensors
}

/// The sensor as far as it could be read, and whether it is free of problems.
fn serial_sensor(raw: &RawSerial, mut s: Section) -> (Option<SerialSensor>, bool) {
    let before = s.problems();
    let name = s.name("name", &raw.name);
    let line = serial_line(
        &mut s,
        &raw.device,
        raw.baud,
        SERIAL_BAUD,
        &raw.parity,
        raw.data_bits,
        raw.stop_bits,
    );
    let formats = [
        ("kv", LineFormat::Kv),
        ("json", LineFormat::Json),
        ("raw", LineFormat::Raw),
    ];
    let format = match raw.format.as_deref() {
        None => {
            s.report("format", "missing; one of kv, json, raw");
            LineFormat::Raw
        }
        Some(_) => s.choice("format", &raw.format, "raw", &formats),
    };
    let topic = match raw.topic.as_deref() {
        None => {
            s.report("topic", r#"missing; like topic = "warehouse/zone2/{key}""#);
            String::new()
        }
        Some(text) => {
            let topic = topics::substitute_gateway_id(text, s.id());
            let has_key = topic.contains(KEY_PLACEHOLDER);
            if let Err(why) = topics::valid_topic(&topic.replace(KEY_PLACEHOLDER, "key")) {
                s.report(
                    "topic",
                    format!("{text:?} is not a topic to publish to: it {why}"),
                );
            } else if format == LineFormat::Raw && has_key {
                s.report(
                    "topic",
                    "contains {key}, but a raw line has no keys; write the topic out",
                );
            } else if format != LineFormat::Raw && !has_key {
                s.report("topic", "has no {key}: every key of a line would go to the same topic; add {key} where the key's name goes");
            }
            topic
        }
    };
    let command_topic = raw
        .command_topic
        .as_ref()
        .map(|_| s.topic("command_topic", &raw.command_topic, ""));
    let max_line = s.size("max_line", &raw.max_line, MAX_LINE, 1..=1 << 20);
    let valid = s.problems() == before;
    let sensor = line.map(|line| SerialSensor {
        name,
        line,
        format,
        topic,
        command_topic,
        max_line,
    });
    (sensor, valid)
}
