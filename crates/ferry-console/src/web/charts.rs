//! Line charts as inline SVG, rendered on the server (no scripts, no assets): a title, the
//! latest and largest value, the time span, and one polyline scaled to the data.

use super::esc;

/// How a value is printed.
#[derive(Debug, Clone, Copy)]
pub enum Unit {
    /// Seconds.
    Seconds,
    /// Bytes.
    Bytes,
    /// Bytes per second.
    BytesPerSecond,
}

impl Unit {
    /// `v` in this unit, for people.
    pub fn show(self, v: f64) -> String {
        match self {
            Self::Seconds => format!("{v:.0} s"),
            Self::Bytes => super::fmt_bytes(v as u64),
            Self::BytesPerSecond => format!("{}/s", super::fmt_bytes(v as u64)),
        }
    }
}

const W: f64 = 320.0;
const H: f64 = 110.0;
const TOP: f64 = 28.0;
const BOTTOM: f64 = 16.0;

/// A chart of `points` (UNIX s, value), oldest first. Empty data says so.
pub fn line_chart(title: &str, unit: Unit, points: &[(i64, f64)], colour: &str) -> String {
    let mut svg = format!(
        r##"<svg class="chart" xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" role="img" aria-label="{t}"><rect width="{W}" height="{H}" fill="#fff" stroke="#ccd"/><text x="6" y="14" font-size="12" font-weight="bold">{t}</text>"##,
        t = esc(title)
    );
    if points.is_empty() {
        svg.push_str(r##"<text x="6" y="60" font-size="11" fill="#888">no data yet</text></svg>"##);
        return svg;
    }
    let (t0, t1) = (points[0].0, points[points.len() - 1].0);
    let max = points.iter().map(|p| p.1).fold(0.0_f64, f64::max);
    let last = points[points.len() - 1].1;
    svg.push_str(&format!(
        r##"<text x="{x}" y="14" font-size="11" text-anchor="end">now {now} · max {max}</text>"##,
        x = W - 6.0,
        now = esc(&unit.show(last)),
        max = esc(&unit.show(max)),
    ));
    let span = (t1 - t0).max(1) as f64;
    let scale = if max > 0.0 { max } else { 1.0 };
    let plot_h = H - TOP - BOTTOM;
    let coords: Vec<String> = points
        .iter()
        .map(|(t, v)| {
            let x = 6.0 + (W - 12.0) * ((t - t0) as f64 / span);
            let y = TOP + plot_h * (1.0 - v / scale);
            format!("{x:.1},{y:.1}")
        })
        .collect();
    svg.push_str(&format!(
        r##"<polyline fill="none" stroke="{colour}" stroke-width="1.6" points="{}"/>"##,
        coords.join(" ")
    ));
    if points.len() == 1 {
        let c = &coords[0];
        let (x, y) = c.split_once(',').unwrap_or(("0", "0"));
        svg.push_str(&format!(
            r##"<circle cx="{x}" cy="{y}" r="2.5" fill="{colour}"/>"##
        ));
    }
    svg.push_str(&format!(
        r##"<text x="6" y="{y}" font-size="10" fill="#666">{from}</text><text x="{x}" y="{y}" font-size="10" fill="#666" text-anchor="end">{to} UTC</text></svg>"##,
        y = H - 4.0,
        x = W - 6.0,
        from = super::fmt_clock(t0),
        to = super::fmt_clock(t1),
    ));
    svg
}

/// Per-second rates of a counter sampled over time; a drop (the host's statistics were
/// reset) starts again from the new value instead of giving a negative rate.
pub fn rates(samples: &[(i64, i64)]) -> Vec<(i64, f64)> {
    samples
        .windows(2)
        .filter(|w| w[1].0 > w[0].0)
        .map(|w| {
            let d = if w[1].1 >= w[0].1 {
                w[1].1 - w[0].1
            } else {
                w[1].1
            };
            (w[1].0, d as f64 / (w[1].0 - w[0].0) as f64)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charts_scale_and_say_when_empty() {
        let svg = line_chart("Lag", Unit::Seconds, &[], "#c00");
        assert!(svg.contains("no data yet"));
        let svg = line_chart(
            "Lag <x>",
            Unit::Seconds,
            &[(0, 0.0), (10, 5.0), (20, 10.0)],
            "#c00",
        );
        assert!(svg.contains("Lag &lt;x&gt;"));
        assert!(svg.contains("now 10 s · max 10 s"), "{svg}");
        // The largest value touches the top of the plot, zero the bottom.
        assert!(svg.contains("314.0,28.0"), "{svg}");
        assert!(svg.contains("6.0,94.0"), "{svg}");
    }

    #[test]
    fn counter_rates_survive_resets() {
        assert_eq!(
            rates(&[(0, 0), (10, 100), (20, 50)]),
            vec![(10, 10.0), (20, 5.0)]
        );
    }
}
