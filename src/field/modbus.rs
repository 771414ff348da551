//! Modbus RTU and TCP: one task per bus polls its devices and executes their writes, one
//! transaction at a time, writes ahead of queued polls.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_modbus::client::{Client, Context};
use tokio_modbus::prelude::SlaveContext;
use tokio_modbus::{ExceptionCode, Request, Response, Slave};
use tracing::{info, warn};

use super::value::{self, Reading};
use super::Publisher;
use crate::config::{
    ModbusDevice, ModbusRead, Parity, PayloadFormat, RegisterKind, Transport, WriteKind,
};
use crate::health::{add, inc, DeviceHealth, DeviceState, SharedHealth};
use crate::supervisor::Probe;

/// Most registers and bits one read request may ask for (Modbus spec).
const MAX_REGISTERS: u16 = 125;
const MAX_BITS: u16 = 2000;
/// Failed transactions in a row after which a device counts as unreachable.
const UNREACHABLE_AFTER: u32 = 3;
/// Retry delays for an unreachable device or a bus that cannot be opened.
const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// The devices of each bus (serial port or TCP address), in config order. Validation
/// made sure that the devices of one serial port agree on its settings.
pub fn buses(devices: &[ModbusDevice]) -> Vec<(Transport, Vec<ModbusDevice>)> {
    let mut buses: BTreeMap<String, (Transport, Vec<ModbusDevice>)> = BTreeMap::new();
    for device in devices {
        buses
            .entry(device.transport.bus())
            .or_insert_with(|| (device.transport.clone(), Vec::new()))
            .1
            .push(device.clone());
    }
    buses.into_values().collect()
}

/// Which write of which device of a bus a command is for.
#[derive(Debug, Clone, Copy)]
pub struct WriteTarget {
    pub device: usize,
    pub write: usize,
}

#[derive(Debug)]
pub struct WriteJob {
    pub target: WriteTarget,
    pub payload: Bytes,
}

/// One read request of a poll cycle, covering one or more configured reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Span {
    pub kind: RegisterKind,
    pub start: u16,
    pub count: u16,
    /// Indexes into the device's reads.
    pub reads: Vec<usize>,
}

/// The requests of one poll cycle: reads of one kind at nearby addresses share a request
/// (at most 125 registers or 2000 bits, gaps of up to `max_gap` read through); `None`
/// gives every read its own request.
pub fn plan(reads: &[ModbusRead], max_gap: Option<u16>) -> Vec<Span> {
    let mut order: Vec<usize> = (0..reads.len()).collect();
    order.sort_by_key(|&i| (kind_rank(reads[i].kind), reads[i].address));
    let mut spans: Vec<Span> = Vec::new();
    for i in order {
        let read = &reads[i];
        let width = if read.kind.is_bits() {
            1
        } else {
            read.layout.value_type.registers()
        };
        let (start, end) = (read.address, u32::from(read.address) + u32::from(width));
        let limit = if read.kind.is_bits() {
            MAX_BITS
        } else {
            MAX_REGISTERS
        };
        if let (Some(span), Some(max_gap)) = (spans.last_mut(), max_gap) {
            let span_end = u32::from(span.start) + u32::from(span.count);
            let fits = span.kind == read.kind
                && u32::from(start) <= span_end + u32::from(max_gap)
                && end.max(span_end) - u32::from(span.start) <= u32::from(limit);
            if fits {
                span.count = (end.max(span_end) - u32::from(span.start)) as u16;
                span.reads.push(i);
                continue;
            }
        }
        spans.push(Span {
            kind: read.kind,
            start,
            count: width,
            reads: vec![i],
        });
    }
    spans
}

fn kind_rank(kind: RegisterKind) -> u8 {
    match kind {
        RegisterKind::Holding => 0,
        RegisterKind::Input => 1,
        RegisterKind::Coil => 2,
        RegisterKind::Discrete => 3,
    }
}

