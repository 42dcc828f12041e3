//! Plots for benchmark reports: box plots of sample sets, bar charts of one number per
//! configuration, and line charts of sweeps.
//!
//! Every function writes the same figure twice, `<stem>.png` (for Markdown reports and quick
//! looks) and `<stem>.svg` (scalable, text kept as text), 1000×600, and returns both paths.
//! Text uses an embedded font (Open Sans, `assets/`): plotters' `ab_glyph` font backend measures
//! it and `GlyphText` (below) rasterizes it into the PNG, so PNGs carry their labels on machines
//! without any system font or fontconfig (CI).
//! Bad input (nothing to plot, NaN, a negative error bar, x ≤ 0 on a log axis) is an error,
//! never a panic.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ab_glyph::{point, Font, FontRef, ScaleFont};
use plotters::coord::ranged1d::{AsRangedCoord, Ranged, ValueFormatter};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::{register_font, FontStyle, RGBColor};
// Only the backend types: importing its traits would clash with plotters' `Color` methods.
use plotters_backend::{BackendColor, BackendCoord, DrawingErrorKind};

/// Width and height of every figure, in pixels.
const SIZE: (u32, u32) = (1000, 600);
/// The embedded font (Apache-2.0, see `assets/OpenSans-Regular.LICENSE.txt`).
const FONT: &[u8] = include_bytes!("../assets/OpenSans-Regular.ttf");
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

/// One line of a [`line_chart`]: a configuration measured at several x values.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Legend entry.
    pub name: String,
    /// `(x, y)` points; drawn in increasing x order.
    pub points: Vec<(f64, f64)>,
}

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
    let mut lines = Vec::with_capacity(series.len());
    for s in series {
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
        lines.push((s.name.as_str(), points));
    }
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

/// A figure that can draw itself on any plotters backend (PNG and SVG here).
trait Figure {
    /// Draws the whole figure on `root`.
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult<DB>;
}

/// What drawing on a backend returns.
type DrawResult<DB> = Result<(), DrawingAreaErrorKind<<DB as DrawingBackend>::ErrorType>>;

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
    let failed = |path: &Path, e: &dyn std::error::Error| PlotError::Draw {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    {
        let backend = GlyphText {
            inner: BitMapBackend::new(&png, SIZE),
            font,
        };
        let root = backend.into_drawing_area();
        figure
            .draw(&root)
            .and_then(|()| root.present())
            .map_err(|e| failed(&png, &e))?;
    }
    {
        let root = SVGBackend::new(&svg, SIZE).into_drawing_area();
        figure
            .draw(&root)
            .and_then(|()| root.present())
            .map_err(|e| failed(&svg, &e))?;
    }
    Ok(vec![png, svg])
}

/// A raster backend whose text is drawn here with ab_glyph, every glyph at its exact sub-pixel
/// position and side bearing (plotters 0.3.7's own ab_glyph drawing drops the left side bearing
/// and rounds each glyph to whole pixels, so "16" reads "1 6"). Everything else is `inner`'s.
struct GlyphText<B> {
    inner: B,
    font: FontRef<'static>,
}

impl<B: DrawingBackend> DrawingBackend for GlyphText<B> {
    type ErrorType = B::ErrorType;

    fn get_size(&self) -> (u32, u32) {
        self.inner.get_size()
    }

    fn ensure_prepared(&mut self) -> Result<(), DrawingErrorKind<B::ErrorType>> {
        self.inner.ensure_prepared()
    }

    fn present(&mut self) -> Result<(), DrawingErrorKind<B::ErrorType>> {
        self.inner.present()
    }

    fn draw_pixel(
        &mut self,
        point: BackendCoord,
        color: BackendColor,
    ) -> Result<(), DrawingErrorKind<B::ErrorType>> {
        self.inner.draw_pixel(point, color)
    }

    fn draw_line<S: plotters_backend::BackendStyle>(
        &mut self,
        from: BackendCoord,
        to: BackendCoord,
        style: &S,
    ) -> Result<(), DrawingErrorKind<B::ErrorType>> {
        self.inner.draw_line(from, to, style)
    }

