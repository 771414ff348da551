//! One markdown table per workload, the same columns for all; `-` where a figure does not
//! apply (the cloud's own costs are never shown: direct has no gateway).

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
        let rows: Vec<[String; 12]> = self
            .rows
            .iter()
            .map(|r| {
                [
                    r.name(),
                    r.sent.to_string(),
                    r.arrived.to_string(),
                    r.lost.to_string(),
                    r.duplicates.to_string(),
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
        let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
        for row in &rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        // The notes column is last and free text: not padded.
        widths[11] = 5;
        let line = |cells: Vec<String>| {
            let padded: Vec<String> = cells
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    let pad = widths[i].saturating_sub(c.chars().count());
                    match i {
                        0 | 11 => format!("{c}{}", " ".repeat(pad)),
                        _ => format!("{}{c}", " ".repeat(pad)),
                    }
                })
                .collect();
            println!("| {} |", padded.join(" | "));
        };
        line(header.iter().map(|h| h.to_string()).collect());
        let rule: Vec<String> = widths
            .iter()
            .enumerate()
            .map(|(i, w)| match i {
                0 | 11 => "-".repeat(w + 2),
                _ => format!("{}:", "-".repeat(w + 1)),
            })
            .collect();
        println!("|{}|", rule.join("|"));
        for row in rows {
            line(row.to_vec());
        }
    }
}