/// Why a transaction failed.
#[derive(Debug, Clone)]
enum Fault {
    Timeout(Duration),
    Exception(ExceptionCode),
    /// I/O, CRC errors, garbage and mismatched replies: the connection is not trusted after it.
    Transport(String),
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fault::Timeout(after) => write!(f, "no reply within {after:?} (timeout)"),
            Fault::Exception(code) => write!(f, "Modbus exception: {code}"),
            Fault::Transport(error) => f.write_str(error),
        }
    }
}

struct Device {
    config: ModbusDevice,
    spans: Vec<Span>,
    health: Arc<DeviceHealth>,
    next_due: Instant,
    /// The next span of the cycle in progress.
    cursor: Option<usize>,
    /// Timeouts and transport errors in a row.
    failures: u32,
    /// Faults of any kind in the cycle in progress.
    cycle_faults: u32,
    last_fault: Option<String>,
    last: Vec<Option<(Reading, Instant)>>,
}

/// The owner of one bus.
pub struct Bus {
    name: String,
    transport: Transport,
    devices: Vec<Device>,
    commands: mpsc::Receiver<WriteJob>,
    publisher: Publisher,
    health: SharedHealth,
    probe: Probe,
    shutdown: watch::Receiver<bool>,
    commands_open: bool,
    conn: Option<Context>,
    reconnect_at: Instant,
    connect_failures: u32,
    /// RTU: silence between frames (3.5 characters, at least 1.75 ms).
    silence: Duration,
}

impl Bus {
    pub fn new(
        transport: Transport,
        devices: Vec<ModbusDevice>,
        commands: mpsc::Receiver<WriteJob>,
        publisher: Publisher,
        health: &SharedHealth,
        probe: Probe,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        let now = Instant::now();
        let name = transport.bus();
        let silence = match &transport {
            Transport::Rtu(line) => {
                Duration::from_micros((38_500_000 / u64::from(line.baud.max(1))).max(1750))
            }
            Transport::Tcp(_) => Duration::ZERO,
        };
        let devices = devices
            .into_iter()
            .map(|config| Device {
                spans: plan(&config.reads, Some(config.max_gap)),
                health: health.device(format!("modbus/{}", config.name)),
                next_due: now,
                cursor: None,
                failures: 0,
                cycle_faults: 0,
                last_fault: None,
                last: vec![None; config.reads.len()],
                config,
            })
            .collect();
        Bus {
            name,
            transport,
            devices,
            commands,
            publisher,
            health: health.clone(),
            probe,
            shutdown,
            commands_open: true,
            conn: None,
            reconnect_at: now,
            connect_failures: 0,
            silence,
        }
    }

    pub async fn run(mut self) {
        loop {
            self.probe.tick();
            if *self.shutdown.borrow() {
                self.close().await;
                return;
            }
            if self.conn.is_none() && Instant::now() >= self.reconnect_at {
                self.connect().await;
                continue;
            }
            if let Ok(job) = self.commands.try_recv() {
                self.write(job).await;
                continue;
            }
            if self.conn.is_some() {
                if let Some(d) = self.next_device() {
                    self.poll_step(d).await;
                    continue;
                }
            }
            let wake = match self.conn {
                Some(_) => self
                    .devices
                    .iter()
                    .map(|d| d.next_due)
                    .min()
                    .unwrap_or(self.reconnect_at + BACKOFF_MAX),
                None => self.reconnect_at,
            };
            tokio::select! {
                _ = tokio::time::sleep_until(wake) => {}
                job = self.commands.recv(), if self.commands_open => match job {
                    Some(job) => self.write(job).await,
                    // No write topics (or the router stopped): keep polling.
                    None => self.commands_open = false,
                },
                _ = self.probe.serve() => {}
                _ = self.shutdown.changed() => {}
            }
        }
    }

    async fn close(&mut self) {
        if let Some(mut conn) = self.conn.take() {
            let _ = conn.disconnect().await;
        }
    }