    fn draw_rect<S: plotters_backend::BackendStyle>(
        &mut self,
        upper_left: BackendCoord,
        bottom_right: BackendCoord,
        style: &S,
        fill: bool,
    ) -> Result<(), DrawingErrorKind<B::ErrorType>> {
        self.inner.draw_rect(upper_left, bottom_right, style, fill)
    }

    fn draw_path<S: plotters_backend::BackendStyle, I: IntoIterator<Item = BackendCoord>>(
        &mut self,
        path: I,
        style: &S,
    ) -> Result<(), DrawingErrorKind<B::ErrorType>> {
        self.inner.draw_path(path, style)
    }

    fn draw_circle<S: plotters_backend::BackendStyle>(
        &mut self,
        center: BackendCoord,
        radius: u32,
        style: &S,
        fill: bool,
    ) -> Result<(), DrawingErrorKind<B::ErrorType>> {
        self.inner.draw_circle(center, radius, style, fill)
    }

    fn fill_polygon<S: plotters_backend::BackendStyle, I: IntoIterator<Item = BackendCoord>>(
        &mut self,
        vert: I,
        style: &S,
    ) -> Result<(), DrawingErrorKind<B::ErrorType>> {
        self.inner.fill_polygon(vert, style)
    }

    fn blit_bitmap(
        &mut self,
        pos: BackendCoord,
        size: (u32, u32),
        src: &[u8],
    ) -> Result<(), DrawingErrorKind<B::ErrorType>> {
        self.inner.blit_bitmap(pos, size, src)
    }

    /// Lays the text out like plotters (same box, anchor and rotation; baseline half the font
    /// size below the box top, as plotters' ab_glyph backend puts it) and rasterizes each glyph
    /// with its coverage as alpha.
    fn draw_text<S: plotters_backend::BackendTextStyle>(
        &mut self,
        text: &str,
        style: &S,
        pos: BackendCoord,
    ) -> Result<(), DrawingErrorKind<B::ErrorType>> {
        let color = style.color();
        if color.alpha == 0.0 {
            return Ok(());
        }
        let ((min_x, min_y), (max_x, max_y)) = style
            .layout_box(text)
            .map_err(|e| DrawingErrorKind::FontError(Box::new(e)))?;
        let dx = match style.anchor().h_pos {
            HPos::Left => 0,
            HPos::Right => min_x - max_x,
            HPos::Center => (min_x - max_x) / 2,
        };
        let dy = match style.anchor().v_pos {
            VPos::Top => 0,
            VPos::Center => (min_y - max_y) / 2,
            VPos::Bottom => min_y - max_y,
        };
        let size = style.size() as f32;
        let font = self.font.as_scaled(size);
        let mut coverage = Vec::new();
        let mut caret = 0.0f32;
        let mut previous = None;
        for c in text.chars() {
            let id = font.glyph_id(c);
            if let Some(previous) = previous {
                caret += font.kern(previous, id);
            }
            previous = Some(id);
            let glyph = id.with_scale_and_position(size, point(caret, size / 2.0));
            caret += font.h_advance(id);
            if let Some(outline) = font.outline_glyph(glyph) {
                let bounds = outline.px_bounds();
                let (left, top) = (bounds.min.x as i32, bounds.min.y as i32);
                outline.draw(|x, y, c| coverage.push((left + x as i32, top + y as i32, c)));
            }
        }
        let transform = style.transform();
        let (w, h) = self.get_size();
        for (x, y, c) in coverage {
            let (x, y) = transform.transform(x + dx - min_x, y + dy - min_y);
            let (x, y) = (pos.0 + x, pos.1 + y);
            if c > 0.0 && x >= 0 && y >= 0 && x < w as i32 && y < h as i32 {
                let alpha = color.alpha * f64::from(c.min(1.0));
                self.inner
                    .draw_pixel((x, y), BackendColor { alpha, ..color })?;
            }
        }
        Ok(())
    }
}

