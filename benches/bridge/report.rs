//! One markdown table per workload, the same columns for all; `-` where a figure does not
//! apply (the cloud's own costs are never shown: direct has no gateway). The idle
//! connections' memory has a table of its own.

use crate::setups::Setup;

#[derive(Default)]
pub struct Row {
    pub setup: Option<Setup>,
    /// Overrides the setup's name (a row that is not one of the four setups).
    pub label: Option<String>,
    pub sent: usize,
    pub arrived: usize,
    pub lost: usize,
    pub duplicates: usize,
    pub rate: Option<f64>,
    pub bytes_per_msg: Option<f64>,
    pub cpu_us_per_msg: Option<f64>,
    pub rss_mib: Option<f64>,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub notes: Vec<String>,
    /// QoS 0: losses are reported, never a failure.
    pub best_effort: bool,
    /// The setup could not run (no baseline binary given): every figure is `-`.
    pub not_run: bool,
}

impl Row {
    pub fn new(setup: Setup) -> Self {
        Row {
            setup: Some(setup),
            ..Row::default()
        }
    }

    pub fn name(&self) -> String {
        self.label
            .clone()
            .or_else(|| self.setup.map(|s| s.name().to_string()))
            .unwrap_or_default()
    }
}

pub struct Table {
    pub title: String,
    pub rows: Vec<Row>,
}

fn opt(value: Option<f64>, decimals: usize) -> String {
    value.map_or_else(|| "-".to_string(), |v| format!("{v:.decimals$}"))
}

/// Three significant figures for latencies of 0.05 ms to seconds.
fn ms(value: Option<f64>) -> String {
    match value {
        None => "-".to_string(),
        Some(v) if v < 10.0 => format!("{v:.2}"),
        Some(v) if v < 100.0 => format!("{v:.1}"),
        Some(v) => format!("{v:.0}"),
    }
}

impl Table {
    pub fn print(&self) {
        println!("\n### {}\n", self.title);
        let header = [
            "setup",
            "sent",
            "arrived",
            "lost",
            "dups",
            "msg/s",
            "B written/msg",
            "CPU µs/msg",
            "peak RSS MiB",
            "p50 ms",
            "p99 ms",
            "notes",
        ];
        let rows: Vec<Vec<String>> = self
            .rows
            .iter()
            .map(|r| {
                let count = |n: usize| match r.not_run {
                    true => "-".to_string(),
                    false => n.to_string(),
                };
                vec![
                    r.name(),
                    count(r.sent),
                    count(r.arrived),
                    count(r.lost),
                    count(r.duplicates),
                    opt(r.rate, 0),
                    opt(r.bytes_per_msg, 1),
                    opt(r.cpu_us_per_msg, 1),
                    opt(r.rss_mib, 1),
                    ms(r.p50_ms),
                    ms(r.p99_ms),
                    r.notes.join("; "),
                ]
            })
            .collect();
        print_grid(&header, rows);
    }
}

/// One broker's resident memory before and with idle device connections.
pub struct MemoryRow {
    pub setup: Setup,
    /// Devices connected and subscribed (`None`: the setup could not run).
    pub connections: Option<usize>,
    pub before_mib: Option<f64>,
    pub with_mib: Option<f64>,
    pub notes: Vec<String>,
}

pub struct MemoryTable {
    pub title: String,
    pub rows: Vec<MemoryRow>,
}

impl MemoryTable {
    pub fn print(&self) {
        println!("\n### {}\n", self.title);
        let header = [
            "setup",
            "connections",
            "RSS before MiB",
            "RSS with them MiB",
            "difference MiB",
            "KiB per connection",
            "notes",
        ];
        let rows = self
            .rows
            .iter()
            .map(|r| {
                let difference = r.with_mib.zip(r.before_mib).map(|(w, b)| w - b);
                let per_connection = difference
                    .zip(r.connections.filter(|n| *n > 0))
                    .map(|(d, n)| d * 1024.0 / n as f64);
                vec![
                    r.setup.name().to_string(),
                    r.connections.map_or_else(|| "-".into(), |n| n.to_string()),
                    opt(r.before_mib, 1),
                    opt(r.with_mib, 1),
                    opt(difference, 1),
                    opt(per_connection, 1),
                    r.notes.join("; "),
                ]
            })
            .collect();
        print_grid(&header, rows);
    }
}

/// A markdown table: the first and last columns left-aligned, the others right-aligned;
/// the last (free text) not padded.
fn print_grid(header: &[&str], rows: Vec<Vec<String>>) {
    let last = header.len() - 1;
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row).take(last) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &[String]| {
        let padded: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let pad = " ".repeat(widths[i].saturating_sub(c.chars().count()));
                match i == 0 || i == last {
                    true => format!("{c}{pad}"),
                    false => format!("{pad}{c}"),
                }
            })
            .collect();
        println!("| {} |", padded.join(" | "));
    };
    line(&header.iter().map(|h| h.to_string()).collect::<Vec<_>>());
    let rule: Vec<String> = widths
        .iter()
        .enumerate()
        .map(|(i, w)| match i == 0 || i == last {
            true => "-".repeat(w + 2),
            false => format!("{}:", "-".repeat(w + 1)),
        })
        .collect();
    println!("|{}|", rule.join("|"));
    for row in &rows {
        line(row);
    }
}