    async fn connect(&mut self) {
        let timeout = self
            .devices
            .iter()
            .map(|d| d.config.timeout)
            .max()
            .unwrap_or(Duration::from_secs(1));
        let opened = self
            .probe
            .answering(open_bus(self.transport.clone(), timeout))
            .await;
        match opened {
            Ok(conn) => {
                self.conn = Some(conn);
                self.connect_failures = 0;
                // Polls missed while the bus was closed are failures, not overruns.
                let now = Instant::now();
                for device in &mut self.devices {
                    device.next_due = device.next_due.max(now);
                }
                info!(bus = %self.name, "modbus bus open");
            }
            Err(error) => {
                self.connect_failures = self.connect_failures.saturating_add(1);
                let delay = backoff(self.connect_failures);
                self.reconnect_at = Instant::now() + delay;
                for d in 0..self.devices.len() {
                    let fault = Fault::Transport(format!("cannot open {}: {error}", self.name));
                    self.failed(d, &fault, true);
                }
            }
        }
    }

    /// A device whose cycle is in progress, else the most overdue one.
    fn next_device(&self) -> Option<usize> {
        let now = Instant::now();
        if let Some(d) = self.devices.iter().position(|d| d.cursor.is_some()) {
            return Some(d);
        }
        self.devices
            .iter()
            .enumerate()
            .filter(|(_, d)| d.next_due <= now)
            .min_by_key(|(_, d)| d.next_due)
            .map(|(d, _)| d)
    }

    /// Runs the next request of device `d`'s poll cycle.
    async fn poll_step(&mut self, d: usize) {
        let device = &mut self.devices[d];
        let index = device.cursor.unwrap_or(0);
        let Some(span) = device.spans.get(index).cloned() else {
            self.end_cycle(d);
            return;
        };
        device.cursor = Some(index + 1);
        let request = match span.kind {
            RegisterKind::Holding => Request::ReadHoldingRegisters(span.start, span.count),
            RegisterKind::Input => Request::ReadInputRegisters(span.start, span.count),
            RegisterKind::Coil => Request::ReadCoils(span.start, span.count),
            RegisterKind::Discrete => Request::ReadDiscreteInputs(span.start, span.count),
        };
        match self.call(d, request).await {
            Ok(response) => {
                self.succeeded(d);
                self.publish_span(d, &span, response).await;
            }
            Err(fault @ Fault::Exception(_)) => self.failed(d, &fault, false),
            Err(fault) => {
                self.failed(d, &fault, false);
                self.end_cycle(d);
                return;
            }
        }
        if self.devices[d]
            .cursor
            .is_some_and(|c| c >= self.devices[d].spans.len())
        {
            self.end_cycle(d);
        }
    }

    /// Schedules the next cycle: one period after the last due time, or later with backoff
    /// while the device is unreachable. Missed periods are counted, not made up.
    fn end_cycle(&mut self, d: usize) {
        let now = Instant::now();
        let device = &mut self.devices[d];
        device.cursor = None;
        let poll = device.config.poll;
        let faults = std::mem::take(&mut device.cycle_faults);
        if device.failures < UNREACHABLE_AFTER {
            let state = if faults == 0 {
                DeviceState::Online
            } else {
                DeviceState::Failing
            };
            self.settle(d, state);
        }
        let device = &mut self.devices[d];
        if device.failures >= UNREACHABLE_AFTER {
            device.next_due = now + backoff(device.failures - UNREACHABLE_AFTER + 1).max(poll);
            return;
        }
        device.next_due += poll;
        if device.next_due <= now {
            let behind = now.duration_since(device.next_due);
            let missed = (behind.as_nanos() / poll.as_nanos().max(1)) as u64 + 1;
            add(&device.health.overruns, missed);
            add(&self.health.counters.field_overruns, missed);
            device.next_due += poll * u32::try_from(missed).unwrap_or(u32::MAX);
        }
    }

