//! `loramux_bench::plot`: each function writes a real PNG (right size, not blank, title text
//! rendered with the embedded font) and an SVG carrying the title and labels; bad input is an
//! error.

use std::path::{Path, PathBuf};

use loramux_bench::plot::{bar_chart, box_plot, labeled_scatter, line_chart, Bar, PlotError, Series};

/// Decoded RGB(A) pixels of a PNG, after checking its signature and IHDR size.
struct Image {
    width: usize,
    height: usize,
    channels: usize,
    pixels: Vec<u8>,
}

impl Image {
    fn pixel(&self, x: usize, y: usize) -> &[u8] {
        let at = (y * self.width + x) * self.channels;
        &self.pixels[at..at + 3]
    }

    /// Pixels in the rectangle that are clearly darker than the white background (text, lines).
    fn dark_pixels(&self, xs: std::ops::Range<usize>, ys: std::ops::Range<usize>) -> usize {
        ys.flat_map(|y| xs.clone().map(move |x| (x, y)))
            .filter(|&(x, y)| self.pixel(x, y).iter().all(|&c| c < 128))
            .count()
    }
}

fn read_png(path: &Path) -> Image {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "PNG signature");
    assert_eq!(&bytes[12..16], b"IHDR");
    let ihdr_w = u32::from_be_bytes(bytes[16..20].try_into().unwrap());
    let ihdr_h = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
    assert_eq!((ihdr_w, ihdr_h), (1000, 600), "{}", path.display());

    let decoder = png::Decoder::new(bytes.as_slice());
    let mut reader = decoder.read_info().expect("PNG header");
    let mut pixels = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut pixels).expect("PNG data");
    assert_eq!(info.bit_depth, png::BitDepth::Eight);
    let channels = match info.color_type {
        png::ColorType::Rgb => 3,
        png::ColorType::Rgba => 4,
        other => panic!("unexpected colour type {other:?}"),
    };
    Image {
        width: info.width as usize,
        height: info.height as usize,
        channels,
        pixels,
    }
}

