//! Line charts: sweeps, one line per configuration, on a linear or logarithmic x axis.

use std::ops::Range;
use std::path::{Path, PathBuf};

use plotters::coord::ranged1d::{AsRangedCoord, Ranged, ValueFormatter};
use plotters::coord::Shift;
use plotters::prelude::*;

use plotters::style::text_anchor::VPos;

use super::{
    annotate, chart, legend, min_max, padded, render, DrawResult, Figure, Frame, PlotError, XAxis,
    PALETTE,
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
    let axes = Axes { title, x_label, y_label };
    draw_lines(stem, &axes, series, None, log_x)
}

/// Scatter chart of trade-offs (accuracy against speed, say): each series' points as markers
/// in its colour, with no connecting line, and `labels[i][j]` written above point `j` of
/// series `i` (a rank beside its point; a missing label leaves the point bare). Linear axes.
pub fn labeled_scatter(
    stem: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    labels: &[Vec<String>],
) -> Result<Vec<PathBuf>, PlotError> {
    let axes = Axes { title, x_label, y_label };
    draw_lines(stem, &axes, series, Some(labels), false)
}

/// The title and axis descriptions of a chart.
struct Axes<'a> {
    title: &'a str,
    x_label: &'a str,
    y_label: &'a str,
}

/// [`line_chart`], or with `labels` [`labeled_scatter`].
fn draw_lines(
    stem: &Path,
    axes: &Axes,
    series: &[Series],
    labels: Option<&[Vec<String>]>,
    log_x: bool,
) -> Result<Vec<PathBuf>, PlotError> {
    if series.is_empty() {
        return Err(PlotError::Empty("series"));
    }
    let no_labels = Vec::new();
    let lines = series
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let names = labels.map_or(&no_labels, |l| l.get(i).unwrap_or(&no_labels));
            sorted_points(s, names, log_x)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let all = || lines.iter().flat_map(|l| l.points.iter());
    let (x_min, x_max) = min_max(all().map(|p| p.0));
    let (y_min, y_max) = min_max(all().map(|p| p.1));
    // Room above the top points for their labels.
    let y = padded(y_min, y_max, 0.08, if labels.is_some() { 0.16 } else { 0.08 });
    let figure = LineFigure {
        title: axes.title,
        x_label: axes.x_label,
        y_label: axes.y_label,
        lines,
        y,
        connect: labels.is_none(),
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
        // Labels centred on the outer points need more room at the sides.
        let pad = if labels.is_some() { 0.08 } else { 0.03 };
        let (lo, hi) = padded(x_min, x_max, pad, pad);
        render(stem, &LinearX(&figure, lo..hi))
    }
}

/// One series ready to draw: its name, its points sorted by x and their labels (in the
/// same order; empty strings where none).
struct Line<'a> {
    name: &'a str,
    points: Vec<(f64, f64)>,
    labels: Vec<String>,
}

/// The series' name, points sorted by x and their labels, once checked: not empty, all
/// finite, and every x above zero when `log_x`.
fn sorted_points<'a>(s: &'a Series, labels: &[String], log_x: bool) -> Result<Line<'a>, PlotError> {
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
    let mut order: Vec<usize> = (0..s.points.len()).collect();
    order.sort_by(|&a, &b| s.points[a].0.total_cmp(&s.points[b].0));
    Ok(Line {
        name: s.name.as_str(),
        points: order.iter().map(|&i| s.points[i]).collect(),
        labels: order.iter().map(|&i| labels.get(i).cloned().unwrap_or_default()).collect(),
    })
}

/// The validated input of [`line_chart`], less the x axis.
struct LineFigure<'a> {
    title: &'a str,
    x_label: &'a str,
    y_label: &'a str,
    /// The series, points sorted by x.
    lines: Vec<Line<'a>>,
    /// y axis range.
    y: (f64, f64),
    /// Join each series' points with a line (a sweep), or not (a scatter).
    connect: bool,
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
        for (i, l) in self.lines.iter().enumerate() {
            let color = PALETTE[i % PALETTE.len()];
            let line = color.stroke_width(2);
            // A scatter's series are markers only, in the plot and in the legend.
            let (path, key) = match self.connect {
                true => (l.points.clone(), vec![(-12, 0), (12, 0)]),
                false => (Vec::new(), Vec::new()),
            };
            chart
                .draw_series([PathElement::new(path, line)])?
                .label(l.name)
                .legend(move |(x, y)| {
                    EmptyElement::at((x, y))
                        + PathElement::new(key.clone(), line)
                        + Circle::new((0, 0), 4, color.filled())
                });
            chart.draw_series(l.points.iter().map(|&p| Circle::new(p, 4, color.filled())))?;
            for (&p, text) in l.points.iter().zip(&l.labels).filter(|(_, t)| !t.is_empty()) {
                annotate(&mut chart, p, text.clone(), -7, VPos::Bottom)?;
            }
        }
        // A trade-off scatter's slow-and-poor corner is the one likely empty.
        let corner = if self.connect { SeriesLabelPosition::UpperLeft } else { SeriesLabelPosition::LowerLeft };
        legend(&mut chart, corner)
    }
}