    async fn call(&mut self, d: usize, request: Request<'static>) -> Result<Response, Fault> {
        let device = &self.devices[d];
        let (unit, timeout) = (device.config.unit, device.config.timeout);
        inc(&device.health.transactions);
        let Some(conn) = self.conn.as_mut() else {
            return Err(Fault::Transport(format!("{} is not open", self.name)));
        };
        conn.set_slave(Slave(unit));
        let outcome = self
            .probe
            .answering(tokio::time::timeout(timeout, conn.call(request)))
            .await;
        if !self.silence.is_zero() {
            tokio::time::sleep(self.silence).await;
        }
        let fault = match outcome {
            Ok(Ok(Ok(response))) => return Ok(response),
            Ok(Ok(Err(code))) => return Err(Fault::Exception(code)),
            Ok(Err(error)) => Fault::Transport(error.to_string()),
            Err(_) => Fault::Timeout(timeout),
        };
        // A late or garbled reply would be taken for the next request's: start afresh.
        self.close().await;
        Err(fault)
    }

    /// The device answered: it is reachable again.
    fn succeeded(&mut self, d: usize) {
        self.devices[d].failures = 0;
    }

    /// Counts a fault. Timeouts and transport errors in a row make the device unreachable
    /// at once; otherwise the state is settled at the end of the poll cycle, so that a
    /// device answering most requests does not flap between online and failing.
    fn failed(&mut self, d: usize, fault: &Fault, connecting: bool) {
        let device = &mut self.devices[d];
        inc(&self.health.counters.field_errors);
        match fault {
            Fault::Timeout(_) => inc(&device.health.timeouts),
            Fault::Exception(_) => inc(&device.health.exceptions),
            Fault::Transport(_) => inc(&device.health.errors),
        }
        device.cycle_faults += 1;
        device.last_fault = Some(fault.to_string());
        if !matches!(fault, Fault::Exception(_)) {
            device.failures = device.failures.saturating_add(1);
        }
        if connecting || device.failures >= UNREACHABLE_AFTER {
            self.settle(d, DeviceState::Unreachable);
        }
    }

    /// Sets the device's state, logging a change.
    fn settle(&mut self, d: usize, state: DeviceState) {
        let device = &self.devices[d];
        if !device.health.set_state(state) {
            return;
        }
        let (name, unit) = (&device.config.name, device.config.unit);
        match (state, &device.last_fault) {
            (DeviceState::Online, _) | (_, None) => {
                info!(device = %name, bus = %self.name, unit, "modbus device online")
            }
            (_, Some(error)) => warn!(device = %name, bus = %self.name, unit, %error,
                "modbus device {}; retrying", state.as_str()),
        }
    }

    async fn publish_span(&mut self, d: usize, span: &Span, response: Response) {
        let words: Vec<u16> = match response {
            Response::ReadHoldingRegisters(words) | Response::ReadInputRegisters(words) => words,
            Response::ReadCoils(bits) | Response::ReadDiscreteInputs(bits) => {
                bits.into_iter().map(u16::from).collect()
            }
            _ => Vec::new(),
        };
        let now = Instant::now();
        for &r in &span.reads {
            let device = &mut self.devices[d];
            let read = &device.config.reads[r];
            let offset = usize::from(read.address - span.start);
            let Some(raw) = words
                .get(offset..)
                .and_then(|w| value::decode(w, read.layout))
            else {
                inc(&device.health.errors);
                continue;
            };
            let reading = value::scaled(raw, read.scale, read.offset);
            if !due(read, device.last[r], reading, now) {
                continue;
            }
            device.last[r] = Some((reading, now));
            let payload = match read.payload {
                PayloadFormat::Plain => reading.plain(),
                PayloadFormat::Json => {
                    let (unix_ms, trusted) = crate::clock::now_unix_ms();
                    reading.json(unix_ms, trusted)
                }
            };
            inc(&device.health.readings);
            inc(&self.health.counters.field_readings);
            let topic = read.topic.clone();
            self.publisher.publish(topic, payload).await;
        }
    }

