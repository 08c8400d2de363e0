//! Result rows: the table printed at the end of a run and the `--json` file.

use crate::error::{Context, Result};
use serde::Serialize;
use std::path::Path;

/// One measured (or not measurable) figure against its baseline.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Row {
    /// Scenario and variant, e.g. `publish/default`.
    pub scenario: String,
    /// holdfast's figure (the median over `repetitions`); `None` when not measured.
    pub value: Option<f64>,
    /// Unit of `value` and `baseline_value`: `msg/s`, `µs`, `MiB`, `s`, `messages`.
    pub unit: String,
    /// What holdfast is compared with.
    pub baseline: String,
    /// The baseline's figure, measured in the same run.
    pub baseline_value: Option<f64>,
    /// `value / baseline_value`.
    pub ratio: Option<f64>,
    /// The target, in words.
    pub target: String,
    /// Whether the target is met; `None` when it cannot be judged.
    pub met: Option<bool>,
    /// Repetitions each figure is the median of.
    pub repetitions: u32,
    /// For latencies: holdfast's figure minus the baseline's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub added: Option<f64>,
    /// Sizes, caveats, losses, failures.
    pub note: String,
}

impl Row {
    /// Fills `ratio` from `value` and `baseline_value`.
    pub fn with_ratio(mut self) -> Row {
        self.ratio = match (self.value, self.baseline_value) {
            (Some(value), Some(baseline)) if baseline != 0.0 => Some(value / baseline),
            _ => None,
        };
        self
    }
}

/// A figure with its unit, for the table.
pub fn format_value(value: Option<f64>, unit: &str) -> String {
    let Some(value) = value else {
        return "-".to_string();
    };
    match unit {
        "msg/s" if value >= 1e6 => format!("{:.2}M msg/s", value / 1e6),
        "msg/s" if value >= 1e3 => format!("{:.1}k msg/s", value / 1e3),
        "msg/s" => format!("{value:.0} msg/s"),
        "µs" => format!("{value:.1} µs"),
        "MiB" => format!("{value:.1} MiB"),
        "s" => format!("{value:.3} s"),
        "messages" => format!("{value:.0}"),
        other => format!("{value:.2} {other}"),
    }
}

fn format_ratio(ratio: Option<f64>) -> String {
    ratio.map_or_else(|| "-".to_string(), |ratio| format!("{ratio:.2}×"))
}

fn format_met(met: Option<bool>) -> &'static str {
    match met {
        Some(true) => "yes",
        Some(false) => "no",
        None => "n/a",
    }
}

/// The rows as a fixed-width table (Markdown pipe syntax, so it can be
/// pasted into benches/RESULTS.md as is), followed by the notes.
pub fn table(rows: &[Row]) -> String {
    let header = [
        "scenario",
        "holdfast",
        "baseline",
        "baseline value",
        "ratio",
        "target",
        "met",
        "N",
    ];
    let mut cells: Vec<Vec<String>> = Vec::with_capacity(rows.len());
    for row in rows {
        let mut value = format_value(row.value, &row.unit);
        if let Some(added) = row.added {
            value.push_str(&format!(" (+{added:.1} µs)"));
        }
        cells.push(vec![
            row.scenario.clone(),
            value,
            row.baseline.clone(),
            format_value(row.baseline_value, &row.unit),
            format_ratio(row.ratio),
            row.target.clone(),
            format_met(row.met).to_string(),
            if row.repetitions == 0 {
                "-".to_string()
            } else {
                row.repetitions.to_string()
            },
        ]);
    }
    let mut widths: Vec<usize> = header.iter().map(|title| title.chars().count()).collect();
    for line in &cells {
        for (width, cell) in widths.iter_mut().zip(line) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let render = |line: &[String]| -> String {
        let padded: Vec<String> = line
            .iter()
            .zip(&widths)
            .map(|(cell, width)| {
                let pad = width.saturating_sub(cell.chars().count());
                format!("{cell}{}", " ".repeat(pad))
            })
            .collect();
        format!("| {} |", padded.join(" | "))
    };
    let mut out = String::new();
    let titles: Vec<String> = header.iter().map(|title| title.to_string()).collect();
    out.push_str(&render(&titles));
    out.push('\n');
    let rule: Vec<String> = widths.iter().map(|width| "-".repeat(*width)).collect();
    out.push_str(&render(&rule));
    out.push('\n');
    for line in &cells {
        out.push_str(&render(line));
        out.push('\n');
    }
    let notes: Vec<&Row> = rows.iter().filter(|row| !row.note.is_empty()).collect();
    if !notes.is_empty() {
        out.push('\n');
        for row in notes {
            out.push_str(&format!("- {}: {}\n", row.scenario, row.note));
        }
    }
    out
}

/// Writes the rows to `path` as a JSON array of objects.
pub fn write_json(path: &Path, rows: &[Row]) -> Result<()> {
    let text = serde_json::to_string_pretty(rows).context("encoding the rows as JSON")?;
    std::fs::write(path, text + "\n").context(&format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_units() {
        assert_eq!(format_value(Some(1_234_567.0), "msg/s"), "1.23M msg/s");
        assert_eq!(format_value(Some(312_400.0), "msg/s"), "312.4k msg/s");
        assert_eq!(format_value(Some(12.34), "µs"), "12.3 µs");
        assert_eq!(format_value(None, "µs"), "-");
    }

    #[test]
    fn table_has_a_line_per_row_and_notes() {
        let rows = vec![
            Row {
                scenario: "publish/default".into(),
                value: Some(300_000.0),
                unit: "msg/s".into(),
                baseline: "direct".into(),
                baseline_value: Some(600_000.0),
                target: "≥ 0.8×".into(),
                met: Some(false),
                repetitions: 3,
                ..Row::default()
            }
            .with_ratio(),
            Row {
                scenario: "outage/etcd".into(),
                note: "not available yet".into(),
                ..Row::default()
            },
        ];
        let text = table(&rows);
        assert!(text.contains("| publish/default | 300.0k msg/s"));
        assert!(text.contains("0.50×"));
        assert!(text.contains("- outage/etcd: not available yet"));
        let json = serde_json::to_value(&rows).unwrap();
        assert_eq!(json[0]["ratio"], 0.5);
        assert!(json[1]["value"].is_null());
        assert!(json[0].get("added").is_none());
    }
}
