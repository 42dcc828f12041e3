//! Line charts: sweeps, one line per configuration, on a linear or logarithmic x axis.

use std::ops::Range;
use std::path::{Path, PathBuf};

use plotters::coord::ranged1d::{AsRangedCoord, Ranged, ValueFormatter};
use plotters::coord::Shift;
use plotters::prelude::*;

use super::{
    chart, legend, min_max, padded, render, DrawResult, Figure, Frame, PlotError, XAxis, PALETTE,
};

/// One line of a [`line_chart`]: a configuration measured at several x values.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Legend entry.
    pub name: String,
    /// `(x, y)` points; drawn in increasing x order.
    pub points: Vec<(f64, f64)>,
}

/// Line chart of sweeps (throughput against batch size, latency against adapter count, ...):
/// one line with markers per series and a legend. `log_x` puts x on a logarithmic axis, for
/// sweeps like 1, 10, 100, 1000.
pub fn line_chart(
    stem: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    log_x: bool,
) -> Result<Vec<PathBuf>, PlotError> {
    if series.is_empty() {
        return Err(PlotError::Empty("series"));
    }
    let lines = series
        .iter()
        .map(|s| sorted_points(s, log_x))
        .collect::<Result<Vec<_>, _>>()?;
    let all = || lines.iter().flat_map(|(_, p)| p.iter());
    let (x_min, x_max) = min_max(all().map(|p| p.0));
    let (y_min, y_max) = min_max(all().map(|p| p.1));
    let y = padded(y_min, y_max, 0.08, 0.08);
    let figure = LineFigure {
        title,
        x_label,
        y_label,
        lines,
        y,
    };
    if log_x {
        // Whole decades, so that the axis always has labelled ticks (plotters labels only powers
        // of ten on a log axis, and none when the range holds no power of ten).
        let lo = 10f64.powf(x_min.log10().floor());
        let mut hi = 10f64.powf(x_max.log10().ceil());
        if hi <= lo {
            hi = lo * 10.0;
        }
        // A little room beyond the outer decades so that markers there are not cut by the frame.
        render(stem, &LogX(&figure, lo / 1.15..hi * 1.15))
    } else {
        let (lo, hi) = padded(x_min, x_max, 0.03, 0.03);
        render(stem, &LinearX(&figure, lo..hi))
    }
}

/// The series' name and its points sorted by x, once checked: not empty, all finite, and
/// every x above zero when `log_x`.
fn sorted_points(s: &Series, log_x: bool) -> Result<(&str, Vec<(f64, f64)>), PlotError> {
    if s.points.is_empty() {
        return Err(PlotError::EmptyGroup {
            kind: "series",
            label: s.name.clone(),
        });
    }
    if s.points
        .iter()
        .any(|(x, y)| !x.is_finite() || !y.is_finite())
    {
        return Err(PlotError::NonFinite {
            kind: "series",
            label: s.name.clone(),
        });
    }
    if let Some(&(x, _)) = s.points.iter().find(|(x, _)| log_x && *x <= 0.0) {
        return Err(PlotError::NonPositiveLogX {
            series: s.name.clone(),
            x,
        });
    }
    let mut points = s.points.clone();
    points.sort_by(|a, b| a.0.total_cmp(&b.0));
    Ok((s.name.as_str(), points))
}

/// The validated input of [`line_chart`], less the x axis.
struct LineFigure<'a> {
    title: &'a str,
    x_label: &'a str,
    y_label: &'a str,
    /// Series names and points sorted by x.
    lines: Vec<(&'a str, Vec<(f64, f64)>)>,
    /// y axis range.
    y: (f64, f64),
}

/// A line chart with a linear x axis over the range.
struct LinearX<'a>(&'a LineFigure<'a>, Range<f64>);

/// A line chart with a logarithmic x axis over the range.
struct LogX<'a>(&'a LineFigure<'a>, Range<f64>);

impl Figure for LinearX<'_> {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult<DB> {
        self.0.draw_with(root, self.1.clone())
    }
}

impl Figure for LogX<'_> {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult<DB> {
        self.0.draw_with(root, self.1.clone().log_scale())
    }
}

impl LineFigure<'_> {
    /// Draws the chart with x on the axis `x_spec` (linear or logarithmic).
    fn draw_with<DB, X>(&self, root: &DrawingArea<DB, Shift>, x_spec: X) -> DrawResult<DB>
    where
        DB: DrawingBackend,
        X: AsRangedCoord<Value = f64>,
        X::CoordDescType: Ranged<ValueType = f64> + ValueFormatter<f64>,
    {
        let frame = Frame {
            title: self.title,
            y_label: self.y_label,
            x_axis: XAxis::Numbers(self.x_label),
        };
        let mut chart = chart(root, &frame, x_spec, self.y.0..self.y.1)?;
        for (i, (name, points)) in self.lines.iter().enumerate() {
            let color = PALETTE[i % PALETTE.len()];
            let line = color.stroke_width(2);
            chart
                .draw_series([PathElement::new(points.clone(), line)])?
                .label(*name)
                .legend(move |(x, y)| {
                    EmptyElement::at((x, y))
                        + PathElement::new([(-12, 0), (12, 0)], line)
                        + Circle::new((0, 0), 4, color.filled())
                });
            chart.draw_series(points.iter().map(|&p| Circle::new(p, 4, color.filled())))?;
        }
        legend(&mut chart, SeriesLabelPosition::UpperLeft)
    }
}
