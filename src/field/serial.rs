//! Line-oriented serial sensors: each line becomes one or more readings; commands are
//! written to the port as lines. An unplugged port is reopened with backoff.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch};
use tokio_serial::{SerialPortBuilderExt, SerialStream};
use tracing::{info, warn};

use super::Publisher;
use crate::config::{LineFormat, SerialLine, SerialSensor, KEY_PLACEHOLDER};
use crate::health::{inc, DeviceHealth, DeviceState, RateLimit, SharedHealth};
use crate::supervisor::Probe;

const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Opens a serial port with the line's settings, for tokio.
pub fn open(line: &SerialLine) -> tokio_serial::Result<SerialStream> {
    let data_bits = match line.data_bits {
        5 => tokio_serial::DataBits::Five,
        6 => tokio_serial::DataBits::Six,
        7 => tokio_serial::DataBits::Seven,
        _ => tokio_serial::DataBits::Eight,
    };
    let stop_bits = match line.stop_bits {
        2 => tokio_serial::StopBits::Two,
        _ => tokio_serial::StopBits::One,
    };
    tokio_serial::new(&line.device, line.baud)
        .parity(line.parity.into())
        .data_bits(data_bits)
        .stop_bits(stop_bits)
        .open_native_async()
}

/// Why a line was dropped.
#[derive(Debug, PartialEq, Eq)]
pub enum Dropped {
    TooLong,
    NotUtf8,
    NotInFormat(&'static str),
}

/// Splits bytes into lines, dropping (and reporting) lines over `max` bytes.
pub struct Lines {
    buf: Vec<u8>,
    max: usize,
    /// Inside an overlong line: skip up to its end.
    skipping: bool,
}

impl Lines {
    pub fn new(max: usize) -> Self {
        Lines {
            buf: Vec::new(),
            max,
            skipping: false,
        }
    }

    /// Feeds `bytes`; returns every complete line (without `\r\n`) or why it was dropped.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<Result<String, Dropped>> {
        let mut out = Vec::new();
        for &byte in bytes {
            if byte == b'\n' {
                if std::mem::take(&mut self.skipping) {
                    out.push(Err(Dropped::TooLong));
                } else {
                    let mut line = std::mem::take(&mut self.buf);
                    if line.last() == Some(&b'\r') {
                        line.pop();
                    }
                    if !line.is_empty() {
                        out.push(String::from_utf8(line).map_err(|_| Dropped::NotUtf8));
                    }
                }
                self.buf.clear();
            } else if !self.skipping {
                self.buf.push(byte);
                if self.buf.len() > self.max {
                    self.buf.clear();
                    self.skipping = true;
                }
            }
        }
        out
    }
}

/// The (topic, payload) pairs of one line.
pub fn readings(
    format: LineFormat,
    topic: &str,
    line: &str,
) -> Result<Vec<(String, String)>, Dropped> {
    let keyed = |key: &str| topic.replace(KEY_PLACEHOLDER, key);
    match format {
        LineFormat::Raw => Ok(vec![(topic.to_owned(), line.to_owned())]),
        LineFormat::Kv => line
            .split(|c: char| c.is_whitespace() || c == ',' || c == ';')
            .filter(|pair| !pair.is_empty())
            .map(|pair| match pair.split_once('=') {
                Some((key, value)) if valid_key(key) && !value.is_empty() => {
                    Ok((keyed(key), value.to_owned()))
                }
                _ => Err(Dropped::NotInFormat("not key=value pairs")),
            })
            .collect::<Result<Vec<_>, _>>()
            .and_then(|pairs| {
                if pairs.is_empty() {
                    Err(Dropped::NotInFormat("no key=value pairs"))
                } else {
                    Ok(pairs)
                }
            }),
        LineFormat::Json => {
            let Ok(serde_json::Value::Object(object)) = serde_json::from_str(line) else {
                return Err(Dropped::NotInFormat("not a JSON object"));
            };
            if object.is_empty() || !object.keys().all(|k| valid_key(k)) {
                return Err(Dropped::NotInFormat(
                    "a JSON object without keys usable in topics",
                ));
            }
            Ok(object
                .into_iter()
                .map(|(key, value)| {
                    let text = match value {
                        serde_json::Value::String(s) => s,
                        other => other.to_string(),
                    };
                    (keyed(&key), text)
                })
                .collect())
        }
    }
}

/// A key goes into a topic level: no separators, wildcards or control characters.
fn valid_key(key: &str) -> bool {
    !key.is_empty() && !key.contains(['/', '+', '#']) && !key.chars().any(char::is_control)
}

pub struct Sensor {
    config: SerialSensor,
    commands: mpsc::Receiver<Bytes>,
    commands_open: bool,
    publisher: Publisher,
    health: SharedHealth,
    device: Arc<DeviceHealth>,
    probe: Probe,
    shutdown: watch::Receiver<bool>,
    drop_log: RateLimit,
}

enum End {
    Shutdown,
    Lost(String),
}

impl Sensor {
    pub fn new(
        config: SerialSensor,
        commands: mpsc::Receiver<Bytes>,
        publisher: Publisher,
        health: &SharedHealth,
        probe: Probe,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        Sensor {
            probe,
            device: health.device(format!("serial/{}", config.name)),
            config,
            commands,
            commands_open: true,
            publisher,
            health: health.clone(),
            shutdown,
            drop_log: RateLimit::new(Duration::from_secs(10)),
        }
    }

