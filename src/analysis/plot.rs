//! PNG plots (plotters' bitmap backend, DejaVu Sans compiled in, so no
//! system font libraries): the accuracy curve with its region and knee,
//! several labelled curves together, the weight spectra, and the
//! per-layer sensitivity's heat map, accuracy against parameters of
//! uniform and budget students. Rank is drawn
//! on a log axis (ranks span 1..768).

use super::budget::{BudgetReport, SizeCurve};
use super::joint::JointReport;
use super::report::AnalysisReport;
use super::sensitivity::{LayerSensitivity, SensitivityReport};
use super::spectrum::SpectrumReport;
use anyhow::{anyhow, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::{register_font, FontStyle};
use std::path::Path;
use std::sync::Once;

static FONT: Once = Once::new();

fn register() {
    FONT.call_once(|| {
        // The font is compiled in; registration fails only on a corrupt font.
        let _ = register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular());
    });
}

fn err<E: std::fmt::Debug>(path: &Path) -> impl Fn(E) -> anyhow::Error + '_ {
    move |e| anyhow!("drawing {}: {e:?}", path.display())
}

type Drawn = Result<(), Box<dyn std::error::Error>>;

/// Draw a `size` PNG at `path`: white, `draw` on it, written.
fn render(
    path: &Path,
    size: (u32, u32),
    draw: impl FnOnce(&DrawingArea<BitMapBackend, Shift>) -> Drawn,
) -> Result<()> {
    register();
    let root = BitMapBackend::new(path, size).into_drawing_area();
    root.fill(&WHITE).map_err(err(path))?;
    draw(&root).map_err(|e| anyhow!("drawing {}: {e}", path.display()))?;
    root.present().map_err(err(path))?;
    Ok(())
}

/// The legend box every plot draws, at `position`.
fn draw_legend<'a, DB: DrawingBackend + 'a, CT: plotters::coord::CoordTranslate>(
    chart: &mut ChartContext<'a, DB, CT>,
    position: SeriesLabelPosition,
) -> Drawn
where
    DB::ErrorType: 'static,
{
    chart
        .configure_series_labels()
        .position(position)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 15))
        .draw()?;
    Ok(())
}

const BLUE: RGBColor = RGBColor(31, 119, 180);
const ORANGE: RGBColor = RGBColor(255, 127, 14);
const GREEN: RGBColor = RGBColor(44, 160, 44);
const RED: RGBColor = RGBColor(214, 39, 40);

/// plot.png: measured points (every seed, and the mean), the PCHIP curve,
/// the threshold lines, the region shaded, the knee marked, compression in
/// the legend.
pub fn plot_curve(r: &AnalysisReport, path: &Path) -> Result<()> {
    render(path, (1100, 700), |root| draw_curve(r, root))
}

