//! Bar charts: one number per category.

use std::path::{Path, PathBuf};

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::VPos;
use plotters::style::RGBColor;

use super::{
    annotate, category_range, chart, fmt_num, min_max, padded, render, DrawResult, Figure, Frame,
    PlotError, XAxis,
};

/// One bar of a [`bar_chart`]: a configuration and its number (tokens/s, overhead %, ...).
#[derive(Debug, Clone, PartialEq)]
pub struct Bar {
    /// Category label under the bar.
    pub label: String,
    /// Bar height; may be negative (an overhead that turned out to be a speed-up).
    pub value: f64,
    /// Half-length of an error bar drawn at the top (a CI half-width, say); `None` for none.
    pub error: Option<f64>,
}

/// Bar chart of one number per category, with its value written above the bar (below when
/// negative), an optional error bar, and the y = 0 line so that negative bars (an overhead
/// below zero) read at a glance.
pub fn bar_chart(
    stem: &Path,
    title: &str,
    y_label: &str,
    bars: &[Bar],
) -> Result<Vec<PathBuf>, PlotError> {
    if bars.is_empty() {
        return Err(PlotError::Empty("bars"));
    }
    for bar in bars {
        if !bar.value.is_finite() {
            return Err(PlotError::NonFinite {
                kind: "bar",
                label: bar.label.clone(),
            });
        }
        if let Some(error) = bar.error.filter(|e| !(e.is_finite() && *e >= 0.0)) {
            return Err(PlotError::InvalidError {
                label: bar.label.clone(),
                error,
            });
        }
    }
    render(
        stem,
        &BarFigure {
            title,
            y_label,
            bars,
        },
    )
}

/// The validated input of [`bar_chart`].
struct BarFigure<'a> {
    title: &'a str,
    y_label: &'a str,
    bars: &'a [Bar],
}

impl Figure for BarFigure<'_> {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult<DB> {
        let err = |b: &Bar| b.error.unwrap_or(0.0);
        let (lo, hi) = min_max(
            self.bars
                .iter()
                .flat_map(|b| [0.0, b.value - err(b), b.value + err(b)]),
        );
        // Room for the value labels above positive bars and below negative ones.
        let below = if lo < 0.0 { 0.12 } else { 0.0 };
        let (y_lo, y_hi) = padded(lo, hi, below, 0.12);
        let labels: Vec<&str> = self.bars.iter().map(|b| b.label.as_str()).collect();
        let x_range = category_range(labels.len());
        let frame = Frame {
            title: self.title,
            y_label: self.y_label,
            x_axis: XAxis::Categories(&labels),
        };
        let mut chart = chart(root, &frame, x_range.clone(), y_lo..y_hi)?;

        let positive = RGBColor(31, 119, 180);
        let negative = RGBColor(214, 39, 40);
        let half = 0.3;
        chart.draw_series(self.bars.iter().enumerate().map(|(i, b)| {
            let x = i as f64;
            let color = if b.value < 0.0 { negative } else { positive };
            Rectangle::new([(x - half, 0.0), (x + half, b.value)], color.filled())
        }))?;
        let bar_edge = BLACK.stroke_width(2);
        for (i, b) in self.bars.iter().enumerate() {
            let x = i as f64;
            if let Some(e) = b.error.filter(|e| *e > 0.0) {
                let (top, bottom) = (b.value + e, b.value - e);
                chart.draw_series([
                    PathElement::new([(x, bottom), (x, top)], bar_edge),
                    PathElement::new([(x - 0.08, top), (x + 0.08, top)], bar_edge),
                    PathElement::new([(x - 0.08, bottom), (x + 0.08, bottom)], bar_edge),
                ])?;
            }
            let (anchor_y, offset, vpos) = if b.value < 0.0 {
                (b.value - err(b), 6, VPos::Top)
            } else {
                (b.value + err(b), -6, VPos::Bottom)
            };
            annotate(&mut chart, (x, anchor_y), fmt_num(b.value), offset, vpos)?;
        }
        chart.draw_series([PathElement::new(
            [(x_range.start, 0.0), (x_range.end, 0.0)],
            BLACK.stroke_width(1),
        )])?;
        Ok(())
    }
}
