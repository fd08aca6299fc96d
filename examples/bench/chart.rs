//! The chart beside the report, drawn with plotters.

use std::fs;
use std::path::Path;

use plotters::prelude::*;

use crate::report::{ratio, Results};
use crate::workloads::{Backend, WORKLOADS};

/// Grouped bars: each backend's throughput as a percentage of the fio limit, per workload.
pub fn chart(path: &Path, results: &Results, have_qsd: bool) -> Result<(), String> {
    let font = [
        "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
        "/usr/share/fonts/TTF/DejaVuSans.ttf",
    ]
    .iter()
    .find_map(|p| fs::read(p).ok())
    .ok_or("no DejaVuSans.ttf font (install fonts-dejavu-core)")?;
    plotters::style::register_font(
        "sans-serif",
        FontStyle::Normal,
        Box::leak(font.into_boxed_slice()),
    )
    .map_err(|_| "cannot load the font")?;
    let backends: Vec<Backend> = if have_qsd {
        vec![Backend::Vubd, Backend::Qsd]
    } else {
        vec![Backend::Vubd]
    };
    let colors = [RGBColor(0x1f, 0x77, 0xb4), RGBColor(0xd6, 0x27, 0x28)];
    let pct = |i: usize, b: Backend| {
        let limit = [Backend::FioUring, Backend::FioSync]
            .iter()
            .filter_map(|f| results.get(&(i, *f)))
            .map(|s| s.iops)
            .fold(0.0, f64::max);
        ratio(results.get(&(i, b)).map(|s| s.iops).unwrap_or(0.0), limit) * 100.0
    };
    let max = (0..WORKLOADS.len())
        .flat_map(|i| backends.iter().map(move |b| (i, *b)))
        .map(|(i, b)| pct(i, b))
        .fold(100.0f64, f64::max);
    let root = BitMapBackend::new(path, (1800, 640)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let n = WORKLOADS.len() as f64;
    let mut c = ChartBuilder::on(&root)
        .caption(
            "Throughput as % of fio on the raw data file (higher is better)",
            ("sans-serif", 24),
        )
        .margin(20)
        .x_label_area_size(70)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..n, 0f64..(max * 1.1))
        .map_err(|e| e.to_string())?;
    c.configure_mesh()
        .disable_x_mesh()
        .x_labels(WORKLOADS.len() * 2 + 1)
        .x_label_formatter(&|x| {
            let i = x.floor() as usize;
            if (x - x.floor() - 0.5).abs() < 0.01 && i < WORKLOADS.len() {
                WORKLOADS[i].label.to_string()
            } else {
                String::new()
            }
        })
        .y_desc("% of fio limit (IOPS)")
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(|e| e.to_string())?;
    let width = 0.8 / backends.len() as f64;
    for (k, b) in backends.iter().enumerate() {
        let color = colors[k];
        c.draw_series((0..WORKLOADS.len()).map(|i| {
            let x0 = i as f64 + 0.1 + k as f64 * width;
            Rectangle::new([(x0, 0.0), (x0 + width * 0.95, pct(i, *b))], color.filled())
        }))
        .map_err(|e| e.to_string())?
        .label(b.name())
        .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], color.filled()));
    }
    // Top left: above the depth-1 bars, which are the lowest.
    c.configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .border_style(BLACK)
        .background_style(WHITE.mix(0.9))
        .label_font(("sans-serif", 16))
        .draw()
        .map_err(|e| e.to_string())?;
    root.present().map_err(|e| e.to_string())?;
    Ok(())
}
