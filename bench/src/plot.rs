//! PNG plots with `plotters` (bitmap backend).
//!
//! Text: plotters' default `ttf` feature renders through font-kit, which needs fontconfig and
//! freetype on the build and run machine. We use the pure-Rust `ab_glyph` feature instead and
//! register DejaVu Sans from Debian's `fonts-dejavu-core` at run time. Without that file the
//! plots are still drawn, only without text (axes, lines and markers carry the data; the report's
//! captions say what is what).

use std::path::Path;
use std::sync::OnceLock;

use anyhow::{Result, anyhow};
use plotters::prelude::*;

const FONT_PATHS: &[&str] = &["/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", "/usr/share/fonts/TTF/DejaVuSans.ttf"];

/// Registers a font once; `true` if text can be drawn.
pub fn fonts() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        for p in FONT_PATHS {
            if let Ok(bytes) = std::fs::read(p) {
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                    return true;
                }
            }
        }
        eprintln!("lockstep-bench: no DejaVu Sans font found (apt-get install fonts-dejavu-core): plots are drawn without text");
        false
    })
}

/// One line of a plot.
#[derive(Debug, Clone)]
pub struct Line {
    pub label: String,
    pub color: RGBColor,
    pub points: Vec<(f64, f64)>,
    /// Stroke width in pixels (0: the default, 2).
    pub stroke: u32,
}

impl Line {
    pub fn width(mut self, w: u32) -> Line {
        self.stroke = w;
        self
    }
}

/// A vertical marker (an event on a time axis).
#[derive(Debug, Clone)]
pub struct Marker {
    pub x: f64,
    pub label: String,
    pub color: RGBColor,
}

fn e<E: std::fmt::Debug>(err: E) -> anyhow::Error {
    anyhow!("plotting: {err:?}")
}

fn bounds(lines: &[Line]) -> (f64, f64, f64) {
    let xs = lines.iter().flat_map(|l| l.points.iter().map(|p| p.0));
    let (mut x0, mut x1) = (f64::INFINITY, f64::NEG_INFINITY);
    for x in xs {
        x0 = x0.min(x);
        x1 = x1.max(x);
    }
    let y1 = lines.iter().flat_map(|l| l.points.iter().map(|p| p.1)).fold(0.0f64, f64::max);
    if !x0.is_finite() {
        return (0.0, 1.0, 1.0);
    }
    (x0, if x1 > x0 { x1 } else { x0 + 1.0 }, if y1 > 0.0 { y1 * 1.1 } else { 1.0 })
}

/// Draws one chart of `lines` into `area`.
fn chart<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    lines: &[Line],
    markers: &[Marker],
    y_max: Option<f64>,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let text = fonts();
    let (x0, x1, auto_y) = bounds(lines);
    let y1 = y_max.unwrap_or(auto_y);
    let mut b = ChartBuilder::on(area);
    b.margin(12);
    if text {
        b.caption(title, ("sans-serif", 18)).x_label_area_size(36).y_label_area_size(56);
    } else {
        b.x_label_area_size(4).y_label_area_size(4);
    }
    let mut c = b.build_cartesian_2d(x0..x1, 0.0..y1).map_err(e)?;
    {
        let mut mesh = c.configure_mesh();
        // No fine grid: it costs most of the PNG's size and little reading.
        mesh.light_line_style(WHITE);
        if text {
            mesh.x_desc(x_desc).y_desc(y_desc).label_style(("sans-serif", 13)).axis_desc_style(("sans-serif", 14));
        } else {
            mesh.x_labels(0).y_labels(0);
        }
        mesh.draw().map_err(e)?;
    }
    for (i, m) in markers.iter().enumerate() {
        let style = ShapeStyle::from(&m.color).stroke_width(1);
        c.draw_series(std::iter::once(PathElement::new(vec![(m.x, 0.0), (m.x, y1)], style))).map_err(e)?;
        if text {
            c.draw_series(std::iter::once(Text::new(
                m.label.clone(),
                (m.x, y1 * (0.97 - 0.07 * i as f64)),
                ("sans-serif", 12).into_font().color(&m.color),
            )))
            .map_err(e)?;
        }
    }
    for l in lines {
        let width = if l.stroke == 0 { 2 } else { l.stroke };
        let style = ShapeStyle::from(&l.color).stroke_width(width);
        let s = c.draw_series(LineSeries::new(l.points.iter().copied(), style)).map_err(e)?;
        if text {
            let color = l.color;
            s.label(l.label.clone()).legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], ShapeStyle::from(&color).stroke_width(width))
            });
        }
    }
    if text && lines.iter().any(|l| !l.label.is_empty()) {
        c.configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 13))
            .draw()
            .map_err(e)?;
    }
    Ok(())
}

/// A single time-series plot (e.g. log bandwidth across a failover).
pub fn timeseries(
    path: &Path,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    lines: &[Line],
    markers: &[Marker],
) -> Result<()> {
    let root = BitMapBackend::new(path, (860, 380)).into_drawing_area();
    root.fill(&WHITE).map_err(e)?;
    chart(&root, title, x_desc, y_desc, lines, markers, None)?;
    root.present().map_err(e)?;
    Ok(())
}

/// Side-by-side panels, each a set of lines (e.g. latency CDFs per pipelining level).
pub fn panels(
    path: &Path,
    panels: &[(String, Vec<Line>)],
    x_desc: &str,
    y_desc: &str,
    y_max: Option<f64>,
) -> Result<()> {
    if panels.is_empty() {
        return Ok(());
    }
    let root = BitMapBackend::new(path, (380 * panels.len() as u32, 340)).into_drawing_area();
    root.fill(&WHITE).map_err(e)?;
    let areas = root.split_evenly((1, panels.len()));
    for (area, (title, lines)) in areas.iter().zip(panels) {
        chart(area, title, x_desc, y_desc, lines, &[], y_max)?;
    }
    root.present().map_err(e)?;
    Ok(())
}

pub const BLUE_: RGBColor = RGBColor(31, 119, 180);
pub const ORANGE_: RGBColor = RGBColor(255, 127, 14);
pub const GREEN_: RGBColor = RGBColor(44, 160, 44);
pub const RED_: RGBColor = RGBColor(214, 39, 40);
pub const PURPLE_: RGBColor = RGBColor(148, 103, 189);
pub const GREY_: RGBColor = RGBColor(110, 110, 110);
pub const BROWN_: RGBColor = RGBColor(140, 86, 75);
pub const PINK_: RGBColor = RGBColor(227, 119, 194);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_small_pngs() {
        let dir = tempfile::tempdir().unwrap();
        let lines = vec![
            Line {
                label: "primary".into(),
                color: BLUE_,
                points: (0..50).map(|i| (i as f64 * 0.1, (i % 7) as f64)).collect(),
                stroke: 0,
            },
            Line { label: "backup".into(), color: RED_, points: vec![(2.0, 1.0), (4.9, 3.0)], stroke: 0 }.width(4),
        ];
        let p = dir.path().join("t.png");
        timeseries(
            &p,
            "log bandwidth",
            "s",
            "Mbit/s",
            &lines,
            &[Marker { x: 2.5, label: "kill".into(), color: GREY_ }],
        )
        .unwrap();
        let png = std::fs::read(&p).unwrap();
        assert_eq!(&png[1..4], b"PNG");
        let q = dir.path().join("p.png");
        panels(&q, &[("P=1".into(), lines.clone()), ("P=8".into(), vec![])], "ms", "%", Some(100.0)).unwrap();
        assert!(std::fs::metadata(&q).unwrap().len() > 100);
    }
}