fn draw_curve(r: &AnalysisReport, root: &DrawingArea<BitMapBackend, Shift>) -> Drawn {
    let m = &r.mean;
    let (x0, x1) = (m.points[0].0, m.points[m.points.len() - 1].0);
    let all_acc = r
        .seeds
        .iter()
        .flat_map(|s| s.points.iter())
        .chain(m.points.iter())
        .map(|p| p.1)
        .chain(r.curve.iter().map(|c| c.acc));
    let (lo_y, hi_y) = all_acc.fold((m.reference_acc, m.reference_acc), |(a, b), v| {
        (a.min(v), b.max(v))
    });
    let pad = 0.05 * (hi_y - lo_y).max(1e-6);
    let mut chart = ChartBuilder::on(root)
        .caption(
            format!("Effective rank: accuracy vs rank ({})", r.source),
            ("sans-serif", 22),
        )
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d((x0 * 0.9..x1 * 1.1).log_scale(), (lo_y - pad)..(hi_y + pad))?;
    chart
        .configure_mesh()
        .x_desc("rank r (log axis)")
        .y_desc("top-1 accuracy")
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| format!("{v:.3}"))
        .label_style(("sans-serif", 15))
        .draw()?;
    let comp = |what: &str| {
        r.compression
            .iter()
            .find(|c| c.what == what)
            .map_or(String::new(), |c| {
                format!(", {:.1}x compression", c.compression)
            })
    };
    if let (Some(a), Some(b)) = (m.lo.rank, m.hi.rank) {
        chart
            .draw_series(std::iter::once(Rectangle::new(
                [(a as f64, lo_y - pad), (b as f64, hi_y + pad)],
                GREEN.mix(0.12).filled(),
            )))?
            .label(format!("region [{a}, {b}]"))
            .legend(|(x, y)| {
                Rectangle::new([(x, y - 5), (x + 18, y + 5)], GREEN.mix(0.3).filled())
            });
    }
    for (c, color, what) in [(&m.lo, ORANGE, "r_lo"), (&m.hi, RED, "r_hi")] {
        let label = match c.rank {
            Some(k) => format!(
                "{:.0}% of reference: r = {k}{}",
                100.0 * c.fraction,
                comp(what)
            ),
            None => format!("{:.0}% of reference: not reached", 100.0 * c.fraction),
        };
        chart
            .draw_series(DashedLineSeries::new(
                vec![(x0 * 0.9, c.level), (x1 * 1.1, c.level)],
                8,
                5,
                color.stroke_width(2),
            ))?
            .label(label)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
    }
    chart
        .draw_series(LineSeries::new(
            vec![(x0 * 0.9, m.reference_acc), (x1 * 1.1, m.reference_acc)],
            BLACK.mix(0.5),
        ))?
        .label(format!("reference accuracy {:.4}", m.reference_acc))
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], BLACK.mix(0.5)));
    chart
        .draw_series(LineSeries::new(
            r.curve.iter().map(|c| (c.rank as f64, c.acc)),
            BLUE.stroke_width(2),
        ))?
        .label("PCHIP curve (mean)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], BLUE.stroke_width(2)));
    for s in &r.seeds {
        chart.draw_series(
            s.points
                .iter()
                .map(|&(x, y)| Circle::new((x, y), 3, BLACK.mix(0.35).filled())),
        )?;
    }
    chart
        .draw_series(
            m.points
                .iter()
                .map(|&(x, y)| Circle::new((x, y), 5, BLUE.filled())),
        )?
        .label("measured (mean over seeds)")
        .legend(|(x, y)| Circle::new((x + 9, y), 5, BLUE.filled()));
    if let Some(k) = m.knee {
        let y = r
            .curve
            .iter()
            .find(|c| c.rank == k.rank)
            .map_or(m.reference_acc, |c| c.acc);
        chart
            .draw_series(std::iter::once(TriangleMarker::new(
                (k.rank as f64, y),
                9,
                RED.filled(),
            )))?
            .label(format!("knee r* = {}{}", k.rank, comp("knee")))
            .legend(|(x, y)| TriangleMarker::new((x + 9, y), 7, RED.filled()));
    }
    draw_legend(&mut chart, SeriesLabelPosition::LowerRight)
}