    async fn write(&mut self, job: WriteJob) {
        let WriteTarget {
            device: d,
            write: w,
        } = job.target;
        let Some(write) = self
            .devices
            .get(d)
            .and_then(|device| device.config.writes.get(w))
            .cloned()
        else {
            return;
        };
        let request = value::parse_command(&job.payload).and_then(|command| match write.kind {
            WriteKind::Coil => {
                value::coil_state(command).map(|on| Request::WriteSingleCoil(write.address, on))
            }
            WriteKind::Holding => value::encode(command, write.layout, write.scale).map(|words| {
                match words.as_slice() {
                    [word] => Request::WriteSingleRegister(write.address, *word),
                    _ => Request::WriteMultipleRegisters(write.address, Cow::Owned(words)),
                }
            }),
        });
        let health = self.devices[d].health.clone();
        let result = match request {
            Err(error) => Err(error.to_string()),
            Ok(_) if self.conn.is_none() => Err(format!(
                "{} is not connected; retrying in the background",
                self.name
            )),
            Ok(request) => match self.call(d, request).await {
                Ok(_) => {
                    self.succeeded(d);
                    Ok(())
                }
                Err(fault) => {
                    self.failed(d, &fault, false);
                    Err(fault.to_string())
                }
            },
        };
        let text = match result {
            Ok(()) => {
                inc(&health.writes);
                inc(&self.health.counters.field_writes);
                "ok".to_owned()
            }
            Err(error) => {
                inc(&health.write_errors);
                inc(&self.health.counters.field_write_errors);
                warn!(topic = %write.topic, %error, "modbus write failed");
                format!("error: {error}")
            }
        };
        self.publisher
            .publish(format!("{}/result", write.topic), text)
            .await;
    }
}

/// Whether a reading is published: always, or with `on_change` when it moved past the
/// deadband or the heartbeat is due.
fn due(
    read: &ModbusRead,
    last: Option<(Reading, Instant)>,
    reading: Reading,
    now: Instant,
) -> bool {
    let (Some(on_change), Some((previous, at))) = (&read.on_change, last) else {
        return true;
    };
    let moved = match (previous, reading) {
        (Reading::Bool(a), Reading::Bool(b)) => a != b,
        (a, b) => {
            let delta = (a.as_f64() - b.as_f64()).abs();
            delta > on_change.deadband || (on_change.deadband == 0.0 && a != b)
        }
    };
    moved
        || on_change
            .heartbeat
            .is_some_and(|every| now.duration_since(at) >= every)
}

/// The wait after `failures` in a row (at least 1): the first is `BACKOFF_MIN`.
fn backoff(failures: u32) -> Duration {
    crate::backoff::bound(BACKOFF_MIN, BACKOFF_MAX, failures.saturating_sub(1))
}

/// Opens a bus's TCP connection or serial port (on a blocking thread: opening a port is a
/// blocking system call).
async fn open_bus(transport: Transport, timeout: Duration) -> Result<Context, String> {
    match transport {
        Transport::Tcp(address) => {
            let connecting = connect_tcp(&address);
            match tokio::time::timeout(timeout.max(Duration::from_secs(1)), connecting).await {
                Ok(result) => result,
                Err(_) => Err(format!("connecting to {address} timed out")),
            }
        }
        Transport::Rtu(line) => tokio::task::spawn_blocking(move || open_rtu(&line))
            .await
            .unwrap_or_else(|e| Err(format!("opening the serial port: {e}"))),
    }
}

async fn connect_tcp(address: &str) -> Result<Context, String> {
    let addrs = tokio::net::lookup_host(address)
        .await
        .map_err(|e| format!("resolving {address}: {e}"))?;
    let mut last = format!("{address} resolves to no address");
    for addr in addrs {
        match tokio_modbus::client::tcp::connect(addr).await {
            Ok(conn) => return Ok(conn),
            Err(e) => last = format!("connecting to {addr}: {e}"),
        }
    }
    Err(last)
}

fn open_rtu(line: &crate::config::SerialLine) -> Result<Context, String> {
    let port = super::serial::open(line).map_err(|e| format!("opening {}: {e}", line.device))?;
    Ok(tokio_modbus::client::rtu::attach(port))
}