    pub async fn run(mut self) {
        let mut failures = 0u32;
        loop {
            // Opening a serial port is a blocking system call.
            let line = self.config.line.clone();
            let opened = tokio::task::spawn_blocking(move || open(&line))
                .await
                .unwrap_or_else(|e| {
                    Err(tokio_serial::Error::new(
                        tokio_serial::ErrorKind::Unknown,
                        e.to_string(),
                    ))
                });
            let error = match opened {
                Ok(port) => {
                    failures = 0;
                    if self.device.set_state(DeviceState::Online) {
                        info!(sensor = %self.config.name, device = %self.config.line.device, "serial sensor open");
                    }
                    match self.session(port).await {
                        End::Shutdown => return,
                        End::Lost(error) => error,
                    }
                }
                Err(e) => e.to_string(),
            };
            inc(&self.device.errors);
            failures = failures.saturating_add(1);
            if self.device.set_state(DeviceState::Unreachable) {
                warn!(sensor = %self.config.name, device = %self.config.line.device, %error,
                    "serial sensor unreachable; reopening with backoff");
            }
            let delay = crate::backoff::bound(BACKOFF_MIN, BACKOFF_MAX, failures.saturating_sub(1));
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = self.probe.serve() => {}
                _ = self.shutdown.changed() => return,
            }
        }
    }

    async fn session(&mut self, port: SerialStream) -> End {
        let (mut reader, mut writer) = tokio::io::split(port);
        let mut lines = Lines::new(self.config.max_line);
        let mut buf = vec![0u8; 4096];
        loop {
            tokio::select! {
                read = reader.read(&mut buf) => match read {
                    Ok(0) => return End::Lost("the port reached end of file".into()),
                    Ok(n) => {
                        for line in lines.feed(&buf[..n]) {
                            self.line(line).await;
                        }
                    }
                    Err(e) => return End::Lost(e.to_string()),
                },
                command = self.commands.recv(), if self.commands_open => {
                    let Some(mut command) = command.map(Vec::from) else {
                        // No command topic (or the router stopped): keep reading.
                        self.commands_open = false;
                        continue;
                    };
                    if command.last() != Some(&b'\n') {
                        command.push(b'\n');
                    }
                    if let Err(e) = writer.write_all(&command).await {
                        inc(&self.device.write_errors);
                        return End::Lost(format!("writing a command: {e}"));
                    }
                    inc(&self.device.writes);
                }
                _ = self.probe.serve() => {}
                _ = self.shutdown.changed() => return End::Shutdown,
            }
        }
    }

    async fn line(&mut self, line: Result<String, Dropped>) {
        inc(&self.device.transactions);
        let parsed = line.and_then(|line| readings(self.config.format, &self.config.topic, &line));
        match parsed {
            Ok(readings) => {
                for (topic, payload) in readings {
                    inc(&self.device.readings);
                    inc(&self.health.counters.field_readings);
                    self.publisher.publish(topic, payload).await;
                }
            }
            Err(why) => {
                inc(&self.device.dropped);
                inc(&self.health.counters.serial_lines_dropped);
                if let Some(held) = self.drop_log.check() {
                    warn!(sensor = %self.config.name, reason = ?why, earlier_warnings_suppressed = held, "serial line dropped");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_split_and_overlong_ones_dropped() {
        let mut lines = Lines::new(8);
        assert_eq!(lines.feed(b"a=1\r\nb="), [Ok("a=1".to_owned())]);
        assert_eq!(
            lines.feed(b"2\n0123456789abc\nok\n"),
            [
                Ok("b=2".to_owned()),
                Err(Dropped::TooLong),
                Ok("ok".to_owned())
            ]
        );
        assert_eq!(lines.feed(b"\xff\xfe\n\n"), [Err(Dropped::NotUtf8)]);
    }

    #[test]
    fn each_format_makes_its_readings() {
        let topic = "site/{key}";
        assert_eq!(
            readings(LineFormat::Kv, topic, "temp=21.5 hum=40").unwrap(),
            [
                ("site/temp".to_owned(), "21.5".to_owned()),
                ("site/hum".to_owned(), "40".to_owned())
            ]
        );
        assert!(readings(LineFormat::Kv, topic, "temp 21.5").is_err());
        assert!(readings(LineFormat::Kv, topic, "a/b=1").is_err());
        assert_eq!(
            readings(
                LineFormat::Json,
                topic,
                r#"{"temp": 21.5, "ok": true, "id": "x"}"#
            )
            .unwrap(),
            [
                ("site/id".to_owned(), "x".to_owned()),
                ("site/ok".to_owned(), "true".to_owned()),
                ("site/temp".to_owned(), "21.5".to_owned()),
            ]
        );
        assert!(readings(LineFormat::Json, topic, "[1, 2]").is_err());
        assert!(readings(LineFormat::Json, topic, "{").is_err());
        assert_eq!(
            readings(LineFormat::Raw, "site/line", "hello world").unwrap(),
            [("site/line".to_owned(), "hello world".to_owned())]
        );
    }
}
