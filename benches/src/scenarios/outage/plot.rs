//! Draws an outage run's [`Timeline`] as an SVG: one panel per class with
//! accepted, delivered (stored by NATS) and backlog over time, the NATS and
//! etcd outages shaded.

use super::timeline::{Timeline, Window, CLASSES};
use crate::error::{failed, Result};
use plotters::prelude::*;
use std::path::Path;

const WIDTH: u32 = 1200;
const PANEL_HEIGHT: u32 = 260;
const NATS_SHADE: RGBColor = RGBColor(250, 200, 200);
const ETCD_SHADE: RGBColor = RGBColor(200, 215, 250);
const ACCEPTED: RGBColor = RGBColor(40, 90, 200);
const DELIVERED: RGBColor = RGBColor(30, 150, 60);
const BACKLOG: RGBColor = RGBColor(210, 60, 40);

/// Writes the plot of `timeline` to `path`, with `title` above it.
pub fn draw(path: &Path, timeline: &Timeline, title: &str) -> Result<()> {
    let what = format!("drawing the outage plot into {}", path.display());
    let fail = |error: &dyn std::fmt::Display| failed(&what, error);
    let height = PANEL_HEIGHT * CLASSES.len() as u32 + 40;
    let root = SVGBackend::new(path, (WIDTH, height)).into_drawing_area();
    root.fill(&WHITE).map_err(|error| fail(&error))?;
    let root = root
        .titled(title, ("sans-serif", 18))
        .map_err(|error| fail(&error))?;
    let panels = root.split_evenly((CLASSES.len(), 1));
    let delivered = timeline.delivered_by_sample();
    let samples = timeline.samples();
    let span = timeline.span();
    for (class, panel) in panels.iter().enumerate() {
        let accepted: Vec<(f64, f64)> = samples
            .iter()
            .map(|sample| (sample.at, sample.accepted[class] as f64))
            .collect();
        let stored: Vec<(f64, f64)> = samples
            .iter()
            .zip(&delivered)
            .map(|(sample, delivered)| (sample.at, delivered[class] as f64))
            .collect();
        let backlog: Vec<(f64, f64)> = samples
            .iter()
            .map(|sample| (sample.at, sample.backlog[class] as f64))
            .collect();
        let top = accepted
            .iter()
            .chain(&stored)
            .chain(&backlog)
            .map(|point| point.1)
            .fold(1.0, f64::max)
            * 1.05;
        let mut chart = ChartBuilder::on(panel)
            .caption(CLASSES[class], ("sans-serif", 16))
            .margin(8)
            .x_label_area_size(32)
            .y_label_area_size(80)
            .build_cartesian_2d(0.0..span, 0.0..top)
            .map_err(|error| fail(&error))?;
        chart
            .configure_mesh()
            .x_desc("seconds since the start")
            .y_desc("messages")
            .y_label_formatter(&|value| format!("{value:.0}"))
            .draw()
            .map_err(|error| fail(&error))?;
        for (window, shade, label) in [
            (timeline.nats_outage, NATS_SHADE, "NATS down"),
            (timeline.etcd_outage, ETCD_SHADE, "etcd down"),
        ] {
            let Some(Window { from, to }) = window else {
                continue;
            };
            chart
                .draw_series(std::iter::once(Rectangle::new(
                    [(from, 0.0), (to, top)],
                    shade.filled(),
                )))
                .map_err(|error| fail(&error))?
                .label(label)
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 18, y + 5)], shade.filled())
                });
        }
        for (points, color, width, label) in [
            (accepted, ACCEPTED, 4, "accepted (total)"),
            (stored, DELIVERED, 2, "delivered: stored by NATS (total)"),
            (backlog, BACKLOG, 2, "backlog in the relay"),
        ] {
            chart
                .draw_series(LineSeries::new(points, color.stroke_width(width)))
                .map_err(|error| fail(&error))?
                .label(label)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(width))
                });
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(|error| fail(&error))?;
    }
    root.present().map_err(|error| fail(&error))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::timeline::Sample;
    use super::*;

    #[test]
    fn draws_every_class_and_both_outages() {
        let mut timeline = Timeline::default();
        for second in 1..=30u64 {
            let down = (10..20).contains(&second);
            timeline.push(Sample {
                at: second as f64,
                accepted: [second * 250; 4],
                backlog: [if down { (second - 9) * 250 } else { 0 }; 4],
            });
            if !down {
                for class in 0..4 {
                    timeline.count_delivery(class, second as f64 - 0.5);
                }
            }
        }
        timeline.nats_outage = Some(Window {
            from: 10.0,
            to: 20.0,
        });
        timeline.etcd_outage = Some(Window {
            from: 24.0,
            to: 27.0,
        });
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outage.svg");
        draw(&path, &timeline, "test run").unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(200)]);
        for text in CLASSES
            .iter()
            .chain(&["NATS down", "etcd down", "backlog in the relay"])
        {
            assert!(svg.contains(text), "no {text} in the plot");
        }
        assert!(svg.contains("<polyline"), "no lines in the plot");
    }
}