impl From<Parity> for tokio_serial::Parity {
    fn from(parity: Parity) -> Self {
        match parity {
            Parity::None => tokio_serial::Parity::None,
            Parity::Even => tokio_serial::Parity::Even,
            Parity::Odd => tokio_serial::Parity::Odd,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Layout, Order, ValueType};

    fn read(kind: RegisterKind, address: u16, value_type: ValueType) -> ModbusRead {
        ModbusRead {
            topic: format!("t/{address}"),
            kind,
            address,
            layout: Layout {
                value_type,
                byte_order: Order::Big,
                word_order: Order::Big,
            },
            scale: 1.0,
            offset: 0.0,
            payload: PayloadFormat::Plain,
            on_change: None,
        }
    }

    fn spans(plan: &[Span]) -> Vec<(RegisterKind, u16, u16)> {
        plan.iter().map(|s| (s.kind, s.start, s.count)).collect()
    }

    #[test]
    fn nearby_reads_of_one_kind_merge() {
        use RegisterKind::*;
        let reads = [
            read(Holding, 10, ValueType::F32),
            read(Holding, 0, ValueType::U16),
            read(Holding, 2, ValueType::U64),
            read(Input, 0, ValueType::U16),
            read(Holding, 200, ValueType::U16),
            read(Coil, 5, ValueType::Bool),
            read(Coil, 1999, ValueType::Bool),
            read(Coil, 0, ValueType::Bool),
        ];
        assert_eq!(
            spans(&plan(&reads, Some(16))),
            [
                (Holding, 0, 12),
                (Holding, 200, 1),
                (Input, 0, 1),
                (Coil, 0, 6),
                (Coil, 1999, 1)
            ]
        );
        assert_eq!(plan(&reads, Some(16))[0].reads, [1, 2, 0]);
        assert_eq!(plan(&reads, None).len(), reads.len());
        assert_eq!(
            spans(&plan(&reads, Some(0)))[..3],
            [(Holding, 0, 1), (Holding, 2, 4), (Holding, 10, 2)]
        );
    }

    #[test]
    fn a_merged_read_stays_within_the_protocol_limit() {
        let reads: Vec<ModbusRead> = (0..70)
            .map(|i| read(RegisterKind::Input, i * 2, ValueType::U32))
            .collect();
        assert_eq!(
            spans(&plan(&reads, Some(16))),
            [
                (RegisterKind::Input, 0, 124),
                (RegisterKind::Input, 124, 16)
            ]
        );
        let bits: Vec<ModbusRead> = (0..2001)
            .map(|i| read(RegisterKind::Discrete, i, ValueType::Bool))
            .collect();
        assert_eq!(
            spans(&plan(&bits, Some(16))),
            [
                (RegisterKind::Discrete, 0, 2000),
                (RegisterKind::Discrete, 2000, 1)
            ]
        );
    }

    #[test]
    fn on_change_publishes_moves_past_the_deadband_and_heartbeats() {
        let mut r = read(RegisterKind::Holding, 0, ValueType::U16);
        r.on_change = Some(crate::config::OnChange {
            deadband: 0.5,
            heartbeat: Some(Duration::from_secs(10)),
        });
        let t0 = Instant::now();
        let last = Some((Reading::Float(20.0), t0));
        assert!(due(&r, None, Reading::Float(20.0), t0));
        assert!(!due(
            &r,
            last,
            Reading::Float(20.4),
            t0 + Duration::from_secs(1)
        ));
        assert!(due(
            &r,
            last,
            Reading::Float(20.6),
            t0 + Duration::from_secs(1)
        ));
        assert!(due(
            &r,
            last,
            Reading::Float(20.0),
            t0 + Duration::from_secs(10)
        ));
    }

    #[test]
    fn backoff_doubles_to_its_ceiling() {
        assert_eq!(backoff(1), Duration::from_millis(200));
        assert_eq!(backoff(2), Duration::from_millis(400));
        assert_eq!(backoff(40), BACKOFF_MAX);
    }
}
