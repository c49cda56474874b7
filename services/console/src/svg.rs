//! Charts drawn on the server as inline SVG: time series with confidence
//! bands (linear or log scale, an optional threshold line, markers) and
//! grouped bars. No script, nothing fetched: a page is complete as sent.
//!
//! Every chart is `<svg class="chart" data-points="N">` with one
//! `<circle class="pt">` (or `<rect class="bar">`) per data point, each with a
//! `<title>` tooltip; labels are escaped like every other text.

use std::fmt::Write;

use crate::text::{clock, day_clock, esc};

/// Series colours (Okabe–Ito, readable by colour-blind people).
pub(crate) const PALETTE: [&str; 8] =
    ["#0072b2", "#e69f00", "#009e73", "#cc79a7", "#56b4e9", "#d55e00", "#7f7f7f", "#000000"];

const W: f64 = 900.0;
const H: f64 = 260.0;
const LEFT: f64 = 58.0;
const RIGHT: f64 = 16.0;
const TOP: f64 = 30.0;
const BOTTOM: f64 = 30.0;

/// One data point; `x` is epoch milliseconds.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Point {
    /// Time (epoch ms).
    pub x: f64,
    /// Value.
    pub y: f64,
    /// Lower and upper bound of its interval, drawn as a band.
    pub band: Option<(f64, f64)>,
    /// Tooltip text.
    pub tip: String,
}

/// A named line.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Series {
    /// Legend label.
    pub label: String,
    /// Points in x order.
    pub points: Vec<Point>,
}

/// How the y axis maps values.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Scale {
    /// Linear between the data's (or the given) bounds.
    Linear,
    /// Log10 from `floor` (values below are drawn at it) to 1: p-values.
    Log {
        /// Lowest value shown.
        floor: f64,
    },
}

/// A time-series chart.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Chart {
    /// Accessible name (`aria-label`).
    pub title: String,
    /// Y scale.
    pub scale: Scale,
    /// Fixed y bounds for a linear scale (else the data's, padded).
    pub y_bounds: Option<(f64, f64)>,
    /// Lines.
    pub series: Vec<Series>,
    /// A dashed horizontal line and its label (e.g. α).
    pub threshold: Option<(f64, String)>,
    /// Diamonds on top of the lines: (series index for the colour, point).
    pub markers: Vec<(usize, Point)>,
    /// Consecutive points further apart than this (ms) are not joined: a
    /// version that was not served for a while shows a gap, not a line.
    pub max_gap: Option<f64>,
}

fn f(x: f64) -> String {
    format!("{x:.1}")
}

/// A "nice" step (1, 2 or 5 × 10^k) giving about `n` intervals over `span`.
fn nice_step(span: f64, n: f64) -> f64 {
    let raw = (span / n).max(f64::MIN_POSITIVE);
    let mag = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0].into_iter().map(|m| m * mag).find(|s| *s >= raw).unwrap_or(10.0 * mag)
}

/// Time ticks: a step from a fixed ladder (seconds to days) giving at most
/// six ticks, aligned to multiples of the step.
fn time_ticks(x0: f64, x1: f64) -> (Vec<f64>, bool) {
    const LADDER: [f64; 17] =
        [1e3, 2e3, 5e3, 1e4, 15e3, 3e4, 6e4, 12e4, 3e5, 6e5, 9e5, 18e5, 36e5, 108e5, 216e5, 432e5, 864e5];
    let span = x1 - x0;
    let step = LADDER.into_iter().find(|s| span / s <= 6.0).unwrap_or_else(|| nice_step(span / 864e5, 6.0) * 864e5);
    let mut ticks = Vec::new();
    let mut t = (x0 / step).ceil() * step;
    while t <= x1 && ticks.len() < 12 {
        ticks.push(t);
        t += step;
    }
    (ticks, step < 6e4)
}

fn decimals_for(step: f64) -> usize {
    if step >= 1.0 { 0 } else { (-step.log10().floor()) as usize }
}

