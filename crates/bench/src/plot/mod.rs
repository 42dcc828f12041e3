//! Plots for benchmark reports: box plots of sample sets, bar charts of one number per
//! configuration, line charts of sweeps, and confusion matrices.
//!
//! Every function writes the same figure twice, `<stem>.png` (for Markdown reports and quick
//! looks) and `<stem>.svg` (scalable, text kept as text), 1000×600, and returns both paths.
//! Text uses an embedded font (Open Sans, `assets/`): plotters' `ab_glyph` font backend measures
//! it and `GlyphText` (`glyph.rs`) rasterizes it into the PNG, so PNGs carry their labels on
//! machines without any system font or fontconfig (CI).
//! Bad input (nothing to plot, NaN, a negative error bar, x ≤ 0 on a log axis) is an error,
//! never a panic.
//!
//! This file holds what every figure shares: the style, the two-file rendering (`render`),
//! the frame of title, axes and grid (`chart`), the legend and the labels inside the plot.
//! Each figure kind has its own file: `boxes.rs`, `bars.rs`, `lines.rs`, `heatmap.rs`.

mod bars;
mod boxes;
mod glyph;
mod heatmap;
mod lines;

use std::fs;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ab_glyph::FontRef;
use plotters::coord::ranged1d::{AsRangedCoord, Ranged, ValueFormatter};
use plotters::coord::types::RangedCoordf64;
use plotters::coord::{CoordTranslate, Shift};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::{register_font, FontStyle, RGBColor};

pub use bars::{bar_chart, Bar};
pub use boxes::box_plot;
pub use heatmap::confusion_matrix;
pub use lines::{labeled_scatter, line_chart, Series};

use glyph::GlyphText;

/// Width and height of every figure, in pixels.
const SIZE: (u32, u32) = (1000, 600);
/// The embedded font (Apache-2.0, see `assets/OpenSans-Regular.LICENSE.txt`).
const FONT: &[u8] = include_bytes!("../../assets/OpenSans-Regular.ttf");
/// The family every text style names; the embedded font is registered under it.
const FAMILY: &str = "sans-serif";
/// Title font size (plotters' size: ab_glyph's pixel scale, about the line height).
const TITLE: f64 = 32.0;
/// Axis descriptions.
const AXIS_DESC: f64 = 22.0;
/// Tick labels.
const TICK: f64 = 19.0;
/// Legend entries.
const LEGEND: f64 = 19.0;
/// Value and `n=` labels inside the plot.
const ANNOTATION: f64 = 19.0;
/// Line colours for series, in order (matplotlib's `tab10`).
const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// Why a plot could not be drawn.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    /// Called with no groups, bars or series.
    #[error("nothing to plot: no {0} given")]
    Empty(&'static str),
    /// A box-plot group or a series has no values.
    #[error("{kind} '{label}' has no values")]
    EmptyGroup {
        /// `"group"` or `"series"`.
        kind: &'static str,
        /// Its label.
        label: String,
    },
    /// A value is NaN or infinite.
    #[error("{kind} '{label}' holds a NaN or infinite value")]
    NonFinite {
        /// `"group"`, `"bar"` or `"series"`.
        kind: &'static str,
        /// Its label.
        label: String,
    },
    /// An error bar must be a finite, non-negative half-length.
    #[error("bar '{label}': error {error} must be finite and not negative")]
    InvalidError {
        /// The bar's label.
        label: String,
        /// The rejected error.
        error: f64,
    },
    /// A logarithmic x axis cannot show zero or negative x.
    #[error("series '{series}': x = {x} cannot go on a logarithmic axis (x must be > 0)")]
    NonPositiveLogX {
        /// The series' name.
        series: String,
        /// The rejected x.
        x: f64,
    },
    /// A confusion matrix that is not square over its labels.
    #[error("a confusion matrix over {labels} classes must have {labels} rows of {labels} counts")]
    NotSquare {
        /// How many class labels were given.
        labels: usize,
    },
    /// The embedded font did not parse (a corrupt build).
    #[error("the embedded font could not be loaded")]
    Font,
    /// The output directory could not be created.
    #[error("{path}: {source}")]
    Io {
        /// The directory.
        path: PathBuf,
        /// What went wrong.
        source: std::io::Error,
    },
    /// plotters failed while drawing or writing a file.
    #[error("{path}: {message}")]
    Draw {
        /// The file being written.
        path: PathBuf,
        /// plotters' message.
        message: String,
    },
}

