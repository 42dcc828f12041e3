//! The PNG backend's text: plotters' bitmap backend with every glyph rasterized here by
//! ab_glyph from the embedded font.

use ab_glyph::{point, Font, FontRef, ScaleFont};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, VPos};
// Only the backend types: importing its traits would clash with plotters' `Color` methods.
use plotters_backend::{BackendColor, BackendCoord, DrawingErrorKind};

/// A raster backend whose text is drawn here with ab_glyph, every glyph at its exact sub-pixel
/// position and side bearing (plotters 0.3.7's own ab_glyph drawing drops the left side bearing
/// and rounds each glyph to whole pixels, so "16" reads "1 6"). Everything else is `inner`'s.
pub(super) struct GlyphText<B> {
    pub(super) inner: B,
    pub(super) font: FontRef<'static>,
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