/// Draws a time-series chart. Points with a non-finite value are left out.
pub(crate) fn line_chart(c: &Chart) -> String {
    let finite = |p: &&Point| p.x.is_finite() && p.y.is_finite();
    let points: Vec<&Point> = c.series.iter().flat_map(|s| s.points.iter()).filter(finite).collect();
    let n_points = points.len();
    let mut out = String::new();
    let _ = write!(
        out,
        r#"<svg class="chart" data-points="{n_points}" viewBox="0 0 {W} {H}" width="{W}" height="{H}" role="img" aria-label="{}" xmlns="http://www.w3.org/2000/svg">"#,
        esc(&c.title)
    );
    if n_points == 0 {
        let _ = write!(
            out,
            r#"<text x="{}" y="{}" class="empty" text-anchor="middle">no data yet</text></svg>"#,
            W / 2.0,
            H / 2.0
        );
        return out;
    }
    let all_x = points.iter().map(|p| p.x).chain(c.markers.iter().map(|m| m.1.x));
    let (mut x0, mut x1) = all_x.fold((f64::MAX, f64::MIN), |(a, b), x| (a.min(x), b.max(x)));
    if x1 - x0 < 1000.0 {
        (x0, x1) = (x0 - 30_000.0, x1 + 30_000.0);
    }
    let (y0, y1) = match (c.scale, c.y_bounds) {
        (Scale::Log { floor }, _) => {
            // Down to the decade of the smallest value, but not below `floor`.
            let smallest = points.iter().map(|p| p.y).chain(c.threshold.iter().map(|t| t.0)).fold(1.0, f64::min);
            let decade = smallest.max(floor).log10().floor().min(-2.0);
            (decade, 0.0)
        }
        (Scale::Linear, Some(b)) => b,
        (Scale::Linear, None) => {
            let ys = points.iter().flat_map(|p| [Some(p.y), p.band.map(|b| b.0), p.band.map(|b| b.1)]).flatten();
            let ys = ys.chain(c.threshold.iter().map(|t| t.0)).filter(|y| y.is_finite());
            let (lo, hi) = ys.fold((f64::MAX, f64::MIN), |(a, b), y| (a.min(y), b.max(y)));
            let pad = ((hi - lo) * 0.08).max(1e-3);
            (lo - pad, hi + pad)
        }
    };
    let map_y = |y: f64| -> f64 {
        let v = match c.scale {
            Scale::Log { .. } => y.max(10f64.powf(y0)).min(1.0).log10(),
            Scale::Linear => y,
        };
        let v = v.clamp(y0.min(y1), y0.max(y1));
        TOP + (H - TOP - BOTTOM) * (1.0 - (v - y0) / (y1 - y0))
    };
    let map_x = |x: f64| LEFT + (W - LEFT - RIGHT) * (x - x0) / (x1 - x0);

    // Axes and grid.
    let _ = write!(
        out,
        r#"<g class="axis"><line x1="{l}" y1="{b}" x2="{r}" y2="{b}"/><line x1="{l}" y1="{t}" x2="{l}" y2="{b}"/>"#,
        l = f(LEFT),
        r = f(W - RIGHT),
        t = f(TOP),
        b = f(H - BOTTOM)
    );
    let y_ticks: Vec<(f64, String)> = match c.scale {
        Scale::Log { .. } => {
            let mut v = Vec::new();
            let every = if y0 < -6.0 { 2 } else { 1 };
            let mut e = 0i32;
            while f64::from(e) >= y0 - 1e-9 {
                let value = 10f64.powi(e);
                v.push((value, if e >= -3 { format!("{value}") } else { format!("1e{e}") }));
                e -= every;
            }
            v
        }
        Scale::Linear => {
            let step = nice_step(y1 - y0, 5.0);
            let d = decimals_for(step);
            let mut v = Vec::new();
            let mut y = (y0 / step).ceil() * step;
            while y <= y1 + step * 1e-9 && v.len() < 12 {
                v.push((y, format!("{y:.d$}")));
                y += step;
            }
            v
        }
    };
    for (y, label) in &y_ticks {
        let py = f(map_y(*y));
        let _ = write!(
            out,
            r#"<line class="grid" x1="{}" y1="{py}" x2="{}" y2="{py}"/><text x="{}" y="{py}" text-anchor="end" dy="4">{}</text>"#,
            f(LEFT),
            f(W - RIGHT),
            f(LEFT - 6.0),
            esc(label)
        );
    }
    let (x_ticks, seconds) = time_ticks(x0, x1);
    let multi_day = x1 - x0 > 86_400_000.0;
    for x in x_ticks {
        let label = if multi_day { day_clock(x as i64) } else { clock(x as i64, seconds) };
        let _ = write!(
            out,
            r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
            f(map_x(x)),
            f(H - BOTTOM + 16.0),
            esc(&label)
        );
    }
    out.push_str(r#"<text class="unit" x="4" y="14">UTC</text></g>"#);

    // Bands, then lines and points, per series and run of close points.
    for (i, s) in c.series.iter().enumerate() {
        let colour = PALETTE[i % PALETTE.len()];
        let pts: Vec<&Point> = s.points.iter().filter(finite).collect();
        let mut runs: Vec<Vec<&Point>> = Vec::new();
        for p in &pts {
            match runs.last_mut() {
                Some(run) if c.max_gap.is_none_or(|g| p.x - run[run.len() - 1].x <= g) => run.push(p),
                _ => runs.push(vec![p]),
            }
        }
        for run in &runs {
            band(&mut out, run, colour, &map_x, &map_y);
            if run.len() >= 2 {
                let line: Vec<String> = run.iter().map(|p| format!("{},{}", f(map_x(p.x)), f(map_y(p.y)))).collect();
                let _ = write!(
                    out,
                    r#"<polyline class="line" fill="none" stroke="{colour}" stroke-width="1.6" points="{}"/>"#,
                    line.join(" ")
                );
            }
        }
        for p in pts {
            let _ = write!(
                out,
                r#"<circle class="pt" cx="{}" cy="{}" r="2.6" fill="{colour}"><title>{}</title></circle>"#,
                f(map_x(p.x)),
                f(map_y(p.y)),
                esc(&p.tip)
            );
        }
    }
    if let Some((y, label)) = &c.threshold {
        let py = f(map_y(*y));
        let _ = write!(
            out,
            r##"<line class="threshold" x1="{}" y1="{py}" x2="{}" y2="{py}" stroke="#d00" stroke-dasharray="5 4"/><text class="threshold-label" x="{}" y="{py}" dy="-4" text-anchor="end" fill="#d00">{}</text>"##,
            f(LEFT),
            f(W - RIGHT),
            f(W - RIGHT - 4.0),
            esc(label)
        );
    }
    for (i, m) in c.markers.iter().filter(|m| m.1.x.is_finite() && m.1.y.is_finite()) {
        let (x, y) = (map_x(m.x), map_y(m.y));
        let _ = write!(
            out,
            r##"<path class="mark" d="M{} {}l5 5l-5 5l-5 -5z" fill="{}" stroke="#fff"><title>{}</title></path>"##,
            f(x),
            f(y - 5.0),
            PALETTE[i % PALETTE.len()],
            esc(&m.tip)
        );
    }
    legend(&mut out, c.series.iter().map(|s| s.label.as_str()));
    out.push_str("</svg>");
    out
}

/// The interval band of one run of points: a polygon, or a bar for one point.
fn band(out: &mut String, run: &[&Point], colour: &str, map_x: &dyn Fn(f64) -> f64, map_y: &dyn Fn(f64) -> f64) {
    let banded: Vec<(&Point, (f64, f64))> =
        run.iter().filter_map(|p| p.band.filter(|b| b.0.is_finite() && b.1.is_finite()).map(|b| (*p, b))).collect();
    if banded.len() >= 2 {
        let upper = banded.iter().map(|(p, b)| format!("{},{}", f(map_x(p.x)), f(map_y(b.1))));
        let lower = banded.iter().rev().map(|(p, b)| format!("{},{}", f(map_x(p.x)), f(map_y(b.0))));
        let all: Vec<String> = upper.chain(lower).collect();
        let _ =
            write!(out, r#"<polygon class="band" fill="{colour}" fill-opacity="0.15" points="{}"/>"#, all.join(" "));
    } else if let Some((p, b)) = banded.first() {
        let _ = write!(
            out,
            r#"<line class="band" stroke="{colour}" stroke-opacity="0.4" stroke-width="6" x1="{x}" y1="{}" x2="{x}" y2="{}"/>"#,
            f(map_y(b.0)),
            f(map_y(b.1)),
            x = f(map_x(p.x))
        );
    }
}

fn legend<'a>(out: &mut String, labels: impl Iterator<Item = &'a str>) {
    let mut x = LEFT;
    out.push_str(r#"<g class="legend">"#);
    for (i, label) in labels.enumerate() {
        let _ = write!(
            out,
            r#"<rect x="{}" y="8" width="10" height="10" fill="{}"/><text x="{}" y="17">{}</text>"#,
            f(x),
            PALETTE[i % PALETTE.len()],
            f(x + 14.0),
            esc(label)
        );
        x += 24.0 + 7.0 * label.chars().count().min(40) as f64;
    }
    out.push_str("</g>");
}

/// Grouped bars: one group per category (x labels), one bar per series in
/// each. `values[s][c]` is series `s` in category `c`.
pub(crate) fn bar_chart(title: &str, categories: &[String], series: &[(String, Vec<f64>)]) -> String {
    let n_points: usize = series.iter().map(|s| s.1.iter().filter(|v| v.is_finite()).count()).sum();
    let mut out = String::new();
    let _ = write!(
        out,
        r#"<svg class="chart" data-points="{n_points}" viewBox="0 0 {W} {H}" width="{W}" height="{H}" role="img" aria-label="{}" xmlns="http://www.w3.org/2000/svg">"#,
        esc(title)
    );
    if n_points == 0 || categories.is_empty() {
        let _ = write!(
            out,
            r#"<text x="{}" y="{}" class="empty" text-anchor="middle">no data yet</text></svg>"#,
            W / 2.0,
            H / 2.0
        );
        return out;
    }
    let max = series.iter().flat_map(|s| s.1.iter()).copied().filter(|v| v.is_finite()).fold(0.0, f64::max);
    let step = nice_step(max.max(1.0), 4.0);
    let top = (max / step).ceil().max(1.0) * step;
    let map_y = |v: f64| TOP + (H - TOP - BOTTOM) * (1.0 - v / top);
    let plot_w = W - LEFT - RIGHT;
    let group_w = plot_w / categories.len() as f64;
    let bar_w = (group_w * 0.8 / series.len().max(1) as f64).clamp(1.0, 48.0);
    let _ = write!(
        out,
        r#"<g class="axis"><line x1="{l}" y1="{b}" x2="{r}" y2="{b}"/><line x1="{l}" y1="{t}" x2="{l}" y2="{b}"/>"#,
        l = f(LEFT),
        r = f(W - RIGHT),
        t = f(TOP),
        b = f(H - BOTTOM)
    );
    let mut v = 0.0;
    while v <= top + step * 1e-9 {
        let py = f(map_y(v));
        let _ = write!(
            out,
            r#"<line class="grid" x1="{}" y1="{py}" x2="{}" y2="{py}"/><text x="{}" y="{py}" text-anchor="end" dy="4">{v}</text>"#,
            f(LEFT),
            f(W - RIGHT),
            f(LEFT - 6.0)
        );
        v += step;
    }
    let label_every = categories.len().div_ceil(8);
    for (ci, cat) in categories.iter().enumerate() {
        if ci % label_every == 0 {
            let _ = write!(
                out,
                r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
                f(LEFT + group_w * (ci as f64 + 0.5)),
                f(H - BOTTOM + 16.0),
                esc(cat)
            );
        }
    }
    out.push_str("</g>");
    for (si, (label, values)) in series.iter().enumerate() {
        for (ci, value) in values.iter().enumerate().filter(|(_, v)| v.is_finite() && **v > 0.0) {
            let x = LEFT + group_w * (ci as f64 + 0.5) - bar_w * series.len() as f64 / 2.0 + bar_w * si as f64;
            let y = map_y(*value);
            let _ = write!(
                out,
                r#"<rect class="bar" x="{}" y="{}" width="{}" height="{}" fill="{}"><title>{} · {} · {value}</title></rect>"#,
                f(x),
                f(y),
                f(bar_w),
                f(H - BOTTOM - y),
                PALETTE[si % PALETTE.len()],
                esc(label),
                esc(&categories[ci])
            );
        }
    }
    legend(&mut out, series.iter().map(|s| s.0.as_str()));
    out.push_str("</svg>");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(x: f64, y: f64) -> Point {
        Point { x, y, band: Some((y - 0.1, y + 0.1)), tip: format!("{y}") }
    }

    #[test]
    fn a_line_chart_has_one_circle_per_finite_point_bands_and_escaped_labels() {
        let chart = Chart {
            title: "accept <rate>".into(),
            scale: Scale::Linear,
            y_bounds: Some((0.0, 1.0)),
            series: vec![
                Series {
                    label: "<script>alert(1)</script>".into(),
                    points: vec![point(0.0, 0.2), point(60_000.0, 0.3), point(120_000.0, f64::NAN)],
                },
                Series { label: "base".into(), points: vec![point(0.0, 0.1)] },
            ],
            threshold: None,
            markers: Vec::new(),
            max_gap: None,
        };
        let svg = line_chart(&chart);
        assert!(svg.starts_with(r#"<svg class="chart" data-points="3""#), "{svg}");
        assert_eq!(svg.matches(r#"<circle class="pt""#).count(), 3);
        assert_eq!(svg.matches(r#"<polygon class="band""#).count(), 1, "two banded points make a band");
        assert_eq!(svg.matches(r#"<line class="band""#).count(), 1, "one banded point makes a bar");
        assert!(!svg.contains("<script>") && svg.contains("&lt;script&gt;alert(1)&lt;/script&gt;"), "{svg}");
        assert!(svg.contains(r#"aria-label="accept &lt;rate&gt;""#));
        assert!(!svg.contains("NaN") && !svg.contains("inf"), "{svg}");
        // A one-minute span: ticks every 10 s, labelled with seconds.
        assert!(svg.contains(">00:00:10<") && svg.contains(">00:01:00<"), "{svg}");
    }

    #[test]
    fn points_map_inside_the_plot_and_higher_values_are_higher() {
        let chart = Chart {
            title: "t".into(),
            scale: Scale::Linear,
            y_bounds: Some((0.0, 1.0)),
            series: vec![Series { label: "s".into(), points: vec![point(0.0, 0.0), point(1e6, 1.0)] }],
            threshold: None,
            markers: Vec::new(),
            max_gap: None,
        };
        let svg = line_chart(&chart);
        let cy: Vec<f64> = svg
            .split(r#"<circle class="pt" "#)
            .skip(1)
            .map(|s| s.split("cy=\"").nth(1).unwrap().split('"').next().unwrap().parse().unwrap())
            .collect();
        assert_eq!(cy, [H - BOTTOM, TOP]);
    }

    #[test]
    fn a_log_chart_draws_the_threshold_and_clamps_tiny_p_values_to_its_floor() {
        let chart = Chart {
            title: "p".into(),
            scale: Scale::Log { floor: 1e-4 },
            y_bounds: None,
            series: vec![Series { label: "reward".into(), points: vec![point(0.0, 1.0), point(60_000.0, 1e-9)] }],
            threshold: Some((0.05, "α = 0.05".into())),
            markers: vec![(0, point(60_000.0, 0.01))],
            max_gap: None,
        };
        let svg = line_chart(&chart);
        assert!(svg.contains(r#"class="threshold""#) && svg.contains("α = 0.05"));
        assert_eq!(svg.matches(r#"<path class="mark""#).count(), 1);
        assert!(svg.contains(">0.001<") && svg.contains(">1e-4<"), "{svg}");
        assert!(svg.contains(&format!(r#"cy="{}""#, f(H - BOTTOM))), "1e-9 drawn at the floor: {svg}");
    }

    #[test]
    fn points_further_apart_than_the_gap_are_not_joined() {
        let points = [0.0, 60_000.0, 120_000.0, 600_000.0, 660_000.0].map(|x| point(x, 0.5)).to_vec();
        let chart = Chart {
            title: "t".into(),
            scale: Scale::Linear,
            y_bounds: Some((0.0, 1.0)),
            series: vec![Series { label: "s".into(), points }],
            threshold: None,
            markers: Vec::new(),
            max_gap: Some(90_000.0),
        };
        let svg = line_chart(&chart);
        assert_eq!(svg.matches("<polyline").count(), 2, "{svg}");
        assert_eq!(svg.matches(r#"<polygon class="band""#).count(), 2);
        assert_eq!(svg.matches(r#"<circle class="pt""#).count(), 5);
    }

    #[test]
    fn empty_charts_say_so() {
        let chart = Chart {
            title: "t".into(),
            scale: Scale::Linear,
            y_bounds: None,
            series: Vec::new(),
            threshold: None,
            markers: Vec::new(),
            max_gap: None,
        };
        assert!(line_chart(&chart).contains(r#"data-points="0""#));
        assert!(bar_chart("b", &[], &[]).contains("no data yet"));
    }

    #[test]
    fn bars_are_one_rect_per_positive_value() {
        let cats = vec!["09:00".to_string(), "10:00".to_string()];
        let svg = bar_chart("rows", &cats, &[("a<b".into(), vec![10.0, 0.0]), ("c".into(), vec![5.0, 7.0])]);
        assert_eq!(svg.matches(r#"<rect class="bar""#).count(), 3);
        assert!(svg.contains("a&lt;b") && !svg.contains("a<b"));
    }
}