const PALETTE: [RGBColor; 6] = [
    BLUE,
    ORANGE,
    GREEN,
    RED,
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

/// plot.png of a joint analysis: every curve in its own colour (PCHIP
/// line, measured means, r_lo and r_hi as squares, the knee as a
/// triangle; region, knee and compression in the legend), and the
/// reference and threshold lines once when all curves share a reference.
pub fn plot_joint(j: &JointReport, path: &Path) -> Result<()> {
    render(path, (1100, 700), |root| draw_joint(j, root))
}

fn draw_joint(j: &JointReport, root: &DrawingArea<BitMapBackend, Shift>) -> Drawn {
    let reports: Vec<&AnalysisReport> = j.curves.iter().map(|c| &c.report).collect();
    let xs = reports
        .iter()
        .flat_map(|r| r.mean.points.iter().map(|p| p.0));
    let (x0, x1) = xs.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), x| {
        (a.min(x), b.max(x))
    });
    let ys = reports.iter().flat_map(|r| {
        r.curve
            .iter()
            .map(|c| c.acc)
            .chain(r.mean.points.iter().map(|p| p.1))
            .chain([r.mean.reference_acc])
    });
    let (lo_y, hi_y) = ys.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), y| {
        (a.min(y), b.max(y))
    });
    let pad = 0.05 * (hi_y - lo_y).max(1e-6);
    let mut chart = ChartBuilder::on(root)
        .caption(
            format!("Effective rank: {} curves", j.curves.len()),
            ("sans-serif", 22),
        )
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d((x0 * 0.9..x1 * 1.1).log_scale(), (lo_y - pad)..(hi_y + pad))?;
    chart
        .configure_mesh()
        .x_desc("rank r (log axis)")
        .y_desc("top-1 accuracy")
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| format!("{v:.3}"))
        .label_style(("sans-serif", 15))
        .draw()?;
    let reference = reports[0].mean.reference_acc;
    if reports.iter().all(|r| r.mean.reference_acc == reference) {
        let (lo, hi) = (reports[0].options.lo, reports[0].options.hi);
        for (level, style) in [
            (reference, BLACK.mix(0.5)),
            (lo * reference, BLACK.mix(0.3)),
            (hi * reference, BLACK.mix(0.3)),
        ] {
            chart.draw_series(DashedLineSeries::new(
                vec![(x0 * 0.9, level), (x1 * 1.1, level)],
                8,
                5,
                style.stroke_width(1),
            ))?;
        }
    }
    for (c, color) in j.curves.iter().zip(PALETTE.iter().cycle()) {
        let (r, color) = (&c.report, *color);
        let m = &r.mean;
        let knee = m.knee.map_or("-".into(), |k| k.rank.to_string());
        let comp = r
            .compression
            .iter()
            .find(|x| x.what == "knee")
            .map_or(String::new(), |x| format!(", {:.1}x", x.compression));
        let region = |x: Option<usize>| x.map_or("-".into(), |v| v.to_string());
        chart
            .draw_series(LineSeries::new(
                r.curve.iter().map(|s| (s.rank as f64, s.acc)),
                color.stroke_width(2),
            ))?
            .label(format!(
                "{}: region [{}, {}], knee {knee}{comp}",
                c.label,
                region(m.lo.rank),
                region(m.hi.rank)
            ))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
        chart.draw_series(
            m.points
                .iter()
                .map(|&(x, y)| Circle::new((x, y), 4, color.filled())),
        )?;
        let at = |rank: usize| {
            r.curve
                .iter()
                .find(|s| s.rank == rank)
                .map(|s| (rank as f64, s.acc))
        };
        for p in [m.lo.rank, m.hi.rank].into_iter().flatten().filter_map(at) {
            chart.draw_series(std::iter::once(Rectangle::new(
                [
                    (p.0 * 0.98, p.1 - pad * 0.15),
                    (p.0 * 1.02, p.1 + pad * 0.15),
                ],
                color.filled(),
            )))?;
        }
        if let Some(p) = m.knee.and_then(|k| at(k.rank)) {
            chart.draw_series(std::iter::once(TriangleMarker::new(p, 9, color.filled())))?;
        }
    }
    draw_legend(&mut chart, SeriesLabelPosition::LowerRight)
}

/// budget.png: mean top-1 against parameter count (log axis) of the
/// uniform and the budget students (PCHIP line, means, every seed), the
/// teacher and threshold lines, each curve's crossings as vertical lines.
pub fn plot_budget(r: &BudgetReport, path: &Path) -> Result<()> {
    render(path, (1100, 700), |root| draw_budget(r, root))
}

/// PCHIP through a curve's means at 200 parameter counts evenly spaced
/// on the log axis (the points themselves with fewer than two).
fn size_line(c: &SizeCurve) -> Vec<(f64, f64)> {
    let x: Vec<f64> = c.points.iter().map(|p| p.params as f64).collect();
    let y: Vec<f64> = c.points.iter().map(|p| p.mean).collect();
    match super::pchip::Pchip::new(&x, &y) {
        Ok(p) if x.len() >= 2 => {
            let (a, b) = (x[0].ln(), x[x.len() - 1].ln());
            (0..=200)
                .map(|i| {
                    let v = (a + (b - a) * i as f64 / 200.0)
                        .exp()
                        .clamp(x[0], x[x.len() - 1]);
                    (v, p.value(v))
                })
                .collect()
        }
        _ => x.into_iter().zip(y).collect(),
    }
}