/// Checks both outputs of a plot function and returns the PNG and the SVG text.
fn check_outputs(paths: &[PathBuf], stem: &Path, texts: &[&str]) -> (Image, String) {
    let png_path = PathBuf::from(format!("{}.png", stem.display()));
    let svg_path = PathBuf::from(format!("{}.svg", stem.display()));
    assert_eq!(paths, [png_path.clone(), svg_path.clone()]);

    let image = read_png(&png_path);
    let distinct: std::collections::HashSet<&[u8]> = (0..image.height)
        .flat_map(|y| (0..image.width).map(move |x| (x, y)))
        .map(|(x, y)| image.pixel(x, y))
        .collect();
    assert!(
        distinct.len() > 10,
        "the PNG looks blank: {} colours",
        distinct.len()
    );
    // The title is drawn centred at the top: with the embedded font it leaves dark pixels there.
    let title_ink = image.dark_pixels(250..750, 0..60);
    assert!(
        title_ink > 200,
        "no title text in the PNG ({title_ink} dark pixels)"
    );
    // The rotated y-axis label at the left edge, too.
    let y_label_ink = image.dark_pixels(0..45, 100..500);
    assert!(
        y_label_ink > 50,
        "no y-axis label in the PNG ({y_label_ink} dark pixels)"
    );

    let svg = std::fs::read_to_string(&svg_path).expect("SVG");
    assert!(
        svg.starts_with("<svg") || svg.starts_with("<?xml"),
        "not an SVG"
    );
    assert!(svg.contains(r#"width="1000""#) && svg.contains(r#"height="600""#));
    for text in texts {
        assert!(
            svg.contains(&svg_text(text)),
            "the SVG lacks the text {text:?}"
        );
    }
    (image, svg)
}

/// How plotters' SVG backend writes a text element's content.
fn svg_text(text: &str) -> String {
    format!(">\n{text}\n</text>")
}

fn latencies(center: f64, n: usize) -> Vec<f64> {
    (0..n)
        .map(|i| center + ((i * 37 % 11) as f64 - 5.0) * 0.8 + if i % 17 == 0 { 25.0 } else { 0.0 })
        .collect()
}

#[test]
fn box_plot_writes_png_and_svg() {
    let dir = tempfile::tempdir().unwrap();
    let stem = dir.path().join("nested/latency_box");
    let groups = vec![
        ("base".to_string(), latencies(100.0, 40)),
        ("pirate unmerged".to_string(), latencies(104.0, 35)),
        ("pirate merged".to_string(), latencies(99.0, 5)),
    ];
    let paths = box_plot(&stem, "Per-request latency", "latency (ms)", &groups).expect("box plot");
    check_outputs(
        &paths,
        &stem,
        &[
            "Per-request latency",
            "latency (ms)",
            "base",
            "pirate unmerged",
            "pirate merged",
            "n=40",
            "n=35",
            "n=5",
            "mean",
            "median",
        ],
    );
}

#[test]
fn box_plot_rejects_empty_and_non_finite_input() {
    let dir = tempfile::tempdir().unwrap();
    let stem = dir.path().join("box");
    let err = box_plot(&stem, "t", "y", &[]).unwrap_err();
    assert!(matches!(err, PlotError::Empty(_)), "{err:?}");
    let err = box_plot(
        &stem,
        "t",
        "y",
        &[("a".into(), vec![1.0]), ("b".into(), vec![])],
    )
    .unwrap_err();
    assert!(
        matches!(&err, PlotError::EmptyGroup { label, .. } if label == "b"),
        "{err:?}"
    );
    let err = box_plot(&stem, "t", "y", &[("a".into(), vec![1.0, f64::NAN])]).unwrap_err();
    assert!(
        matches!(&err, PlotError::NonFinite { label, .. } if label == "a"),
        "{err:?}"
    );
    assert!(!dir.path().join("box.png").exists());
    // A single constant sample is fine (a degenerate box).
    box_plot(&stem, "t", "y", &[("a".into(), vec![3.0])]).expect("one sample");
}

#[test]
fn bar_chart_handles_negative_values_and_error_bars() {
    let dir = tempfile::tempdir().unwrap();
    let stem = dir.path().join("overhead");
    let bars = vec![
        Bar {
            label: "rank 8".into(),
            value: 3.25,
            error: Some(0.5),
        },
        Bar {
            label: "rank 16".into(),
            value: -1.5,
            error: Some(0.75),
        },
        Bar {
            label: "rank 64".into(),
            value: 12.0,
            error: None,
        },
    ];
    let paths =
        bar_chart(&stem, "LoRA overhead vs merged", "overhead (%)", &bars).expect("bar chart");
    let (image, _) = check_outputs(
        &paths,
        &stem,
        &[
            "LoRA overhead vs merged",
            "overhead (%)",
            "rank 8",
            "rank 16",
            "rank 64",
            "3.25",
            "-1.5",
            "12",
        ],
    );
    // The negative bar is red somewhere in the plot.
    let red = (0..image.height)
        .flat_map(|y| (0..image.width).map(move |x| (x, y)))
        .filter(|&(x, y)| image.pixel(x, y) == [214, 39, 40])
        .count();
    assert!(red > 500, "no negative (red) bar: {red} pixels");
}

#[test]
fn bar_chart_rejects_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let stem = dir.path().join("bars");
    assert!(matches!(
        bar_chart(&stem, "t", "y", &[]).unwrap_err(),
        PlotError::Empty(_)
    ));
    let bar = |value, error| Bar {
        label: "x".into(),
        value,
        error,
    };
    let err = bar_chart(&stem, "t", "y", &[bar(f64::INFINITY, None)]).unwrap_err();
    assert!(matches!(err, PlotError::NonFinite { .. }), "{err:?}");
    let err = bar_chart(&stem, "t", "y", &[bar(1.0, Some(-0.1))]).unwrap_err();
    assert!(matches!(err, PlotError::InvalidError { .. }), "{err:?}");
    let err = bar_chart(&stem, "t", "y", &[bar(1.0, Some(f64::NAN))]).unwrap_err();
    assert!(matches!(err, PlotError::InvalidError { .. }), "{err:?}");
}

#[test]
fn line_chart_linear_and_log_x() {
    let dir = tempfile::tempdir().unwrap();
    let series = vec![
        Series {
            name: "unmerged".into(),
            points: vec![(1.0, 40.0), (10.0, 310.0), (100.0, 900.0), (1000.0, 1100.0)],
        },
        Series {
            name: "merged".into(),
            points: vec![(1000.0, 1180.0), (1.0, 44.0), (100.0, 960.0), (10.0, 330.0)],
        },
    ];
    for log_x in [false, true] {
        let stem = dir.path().join(format!("sweep_log{log_x}"));
        let paths = line_chart(
            &stem,
            "Throughput by batch size",
            "batch size",
            "tokens/s",
            &series,
            log_x,
        )
        .expect("line chart");
        let (_, svg) = check_outputs(
            &paths,
            &stem,
            &[
                "Throughput by batch size",
                "batch size",
                "tokens/s",
                "unmerged",
                "merged",
            ],
        );
        if log_x {
            for tick in ["1", "10", "100", "1000"] {
                assert!(svg.contains(&svg_text(tick)), "log axis lacks tick {tick}");
            }
        }
    }
    // A log axis over less than a decade still gets labelled ticks.
    let stem = dir.path().join("narrow");
    let narrow = [Series {
        name: "s".into(),
        points: vec![(2.0, 1.0), (3.0, 2.0), (5.0, 1.5)],
    }];
    line_chart(&stem, "Narrow", "x", "y", &narrow, true).expect("narrow log chart");
    let svg = std::fs::read_to_string(dir.path().join("narrow.svg")).unwrap();
    assert!(
        svg.contains(&svg_text("1")) && svg.contains(&svg_text("10")),
        "narrow log axis has no ticks"
    );
}

#[test]
fn labeled_scatter_writes_each_points_label() {
    let dir = tempfile::tempdir().unwrap();
    let stem = dir.path().join("tradeoff");
    // Points out of x order: each label must stay with its point.
    let series = [
        Series { name: "LoRA".into(), points: vec![(380.0, 0.6), (410.0, 0.4), (395.0, 0.55)] },
        Series { name: "base".into(), points: vec![(420.0, 0.0)] },
    ];
    let labels = [vec!["r8".to_string(), "r1".into(), "r4".into()], vec!["base".to_string()]];
    let paths = labeled_scatter(&stem, "Accuracy against speed", "tokens/s", "exact match", &series, &labels).expect("scatter");
    let (_, svg) = check_outputs(&paths, &stem, &["Accuracy against speed", "tokens/s", "exact match", "r8", "r1", "r4", "base"]);
    // Markers only: no series line (a polyline) in the plot.
    let lines = svg.lines().filter(|l| l.contains("<polyline") && l.contains("#1F77B4") && !l.contains("points=\"\""));
    assert_eq!(lines.count(), 0, "a scatter draws no line");
    let nan = [Series { name: "s".into(), points: vec![(f64::NAN, 1.0)] }];
    assert!(matches!(labeled_scatter(&stem, "t", "x", "y", &nan, &[]).unwrap_err(), PlotError::NonFinite { .. }));
}

#[test]
fn line_chart_rejects_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let stem = dir.path().join("lines");
    assert!(matches!(
        line_chart(&stem, "t", "x", "y", &[], false).unwrap_err(),
        PlotError::Empty(_)
    ));
    let empty = [Series {
        name: "e".into(),
        points: vec![],
    }];
    let err = line_chart(&stem, "t", "x", "y", &empty, false).unwrap_err();
    assert!(
        matches!(&err, PlotError::EmptyGroup { label, .. } if label == "e"),
        "{err:?}"
    );
    let nan = [Series {
        name: "n".into(),
        points: vec![(1.0, f64::NAN)],
    }];
    let err = line_chart(&stem, "t", "x", "y", &nan, false).unwrap_err();
    assert!(matches!(err, PlotError::NonFinite { .. }), "{err:?}");
    let zero = [Series {
        name: "z".into(),
        points: vec![(0.0, 1.0), (10.0, 2.0)],
    }];
    let err = line_chart(&stem, "t", "x", "y", &zero, true).unwrap_err();
    assert!(
        matches!(err, PlotError::NonPositiveLogX { x, .. } if x == 0.0),
        "{err:?}"
    );
    // The same data is fine on a linear axis.
    line_chart(&stem, "t", "x", "y", &zero, false).expect("linear axis takes x = 0");
}