/// A figure that can draw itself on any plotters backend (PNG and SVG here).
trait Figure {
    /// Draws the whole figure on `root`.
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult<DB>;
}

/// What drawing on a backend returns.
type DrawResult<DB> = Result<(), DrawingAreaErrorKind<<DB as DrawingBackend>::ErrorType>>;

/// A chart whose y axis is linear, as every figure's is; `X` is its x axis.
type Chart<'a, DB, X> = ChartContext<'a, DB, Cartesian2d<X, RangedCoordf64>>;

/// Registers the embedded font with plotters once per process (plotters measures text with it)
/// and returns it for [`GlyphText`]; `Err` if it does not parse.
fn embedded_font() -> Result<FontRef<'static>, PlotError> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let registered =
        *REGISTERED.get_or_init(|| register_font(FAMILY, FontStyle::Normal, FONT).is_ok());
    match FontRef::try_from_slice(FONT) {
        Ok(font) if registered => Ok(font),
        _ => Err(PlotError::Font),
    }
}

/// Writes `figure` to `<stem>.png` and `<stem>.svg`, creating the directory if needed.
fn render(stem: &Path, figure: &impl Figure) -> Result<Vec<PathBuf>, PlotError> {
    let font = embedded_font()?;
    if let Some(dir) = stem.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir).map_err(|source| PlotError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
    }
    let png = with_suffix(stem, "png");
    let svg = with_suffix(stem, "svg");
    let inner = BitMapBackend::new(&png, SIZE);
    draw_file(GlyphText { inner, font }, &png, figure)?;
    draw_file(SVGBackend::new(&svg, SIZE), &svg, figure)?;
    Ok(vec![png, svg])
}

/// Draws `figure` on `backend` and writes it out to `path`.
fn draw_file<DB: DrawingBackend>(
    backend: DB,
    path: &Path,
    figure: &impl Figure,
) -> Result<(), PlotError> {
    let root = backend.into_drawing_area();
    figure
        .draw(&root)
        .and_then(|()| root.present())
        .map_err(|e| PlotError::Draw {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
}

/// `stem` with `.ext` appended (not replacing a dot already in the name, as in `lat.v2`).
fn with_suffix(stem: &Path, ext: &str) -> PathBuf {
    let mut name = stem.as_os_str().to_owned();
    name.push(".");
    name.push(ext);
    PathBuf::from(name)
}

/// The frame of a figure: its title, the y axis' description and what the x axis shows.
struct Frame<'a> {
    title: &'a str,
    y_label: &'a str,
    x_axis: XAxis<'a>,
}

/// What the x axis of a [`Frame`] shows.
enum XAxis<'a> {
    /// One named category per whole x (see [`category_range`]), no vertical grid lines, no
    /// minor grid and no axis description.
    Categories(&'a [&'a str]),
    /// Numbers, with this description under the axis and a faint minor grid.
    Numbers(&'a str),
}

