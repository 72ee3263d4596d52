//! A picture of one run, as Jepsen draws them: every request's latency over
//! time (log scale), answered ones green, failed ones grey, the fault windows
//! shaded and labelled, violations marked in red. Plain SVG, no dependencies.

use std::fmt::Write as _;

use crate::check::Report;
use crate::history::{Fault, Phase, Request};

const W: f64 = 900.0;
const H: f64 = 360.0;
const LEFT: f64 = 60.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 30.0;
const BOTTOM: f64 = 40.0;

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The SVG of a run titled `title`.
pub fn svg(title: &str, requests: &[Request], faults: &[Fault], report: &Report) -> String {
    let work: Vec<&Request> = requests.iter().filter(|r| r.phase == Phase::Work).collect();
    let t0 = work.iter().map(|r| r.start_us).min().unwrap_or(0);
    let t1 = work
        .iter()
        .map(|r| r.end_us)
        .chain(faults.iter().map(|f| f.end_us))
        .max()
        .unwrap_or(t0 + 1)
        .max(t0 + 1);
    let span_s = (t1 - t0) as f64 / 1e6;
    let x = |us: u64| LEFT + (us.saturating_sub(t0) as f64 / 1e6) / span_s * (W - LEFT - RIGHT);
    // Latency from 1 ms to 10 s, log scale.
    let (lo, hi) = (0.0f64, 4.0f64);
    let y = |ms: f64| {
        let l = ms.max(1.0).log10().clamp(lo, hi);
        H - BOTTOM - (l - lo) / (hi - lo) * (H - TOP - BOTTOM)
    };
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="11">
<rect width="{W}" height="{H}" fill="white"/>
<text x="{LEFT}" y="18" font-size="13" font-weight="bold">{}</text>
"#,
        escape(title)
    );
    for (i, f) in faults.iter().enumerate() {
        let (a, b) = (x(f.start_us), x(f.end_us.max(f.start_us)));
        let _ = writeln!(
            s,
            r##"<rect x="{a:.1}" y="{TOP}" width="{:.1}" height="{:.1}" fill="#f4b400" fill-opacity="0.22"><title>{}</title></rect>"##,
            (b - a).max(1.5),
            H - TOP - BOTTOM,
            escape(&f.what)
        );
        let ly = TOP + 10.0 + (i % 3) as f64 * 11.0;
        let _ = writeln!(
            s,
            r##"<text x="{:.1}" y="{ly:.1}" font-size="9" fill="#8a6400">{}</text>"##,
            a + 2.0,
            escape(&f.what)
        );
    }
    // Axes and ticks.
    let _ = writeln!(
        s,
        r#"<line x1="{LEFT}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="black"/><line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{:.1}" stroke="black"/>"#,
        H - BOTTOM,
        W - RIGHT,
        H - BOTTOM,
        H - BOTTOM
    );
    for (ms, label) in [
        (1.0, "1 ms"),
        (10.0, "10 ms"),
        (100.0, "100 ms"),
        (1000.0, "1 s"),
        (10000.0, "10 s"),
    ] {
        let _ = writeln!(
            s,
            r##"<line x1="{LEFT}" y1="{0:.1}" x2="{1:.1}" y2="{0:.1}" stroke="#ddd"/><text x="{2:.1}" y="{3:.1}" text-anchor="end">{label}</text>"##,
            y(ms),
            W - RIGHT,
            LEFT - 4.0,
            y(ms) + 4.0
        );
    }
    let step = if span_s > 60.0 {
        10.0
    } else if span_s > 20.0 {
        5.0
    } else {
        1.0
    };
    let mut t = 0.0;
    while t <= span_s {
        let px = LEFT + t / span_s * (W - LEFT - RIGHT);
        let _ = writeln!(
            s,
            r#"<text x="{px:.1}" y="{:.1}" text-anchor="middle">{t:.0} s</text>"#,
            H - BOTTOM + 14.0
        );
        t += step;
    }
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">time since the first request; latency of each request (log)</text>"#,
        (W + LEFT) / 2.0,
        H - 6.0
    );
    for r in &work {
        let ms = r.end_us.saturating_sub(r.start_us) as f64 / 1000.0;
        let color = if r.body.is_some() {
            "#2e7d32"
        } else {
            "#9e9e9e"
        };
        let _ = writeln!(
            s,
            r#"<circle cx="{:.1}" cy="{:.1}" r="1.6" fill="{color}" fill-opacity="0.6"/>"#,
            x(r.end_us),
            y(ms)
        );
    }
    for v in &report.violations {
        if v.at_us < t0 {
            continue;
        }
        let (cx, cy) = (x(v.at_us.min(t1)), TOP + 4.0);
        let _ = writeln!(
            s,
            r##"<g stroke="#d50000" stroke-width="2"><line x1="{:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}"/><line x1="{:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}"/><title>{}: {}</title></g>"##,
            cx - 4.0,
            cy - 4.0,
            cx + 4.0,
            cy + 4.0,
            cx - 4.0,
            cy + 4.0,
            cx + 4.0,
            cy - 4.0,
            escape(&v.kind),
            escape(&v.op)
        );
    }
    let _ = writeln!(
        s,
        r##"<text x="{:.1}" y="18" text-anchor="end"><tspan fill="#2e7d32">● answered</tspan>  <tspan fill="#9e9e9e">● failed</tspan>  <tspan fill="#b08000">▮ fault</tspan>  <tspan fill="#d50000">✕ violation ({})</tspan></text>"##,
        W - RIGHT,
        report.violations.len()
    );
    s.push_str("</svg>\n");
    s
}
