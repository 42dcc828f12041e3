//! Box plots: several sample sets side by side.

use std::path::{Path, PathBuf};

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::VPos;
use plotters::style::RGBColor;

use super::{
    annotate, category_range, chart, legend, min_max, padded, render, DrawResult, Figure, Frame,
    PlotError, XAxis,
};

/// Box plot of several sample sets side by side (latency per configuration, say): box from the
/// first to the third quartile, median line, whiskers to the furthest sample within 1.5 IQR of
/// the box (matplotlib's convention), the samples beyond drawn as outliers, a triangle at the
/// mean, and `n=` above each group.
pub fn box_plot(
    stem: &Path,
    title: &str,
    y_label: &str,
    groups: &[(String, Vec<f64>)],
) -> Result<Vec<PathBuf>, PlotError> {
    if groups.is_empty() {
        return Err(PlotError::Empty("groups"));
    }
    let boxes = groups
        .iter()
        .map(|(label, samples)| BoxStats::new(label, samples))
        .collect::<Result<Vec<_>, _>>()?;
    render(
        stem,
        &BoxFigure {
            title,
            y_label,
            boxes,
        },
    )
}

/// Quartiles, whiskers and outliers of one box-plot group.
struct BoxStats<'a> {
    label: &'a str,
    n: usize,
    mean: f64,
    q1: f64,
    median: f64,
    q3: f64,
    whisker_low: f64,
    whisker_high: f64,
    outliers: Vec<f64>,
}

impl<'a> BoxStats<'a> {
    /// matplotlib-style box statistics of `samples` (non-empty, finite).
    fn new(label: &'a str, samples: &[f64]) -> Result<Self, PlotError> {
        if samples.is_empty() {
            return Err(PlotError::EmptyGroup {
                kind: "group",
                label: label.to_string(),
            });
        }
        let non_finite = || PlotError::NonFinite {
            kind: "group",
            label: label.to_string(),
        };
        let summary = crate::stats::summarize(samples).ok_or_else(non_finite)?;
        let q1 = crate::stats::percentile(samples, 25.0).ok_or_else(non_finite)?;
        let q3 = crate::stats::percentile(samples, 75.0).ok_or_else(non_finite)?;
        let reach = 1.5 * (q3 - q1);
        let inside = samples
            .iter()
            .copied()
            .filter(|&v| v >= q1 - reach && v <= q3 + reach);
        let (whisker_low, whisker_high) = min_max(inside);
        Ok(Self {
            label,
            n: summary.n,
            mean: summary.mean,
            q1,
            median: summary.p50,
            q3,
            whisker_low,
            whisker_high,
            outliers: samples
                .iter()
                .copied()
                .filter(|&v| v < q1 - reach || v > q3 + reach)
                .collect(),
        })
    }

    /// Highest point drawn for this group (top whisker or highest outlier).
    fn top(&self) -> f64 {
        self.outliers
            .iter()
            .copied()
            .fold(self.whisker_high, f64::max)
    }

    /// Lowest point drawn for this group.
    fn bottom(&self) -> f64 {
        self.outliers
            .iter()
            .copied()
            .fold(self.whisker_low, f64::min)
    }
}

/// Half the width of a box, in category units.
const BOX_HALF: f64 = 0.25;

/// The validated input of [`box_plot`].
struct BoxFigure<'a> {
    title: &'a str,
    y_label: &'a str,
    boxes: Vec<BoxStats<'a>>,
}

impl Figure for BoxFigure<'_> {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult<DB> {
        let (lo, hi) = min_max(self.boxes.iter().flat_map(|b| [b.bottom(), b.top()]));
        let (y_lo, y_hi) = padded(lo, hi, 0.05, 0.12);
        let labels: Vec<&str> = self.boxes.iter().map(|b| b.label).collect();
        let frame = Frame {
            title: self.title,
            y_label: self.y_label,
            x_axis: XAxis::Categories(&labels),
        };
        let mut chart = chart(root, &frame, category_range(labels.len()), y_lo..y_hi)?;

        let edge = RGBColor(31, 119, 180);
        let fill = RGBColor(174, 199, 232);
        let median = RGBColor(255, 127, 14).stroke_width(3);
        let whisker = BLACK.stroke_width(1);
        for (i, b) in self.boxes.iter().enumerate() {
            let x = i as f64;
            let (half, cap) = (BOX_HALF, 0.12);
            chart.draw_series([
                Rectangle::new([(x - half, b.q1), (x + half, b.q3)], fill.filled()),
                Rectangle::new([(x - half, b.q1), (x + half, b.q3)], edge.stroke_width(2)),
            ])?;
            chart.draw_series([
                PathElement::new([(x, b.q3), (x, b.whisker_high)], whisker),
                PathElement::new([(x, b.q1), (x, b.whisker_low)], whisker),
                PathElement::new(
                    [(x - cap, b.whisker_high), (x + cap, b.whisker_high)],
                    whisker,
                ),
                PathElement::new(
                    [(x - cap, b.whisker_low), (x + cap, b.whisker_low)],
                    whisker,
                ),
            ])?;
            chart.draw_series(
                b.outliers
                    .iter()
                    .map(|&v| Circle::new((x, v), 4, RGBColor(90, 90, 90).stroke_width(1))),
            )?;
            annotate(
                &mut chart,
                (x, b.top()),
                format!("n={}", b.n),
                -8,
                VPos::Bottom,
            )?;
        }
        let mean_color = RGBColor(44, 160, 44);
        chart
            .draw_series(
                self.boxes
                    .iter()
                    .enumerate()
                    .map(|(i, b)| TriangleMarker::new((i as f64, b.mean), 7, mean_color.filled())),
            )?
            .label("mean")
            .legend(move |(x, y)| TriangleMarker::new((x, y), 7, mean_color.filled()));
        chart
            .draw_series(self.boxes.iter().enumerate().map(|(i, b)| {
                let x = i as f64;
                PathElement::new([(x - BOX_HALF, b.median), (x + BOX_HALF, b.median)], median)
            }))?
            .label("median")
            .legend(move |(x, y)| PathElement::new([(x - 10, y), (x + 10, y)], median));
        legend(&mut chart, SeriesLabelPosition::UpperRight)
    }
}
