"""``admm-onnx plot REPORT.json -o FILE.(png|svg|html)``: pictures of a pruning run."""
from __future__ import annotations

import click


@click.command("plot")
@click.argument("report_path", metavar="REPORT.json", type=click.Path(dir_okay=False))
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False), metavar="FILE",
              help="Picture to write: .svg or .html (no dependency), .png (needs matplotlib: admm-onnx[plot]).")
def plot(report_path, out):
    """Residuals and rho per layer per iteration, loss and top-1 per epoch and phase, kept
    fraction per layer and weight-magnitude histograms, from a --report file."""
    from admm_onnx.plot import load_report, plot_report

    plot_report(load_report(report_path), out)
    click.echo(f"Wrote {out}")