/// `stem` with `.ext` appended (not replacing a dot already in the name, as in `lat.v2`).
fn with_suffix(stem: &Path, ext: &str) -> PathBuf {
    let mut name = stem.as_os_str().to_owned();
    name.push(".");
    name.push(ext);
    PathBuf::from(name)
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
fn category_range(n: usize) -> std::ops::Range<f64> {
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
        root.fill(&WHITE)?;
        let (lo, hi) = min_max(self.boxes.iter().flat_map(|b| [b.bottom(), b.top()]));
        let (y_lo, y_hi) = padded(lo, hi, 0.05, 0.12);
        let labels: Vec<&str> = self.boxes.iter().map(|b| b.label).collect();
        let mut chart = ChartBuilder::on(root)
            .caption(self.title, font(TITLE))
            .margin(20)
            .x_label_area_size(45)
            .y_label_area_size(80)
            .build_cartesian_2d(category_range(labels.len()), y_lo..y_hi)?;
        let x_fmt = |x: &f64| category_label(&labels, *x);
        let y_fmt = |y: &f64| fmt_num(*y);
        chart
            .configure_mesh()
            .disable_x_mesh()
            .max_light_lines(0)
            .x_labels(labels.len())
            .x_label_formatter(&x_fmt)
            .y_label_formatter(&y_fmt)
            .y_desc(self.y_label)
            .axis_desc_style(font(AXIS_DESC))
            .label_style(font(TICK))
            .draw()?;

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
            chart.draw_series([EmptyElement::at((x, b.top()))
                + Text::new(
                    format!("n={}", b.n),
                    (0, -8),
                    font(ANNOTATION).pos(Pos::new(HPos::Center, VPos::Bottom)),
                )])?;
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
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(font(LEGEND))
            .draw()?;
        Ok(())
    }
}

/// The validated input of [`bar_chart`].
struct BarFigure<'a> {
    title: &'a str,
    y_label: &'a str,
    bars: &'a [Bar],
}

impl Figure for BarFigure<'_> {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult<DB> {
        root.fill(&WHITE)?;
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
        let mut chart = ChartBuilder::on(root)
            .caption(self.title, font(TITLE))
            .margin(20)
            .x_label_area_size(45)
            .y_label_area_size(80)
            .build_cartesian_2d(x_range.clone(), y_lo..y_hi)?;
        let x_fmt = |x: &f64| category_label(&labels, *x);
        let y_fmt = |y: &f64| fmt_num(*y);
        chart
            .configure_mesh()
            .disable_x_mesh()
            .max_light_lines(0)
            .x_labels(labels.len())
            .x_label_formatter(&x_fmt)
            .y_label_formatter(&y_fmt)
            .y_desc(self.y_label)
            .axis_desc_style(font(AXIS_DESC))
            .label_style(font(TICK))
            .draw()?;

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
            chart.draw_series([EmptyElement::at((x, anchor_y))
                + Text::new(
                    fmt_num(b.value),
                    (0, offset),
                    font(ANNOTATION).pos(Pos::new(HPos::Center, vpos)),
                )])?;
        }
        chart.draw_series([PathElement::new(
            [(x_range.start, 0.0), (x_range.end, 0.0)],
            BLACK.stroke_width(1),
        )])?;
        Ok(())
    }
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
struct LinearX<'a>(&'a LineFigure<'a>, std::ops::Range<f64>);

/// A line chart with a logarithmic x axis over the range.
struct LogX<'a>(&'a LineFigure<'a>, std::ops::Range<f64>);

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
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(root)
            .caption(self.title, font(TITLE))
            .margin(20)
            .x_label_area_size(55)
            .y_label_area_size(80)
            .build_cartesian_2d(x_spec, self.y.0..self.y.1)?;
        let x_fmt = |x: &f64| fmt_num(*x);
        let y_fmt = |y: &f64| fmt_num(*y);
        chart
            .configure_mesh()
            .light_line_style(BLACK.mix(0.05))
            .x_label_formatter(&x_fmt)
            .y_label_formatter(&y_fmt)
            .x_desc(self.x_label)
            .y_desc(self.y_label)
            .axis_desc_style(font(AXIS_DESC))
            .label_style(font(TICK))
            .draw()?;
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
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(font(LEGEND))
            .draw()?;
        Ok(())
    }
}