/// Fills `root` white and draws `frame` on it (title, margins, label areas, axes, grid, tick
/// labels and axis descriptions in the figure fonts) with x over `x_spec` and y over `y`;
/// returns the chart for the figure's own series.
fn chart<'a, DB, X>(
    root: &'a DrawingArea<DB, Shift>,
    frame: &Frame,
    x_spec: X,
    y: Range<f64>,
) -> Result<Chart<'a, DB, X::CoordDescType>, DrawingAreaErrorKind<DB::ErrorType>>
where
    DB: DrawingBackend,
    X: AsRangedCoord<Value = f64>,
    X::CoordDescType: Ranged<ValueType = f64> + ValueFormatter<f64>,
{
    root.fill(&WHITE)?;
    let x_label_area = match frame.x_axis {
        XAxis::Categories(_) => 45,
        XAxis::Numbers(_) => 55,
    };
    let mut chart = ChartBuilder::on(root)
        .caption(frame.title, font(TITLE))
        .margin(20)
        .x_label_area_size(x_label_area)
        .y_label_area_size(80)
        .build_cartesian_2d(x_spec, y)?;
    let x_fmt = |x: &f64| match frame.x_axis {
        XAxis::Categories(labels) => category_label(labels, *x),
        XAxis::Numbers(_) => fmt_num(*x),
    };
    let y_fmt = |y: &f64| fmt_num(*y);
    let mut mesh = chart.configure_mesh();
    match frame.x_axis {
        XAxis::Categories(labels) => mesh
            .disable_x_mesh()
            .max_light_lines(0)
            .x_labels(labels.len()),
        XAxis::Numbers(desc) => mesh.light_line_style(BLACK.mix(0.05)).x_desc(desc),
    };
    mesh.x_label_formatter(&x_fmt)
        .y_label_formatter(&y_fmt)
        .y_desc(frame.y_label)
        .axis_desc_style(font(AXIS_DESC))
        .label_style(font(TICK))
        .draw()?;
    Ok(chart)
}

/// Draws the legend of the series labelled so far at `position`.
fn legend<'a, DB: DrawingBackend + 'a, CT: CoordTranslate>(
    chart: &mut ChartContext<'a, DB, CT>,
    position: SeriesLabelPosition,
) -> DrawResult<DB> {
    chart
        .configure_series_labels()
        .position(position)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(font(LEGEND))
        .draw()
}

/// Writes `text` centred on the point `at`, `dy` pixels below it (above when negative), the
/// point at its top (`VPos::Top`) or bottom (`VPos::Bottom`) edge.
fn annotate<DB, X>(
    chart: &mut Chart<DB, X>,
    at: (f64, f64),
    text: String,
    dy: i32,
    edge: VPos,
) -> DrawResult<DB>
where
    DB: DrawingBackend,
    X: Ranged<ValueType = f64>,
{
    let style = font(ANNOTATION).pos(Pos::new(HPos::Center, edge));
    chart.draw_series([EmptyElement::at(at) + Text::new(text, (0, dy), style)])?;
    Ok(())
}

/// Smallest and largest of finite values (`(inf, -inf)` for none; callers pass some).
fn min_max(values: impl Iterator<Item = f64>) -> (f64, f64) {
    values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    })
}

/// `(lo, hi)` widened by the given fractions of its span (of 1, or of |value|, when the span
/// is zero), so that nothing sits on the frame.
fn padded(lo: f64, hi: f64, below: f64, above: f64) -> (f64, f64) {
    let span = if hi > lo {
        hi - lo
    } else if lo != 0.0 {
        lo.abs()
    } else {
        1.0
    };
    (lo - below * span, hi + above * span)
}

/// A number for a label: integers as such, others with 3 significant digits.
fn fmt_num(v: f64) -> String {
    if v == 0.0 {
        return "0".to_string(); // not "-0"
    }
    if v == v.round() && v.abs() < 1e15 {
        return format!("{v:.0}");
    }
    let digits = (2 - v.abs().log10().floor() as i32).clamp(0, 9) as usize;
    let s = format!("{v:.digits$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// Text style of the embedded font at `size` pixels.
fn font(size: f64) -> TextStyle<'static> {
    (FAMILY, size).into_font().color(&BLACK)
}

/// A category axis: x from -0.5 to `n - 0.5`, category `i` centred at `i`.
fn category_range(n: usize) -> Range<f64> {
    -0.5..(n as f64 - 0.5)
}

/// Label of the category at tick `x`; empty between categories.
fn category_label(labels: &[&str], x: f64) -> String {
    let i = x.round();
    if (x - i).abs() > 1e-6 || i < 0.0 {
        return String::new();
    }
    labels
        .get(i as usize)
        .map_or_else(String::new, |s| s.to_string())
}
