//! The `--compare` chart: per workload, the fetcd/etcd ratio of throughput (left) and of p99
//! latency (right) as bars at the median with a min–max whisker, and a line at parity (1.0).
//! Ratios rather than raw numbers, because workloads differ by orders of magnitude.

use std::path::Path;

use plotters::coord::ranged1d::SegmentValue;
use plotters::prelude::*;

use crate::compare::ratio::Spread;

pub(crate) struct Row {
    pub case: String,
    pub throughput: Option<Spread>,
    pub p99: Option<Spread>,
}

const BAR: RGBColor = RGBColor(70, 130, 180);

pub(crate) fn write(path: &Path, title: &str, rows: &[Row]) -> anyhow::Result<()> {
    let height = 120 + 34 * rows.len() as u32;
    let root = SVGBackend::new(path, (1200, height)).into_drawing_area();
    root.fill(&WHITE)
        .map_err(|e| anyhow::anyhow!("chart: {e}"))?;
    let root = root
        .titled(title, ("sans-serif", 20))
        .map_err(|e| anyhow::anyhow!("chart: {e}"))?;
    let (left, right) = root.split_horizontally(600);
    panel(
        &left,
        "throughput fetcd/etcd (higher is better)",
        rows,
        |r| r.throughput,
    )?;
    panel(
        &right,
        "p99 latency fetcd/etcd (lower is better)",
        rows,
        |r| r.p99,
    )?;
    root.present()
        .map_err(|e| anyhow::anyhow!("write {}: {e}", path.display()))?;
    Ok(())
}

fn panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    caption: &str,
    rows: &[Row],
    value: impl Fn(&Row) -> Option<Spread>,
) -> anyhow::Result<()> {
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow::anyhow!("chart: {e:?}");
    let n = rows.len() as i32;
    let xmax = rows
        .iter()
        .filter_map(|r| value(r).map(|s| s.max))
        .fold(1.0f64, f64::max)
        * 1.15;
    // The first row is drawn at the top.
    let y_of = |k: usize| n - 1 - k as i32;
    let names: Vec<String> = rows.iter().map(|r| r.case.clone()).collect();
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 15))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(130)
        .build_cartesian_2d(0f64..xmax, (0..n).into_segmented())
        .map_err(err)?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(rows.len().max(1))
        .y_label_formatter(&|v: &SegmentValue<i32>| match v {
            SegmentValue::CenterOf(i) | SegmentValue::Exact(i) => usize::try_from(n - 1 - i)
                .ok()
                .and_then(|k| names.get(k).cloned())
                .unwrap_or_default(),
            SegmentValue::Last => String::new(),
        })
        .draw()
        .map_err(err)?;
    for (k, r) in rows.iter().enumerate() {
        let y = y_of(k);
        let Some(s) = value(r) else {
            chart
                .draw_series([Text::new(
                    "n/a",
                    (0.02 * xmax, SegmentValue::CenterOf(y)),
                    ("sans-serif", 12),
                )])
                .map_err(err)?;
            continue;
        };
        let mut bar = Rectangle::new(
            [
                (0.0, SegmentValue::Exact(y)),
                (s.median, SegmentValue::Exact(y + 1)),
            ],
            BAR.mix(0.8).filled(),
        );
        bar.set_margin(6, 6, 0, 0);
        chart.draw_series([bar]).map_err(err)?;
        chart
            .draw_series([PathElement::new(
                vec![
                    (s.min, SegmentValue::CenterOf(y)),
                    (s.max, SegmentValue::CenterOf(y)),
                ],
                BLACK.stroke_width(2),
            )])
            .map_err(err)?;
        chart
            .draw_series([Text::new(
                format!("{:.2}", s.median),
                (s.max + 0.01 * xmax, SegmentValue::CenterOf(y)),
                ("sans-serif", 12),
            )])
            .map_err(err)?;
    }
    chart
        .draw_series([PathElement::new(
            vec![(1.0, SegmentValue::Exact(0)), (1.0, SegmentValue::Last)],
            RED.stroke_width(1),
        )])
        .map_err(err)?;
    Ok(())
}
