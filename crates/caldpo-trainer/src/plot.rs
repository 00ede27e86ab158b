//! `caldpo plot`: reward curves of one or more runs, the picture the Cal-DPO paper argues
//! with. Four panels (chosen reward, rejected reward, margin, accuracy) against step; each
//! run has its colour, training curves are solid and held-out ones dashed with markers.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use serde_json::Value;

/// The font is compiled in: plotters' default text path needs fontconfig, which many
/// machines lack.
static FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

const PANELS: [(&str, &str); 4] = [
    ("rewards/chosen", "chosen reward"),
    ("rewards/rejected", "rejected reward"),
    ("rewards/margins", "reward margin"),
    ("rewards/accuracies", "reward accuracy"),
];

const COLOURS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
    RGBColor(23, 190, 207),
];

/// The curves of one run.
pub struct RunCurves {
    pub label: String,
    /// Per panel: (step, value) of training lines, then of evaluation lines.
    pub train: Vec<Vec<(f64, f64)>>,
    pub eval: Vec<Vec<(f64, f64)>>,
}

/// Reads RUN_DIR/metrics.jsonl; the label is the directory name.
pub fn read_run(run_dir: &Path) -> Result<RunCurves> {
    let path = run_dir.join("metrics.jsonl");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let label = run_dir.file_name().unwrap_or(run_dir.as_os_str()).to_string_lossy().to_string();
    let mut curves = RunCurves { label, train: vec![Vec::new(); 4], eval: vec![Vec::new(); 4] };
    for (number, line) in text.lines().enumerate() {
        let value: Value = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: not a JSON object", path.display(), number + 1))?;
        let step = value["step"].as_f64().with_context(|| {
            format!("{}:{}: field \"step\" is missing", path.display(), number + 1)
        })?;
        for (panel, (key, _)) in PANELS.iter().enumerate() {
            if let Some(y) = value[*key].as_f64() {
                curves.train[panel].push((step, y));
            }
            if let Some(y) = value[format!("eval_{key}")].as_f64() {
                curves.eval[panel].push((step, y));
            }
        }
    }
    Ok(curves)
}

/// Draws the runs into a PNG or SVG chosen by the extension of `output`.
pub fn plot(run_dirs: &[PathBuf], output: &Path) -> Result<()> {
    if run_dirs.is_empty() {
        bail!("plot needs at least one run directory");
    }
    let runs: Vec<RunCurves> = run_dirs.iter().map(|dir| read_run(dir)).collect::<Result<_>>()?;
    // Registering twice fails harmlessly; the font bytes are valid.
    let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    let size = (1400, 1000);
    match output.extension().and_then(|e| e.to_str()) {
        Some("png") => draw(&BitMapBackend::new(output, size).into_drawing_area(), &runs)?,
        Some("svg") => draw(&SVGBackend::new(output, size).into_drawing_area(), &runs)?,
        _ => bail!("{}: the plot must end in .png or .svg", output.display()),
    }
    Ok(())
}

fn draw<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, runs: &[RunCurves]) -> Result<()>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE).map_err(plot_error)?;
    let titled = root
        .titled("Implicit rewards (solid: train, dashed: held-out)", ("sans-serif", 26))
        .map_err(plot_error)?;
    let panels = titled.split_evenly((2, 2));
    for (index, area) in panels.iter().enumerate() {
        draw_panel(area, runs, index)?;
    }
    root.present().map_err(plot_error)?;
    Ok(())
}

fn draw_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    runs: &[RunCurves],
    panel: usize,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let points = runs.iter().flat_map(|run| run.train[panel].iter().chain(&run.eval[panel]));
    let (mut x_max, mut y_min, mut y_max) = (1.0f64, f64::INFINITY, f64::NEG_INFINITY);
    for (x, y) in points {
        x_max = x_max.max(*x);
        y_min = y_min.min(*y);
        y_max = y_max.max(*y);
    }
    if !y_min.is_finite() {
        (y_min, y_max) = (0.0, 1.0);
    }
    let pad = ((y_max - y_min) * 0.08).max(1e-3);
    let mut chart = ChartBuilder::on(area)
        .caption(PANELS[panel].1, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(64)
        .build_cartesian_2d(0.0..x_max, (y_min - pad)..(y_max + pad))
        .map_err(plot_error)?;
    chart
        .configure_mesh()
        .x_desc("step")
        .label_style(("sans-serif", 15))
        .draw()
        .map_err(plot_error)?;
    for (index, run) in runs.iter().enumerate() {
        let colour = COLOURS[index % COLOURS.len()];
        let train = run.train[panel].clone();
        chart
            .draw_series(LineSeries::new(train, colour.stroke_width(2)))
            .map_err(plot_error)?
            .label(format!("{} train", run.label))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2))
            });
        let eval = run.eval[panel].clone();
        chart
            .draw_series(DashedLineSeries::new(eval.clone(), 8, 5, colour.stroke_width(2)))
            .map_err(plot_error)?
            .label(format!("{} held-out", run.label))
            .legend(move |(x, y)| {
                EmptyElement::at((x + 10, y)) + Circle::new((0, 0), 4, colour.filled())
            });
        chart
            .draw_series(eval.into_iter().map(|point| Circle::new(point, 4, colour.filled())))
            .map_err(plot_error)?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(plot_error)?;
    Ok(())
}

fn plot_error<E: std::error::Error + Send + Sync + 'static>(
    err: DrawingAreaErrorKind<E>,
) -> anyhow::Error {
    anyhow::anyhow!("drawing failed: {err}")
}
