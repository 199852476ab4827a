//! `--plot FILE.svg`: end-to-end latency and CPU over the run, one point
//! per sampling interval (plotters, SVG backend only: no font or system
//! libraries; text is emitted as SVG `<text>` and laid out by the viewer).

use std::path::Path;

use plotters::prelude::*;

/// One point of the time series.
#[derive(Debug, Clone, Copy, Default)]
pub struct Point {
    pub t_s: f64,
    pub latency_p50_ms: Option<f64>,
    pub latency_p99_ms: Option<f64>,
    pub server_cpu_percent: Option<f64>,
    pub generator_cpu_percent: Option<f64>,
}

fn series(points: &[Point], f: impl Fn(&Point) -> Option<f64>) -> Vec<(f64, f64)> {
    points
        .iter()
        .filter_map(|p| Some((p.t_s, f(p)?)))
        .filter(|(_, v)| v.is_finite())
        .collect()
}

fn top(values: &[&[(f64, f64)]]) -> f64 {
    let m = values
        .iter()
        .flat_map(|s| s.iter().map(|(_, v)| *v))
        .fold(0.0f64, f64::max);
    if m > 0.0 {
        m * 1.15
    } else {
        1.0
    }
}

/// Writes the SVG. `title` goes above the first chart.
pub fn write_svg(path: &Path, title: &str, points: &[Point]) -> Result<(), String> {
    let err = |e: &dyn std::fmt::Display| format!("plot {}: {e}", path.display());
    let root = SVGBackend::new(path, (960, 720)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let (upper, lower) = root.split_vertically(360);
    let t_max = points.iter().map(|p| p.t_s).fold(1.0f64, f64::max).ceil();

    let p50 = series(points, |p| p.latency_p50_ms);
    let p99 = series(points, |p| p.latency_p99_ms);
    let mut chart = ChartBuilder::on(&upper)
        .caption(title, ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(55)
        .build_cartesian_2d(0.0..t_max, 0.0..top(&[&p50, &p99]))
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("seconds since publishing began")
        .y_desc("end-to-end latency, ms")
        .draw()
        .map_err(|e| err(&e))?;
    for (data, color, name) in [(&p50, BLUE, "p50"), (&p99, RED, "p99")] {
        chart
            .draw_series(LineSeries::new(data.iter().copied(), color.stroke_width(2)))
            .map_err(|e| err(&e))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()
        .map_err(|e| err(&e))?;

    let server = series(points, |p| p.server_cpu_percent);
    let generator = series(points, |p| p.generator_cpu_percent);
    let mut chart = ChartBuilder::on(&lower)
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(55)
        .build_cartesian_2d(0.0..t_max, 0.0..top(&[&server, &generator]))
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("seconds since publishing began")
        .y_desc("CPU, % of one core")
        .draw()
        .map_err(|e| err(&e))?;
    for (data, color, name) in [
        (&server, GREEN, "server"),
        (&generator, MAGENTA, "generator"),
    ] {
        chart
            .draw_series(LineSeries::new(data.iter().copied(), color.stroke_width(2)))
            .map_err(|e| err(&e))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_an_svg_with_both_charts() {
        let dir = std::env::temp_dir().join(format!("loadtest-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("tmp dir");
        let path = dir.join("p.svg");
        let points: Vec<Point> = (1..=10)
            .map(|i| Point {
                t_s: f64::from(i),
                latency_p50_ms: Some(1.0 + f64::from(i) / 10.0),
                latency_p99_ms: Some(3.0),
                server_cpu_percent: Some(20.0),
                generator_cpu_percent: (i > 2).then_some(40.0),
            })
            .collect();
        write_svg(&path, "test run", &points).expect("writes");
        let svg = std::fs::read_to_string(&path).expect("reads");
        let _ = std::fs::remove_dir_all(&dir);
        assert!(svg.starts_with("<svg"), "{}", &svg[..40.min(svg.len())]);
        for text in [
            "test run",
            "end-to-end latency, ms",
            "CPU, % of one core",
            "p99",
            "generator",
        ] {
            assert!(svg.contains(text), "{text} missing");
        }
        assert!(svg.matches("<polyline").count() >= 4, "four lines");
    }
}