fn draw_budget(r: &BudgetReport, root: &DrawingArea<BitMapBackend, Shift>) -> Drawn {
    let curves = [(&r.uniform, BLUE), (&r.allocated, ORANGE)];
    let all = || curves.iter().flat_map(|(c, _)| c.points.iter());
    let (x0, x1) = all().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| {
        (a.min(p.params as f64), b.max(p.params as f64))
    });
    let levels = r.uniform.crossings.iter().map(|c| c.level);
    let (lo_y, hi_y) = all()
        .flat_map(|p| p.seeds.iter().map(|s| s.1))
        .chain(levels)
        .fold((r.teacher_acc, r.teacher_acc), |(a, b), v| {
            (a.min(v), b.max(v))
        });
    let pad = 0.05 * (hi_y - lo_y).max(1e-6);
    let (xa, xb) = (x0 * 0.9, x1 * 1.1);
    let mut chart = ChartBuilder::on(root)
        .caption(
            format!(
                "Accuracy vs parameters: uniform rank and allocated ({})",
                r.source
            ),
            ("sans-serif", 22),
        )
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d((xa..xb).log_scale(), (lo_y - pad)..(hi_y + pad))?;
    chart
        .configure_mesh()
        .x_desc("student parameters (log axis)")
        .y_desc("top-1 accuracy")
        .x_label_formatter(&|_| String::new())
        .y_label_formatter(&|v| format!("{v:.3}"))
        .label_style(("sans-serif", 15))
        .draw()?;
    chart
        .draw_series(LineSeries::new(
            vec![(xa, r.teacher_acc), (xb, r.teacher_acc)],
            BLACK.mix(0.5),
        ))?
        .label(format!(
            "teacher {:.4} ({} parameters)",
            r.teacher_acc, r.teacher_params
        ))
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], BLACK.mix(0.5)));
    // The axis is labelled at the measured sizes only (a log axis inside
    // one decade has no tick labels of its own, and decade ticks would
    // collide with the sizes' labels).
    let mut sizes: Vec<usize> = all().map(|p| p.params).collect();
    sizes.sort_unstable();
    sizes.dedup();
    let below =
        TextStyle::from(("sans-serif", 14).into_font()).pos(Pos::new(HPos::Center, VPos::Top));
    for n in sizes {
        let (px, py) = chart.backend_coord(&(n as f64, lo_y - pad));
        root.draw(&Text::new(n.to_string(), (px, py + 6), below.clone()))?;
    }
    for c in &r.uniform.crossings {
        chart.draw_series(DashedLineSeries::new(
            vec![(xa, c.level), (xb, c.level)],
            8,
            5,
            BLACK.mix(0.3).stroke_width(1),
        ))?;
    }
    for (c, color) in curves {
        // At the smallest size the crossing is an upper bound.
        let smallest = c.points.first().map_or(0.0, |p| p.params as f64);
        let at = |k: usize| match c.crossings[k].params {
            None => "not reached".into(),
            Some(p) if p <= smallest => format!("<= {p:.0}"),
            Some(p) => format!("{p:.0}"),
        };
        chart
            .draw_series(LineSeries::new(size_line(c), color.stroke_width(2)))?
            .label(format!(
                "{}: {:.0}% at {}, {:.0}% at {} parameters",
                c.kind,
                100.0 * c.crossings[0].fraction,
                at(0),
                100.0 * c.crossings[1].fraction,
                at(1)
            ))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
        for p in &c.points {
            chart.draw_series(
                p.seeds
                    .iter()
                    .map(|&(_, a)| Circle::new((p.params as f64, a), 3, color.mix(0.4).filled())),
            )?;
        }
        chart.draw_series(
            c.points
                .iter()
                .map(|p| Circle::new((p.params as f64, p.mean), 5, color.filled())),
        )?;
        for x in c.crossings.iter().filter_map(|k| k.params) {
            chart.draw_series(DashedLineSeries::new(
                vec![(x, lo_y - pad), (x, hi_y + pad)],
                6,
                4,
                color.mix(0.7).stroke_width(1),
            ))?;
        }
    }
    draw_legend(&mut chart, SeriesLabelPosition::LowerRight)
}

/// spectrum.png: normalized singular values (σ_i / σ_1) of every layer.
pub fn plot_spectrum(s: &SpectrumReport, path: &Path) -> Result<()> {
    render(path, (1100, 700), |root| draw_spectrum(s, root))
}

