//! Confusion matrices: counts of (true class, predicted class), each cell shaded by its
//! share of the true class's row and labelled with its count.

use std::path::{Path, PathBuf};

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::{category_label, category_range, font, render, DrawResult, Figure, PlotError, ANNOTATION, AXIS_DESC, TICK, TITLE};

/// A square confusion matrix: `counts[true][predicted]` over `labels` (rows top to bottom,
/// columns left to right, in the same order).
pub fn confusion_matrix(stem: &Path, title: &str, labels: &[String], counts: &[Vec<usize>]) -> Result<Vec<PathBuf>, PlotError> {
    if labels.is_empty() {
        return Err(PlotError::Empty("classes"));
    }
    if counts.len() != labels.len() || counts.iter().any(|r| r.len() != labels.len()) {
        return Err(PlotError::NotSquare { labels: labels.len() });
    }
    render(stem, &ConfusionFigure { title, labels, counts })
}

struct ConfusionFigure<'a> {
    title: &'a str,
    labels: &'a [String],
    counts: &'a [Vec<usize>],
}

impl Figure for ConfusionFigure<'_> {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> DrawResult<DB> {
        root.fill(&WHITE)?;
        let n = self.labels.len();
        let labels: Vec<&str> = self.labels.iter().map(String::as_str).collect();
        // y grows upwards in plotters: row i (true class i) is drawn at y = n - 1 - i.
        let row_labels: Vec<&str> = labels.iter().rev().copied().collect();
        let mut chart = ChartBuilder::on(root)
            .caption(self.title, font(TITLE))
            .margin(20)
            .x_label_area_size(55)
            .y_label_area_size(120)
            .build_cartesian_2d(category_range(n), category_range(n))?;
        let x_fmt = |x: &f64| category_label(&labels, *x);
        let y_fmt = |y: &f64| category_label(&row_labels, *y);
        chart
            .configure_mesh()
            .disable_mesh()
            .x_labels(n)
            .y_labels(n)
            .x_label_formatter(&x_fmt)
            .y_label_formatter(&y_fmt)
            .x_desc("routed to")
            .y_desc("task of the prompt")
            .axis_desc_style(font(AXIS_DESC))
            .label_style(font(TICK))
            .draw()?;
        for (i, row) in self.counts.iter().enumerate() {
            let total = row.iter().sum::<usize>().max(1) as f64;
            for (j, &count) in row.iter().enumerate() {
                let share = count as f64 / total;
                let (x, y) = (j as f64, (n - 1 - i) as f64);
                let shade = RGBColor(255 - (224.0 * share) as u8, 255 - (136.0 * share) as u8, 255 - (75.0 * share) as u8);
                chart.draw_series([Rectangle::new([(x - 0.5, y - 0.5), (x + 0.5, y + 0.5)], shade.filled())])?;
                let color = if share > 0.6 { WHITE } else { BLACK };
                let style = font(ANNOTATION).color(&color).pos(Pos::new(HPos::Center, VPos::Center));
                chart.draw_series([Text::new(count.to_string(), (x, y), style)])?;
            }
        }
        Ok(())
    }
}