fn draw_spectrum(s: &SpectrumReport, root: &DrawingArea<BitMapBackend, Shift>) -> Drawn {
    let n = s
        .layers
        .iter()
        .map(|l| l.singular_values.len())
        .max()
        .unwrap_or(1)
        .max(2) as f64;
    let floor = 1e-4;
    let mut chart = ChartBuilder::on(root)
        .caption(
            format!("Weight spectra ({})", s.checkpoint),
            ("sans-serif", 22),
        )
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d((1.0..n).log_scale(), (floor..1.5).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("index i (log axis)")
        .y_desc("σ_i / σ_1 (log axis)")
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| format!("{v:.0e}"))
        .label_style(("sans-serif", 15))
        .draw()?;
    for (j, kind) in [
        "attn.q",
        "attn.k",
        "attn.v",
        "attn.proj",
        "mlp.fc1",
        "mlp.fc2",
    ]
    .iter()
    .enumerate()
    {
        let color = PALETTE[j];
        let mut labelled = false;
        for l in s.layers.iter().filter(|l| l.name.ends_with(kind)) {
            let top = l
                .singular_values
                .first()
                .copied()
                .unwrap_or(1.0)
                .max(f64::MIN_POSITIVE);
            let pts = l
                .singular_values
                .iter()
                .enumerate()
                .map(|(i, v)| ((i + 1) as f64, (v / top).max(floor)));
            let series = chart.draw_series(LineSeries::new(pts, color.mix(0.6)))?;
            if !labelled {
                series.label(*kind).legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                });
                labelled = true;
            }
        }
    }
    draw_legend(&mut chart, SeriesLabelPosition::LowerLeft)
}

/// heatmap.png: each layer's own effective rank (the sensitivity pass's
/// r at `hi` and at `lo` of the teacher's top-1), block by projection, the
/// colour the rank's share of the layer's full rank on a log scale.
pub fn plot_sensitivity(s: &SensitivityReport, path: &Path) -> Result<()> {
    render(path, (1100, 150 + 60 * depth_of(s) as u32), |root| {
        let panels = root.split_evenly((1, 2));
        for (panel, (fraction, pick)) in panels.iter().zip([
            (s.hi, (|l| l.rank_hi) as fn(&LayerSensitivity) -> usize),
            (s.lo, |l| l.rank_lo),
        ]) {
            draw_heatmap(s, panel, fraction, pick)?;
        }
        Ok(())
    })
}

fn depth_of(s: &SensitivityReport) -> usize {
    s.layers.iter().map(|l| l.block + 1).max().unwrap_or(1)
}

fn draw_heatmap(
    s: &SensitivityReport,
    root: &DrawingArea<BitMapBackend, Shift>,
    fraction: f64,
    pick: fn(&LayerSensitivity) -> usize,
) -> Drawn {
    let depth = depth_of(s);
    let mut chart = ChartBuilder::on(root)
        .caption(
            format!(
                "own effective rank at {:.0}% of the teacher",
                100.0 * fraction
            ),
            ("sans-serif", 20),
        )
        .margin(15)
        .x_label_area_size(5)
        .y_label_area_size(5)
        .build_cartesian_2d(-1.2..6.0, depth as f64..-0.5)?;
    let names = ["q", "k", "v", "proj", "fc1", "fc2"];
    // Names drawn as text: the projections above the cells, the blocks left.
    chart.draw_series((0..depth).map(|b| {
        Text::new(
            format!("block {b}"),
            (-1.15, b as f64 + 0.4),
            ("sans-serif", 16).into_font(),
        )
    }))?;
    chart.draw_series(names.iter().enumerate().map(|(i, n)| {
        Text::new(
            n.to_string(),
            (i as f64 + 0.4, -0.4),
            ("sans-serif", 17).into_font(),
        )
    }))?;
    for l in &s.layers {
        let Some(x) = names.iter().position(|n| *n == l.layer) else {
            continue;
        };
        let (x, y) = (x as f64, l.block as f64);
        let rank = pick(l);
        let full = l.out.min(l.inp).max(2) as f64;
        let share = ((rank as f64).log2() / full.log2()).clamp(0.0, 1.0);
        let shade = (255.0 * (1.0 - share)) as u8;
        let colour = RGBColor(shade, shade, 255);
        chart.draw_series(std::iter::once(Rectangle::new(
            [(x, y), (x + 1.0, y + 1.0)],
            colour.filled(),
        )))?;
        chart.draw_series(std::iter::once(Rectangle::new(
            [(x, y), (x + 1.0, y + 1.0)],
            BLACK.mix(0.3).stroke_width(1),
        )))?;
        let ink = if share > 0.6 { WHITE } else { BLACK };
        chart.draw_series(std::iter::once(Text::new(
            rank.to_string(),
            (x + 0.4, y + 0.45),
            ("sans-serif", 18).into_font().color(&ink),
        )))?;
    }
    Ok(())
}
