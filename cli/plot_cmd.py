"""``admm-onnx plot REPORT.json -o FILE.(png|svg|html)``: pictures of a pruning run (or of a
sensitivity sweep's ``--json``)."""
from __future__ import annotations

import click


@click.command("plot")
@click.argument("report_path", metavar="REPORT.json", type=click.Path(dir_okay=False))
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False), metavar="FILE",
              help="Picture to write: .svg or .html (no dependency), .png (needs matplotlib: admm-onnx[plot]).")
def plot(report_path, out):
    """Residuals and rho per layer per iteration, loss and top-1 per epoch and phase, kept
    fraction per layer and weight-magnitude histograms, from a --report file (or the curves of a
    'sensitivity --json' file)."""
    from admm_onnx.io import OutputPlan
    from admm_onnx.plot import load_report, plot_format, plot_report

    plan = OutputPlan()
    plan.add_input(report_path, what="the report")
    plan.add_output(out, "-o")
    plot_format(out)
    data = load_report(report_path)
    if "baseline" in data and "levels" in data:  # admm-onnx sensitivity --json
        from admm_onnx.allocation.sensitivity import SensitivityResult, write_plot

        from admm_onnx.errors import DataError

        try:
            result = SensitivityResult.from_dict(data)
        except (TypeError, KeyError, ValueError, AttributeError, IndexError) as exc:
            raise DataError(f"{report_path} is not a sensitivity JSON as written by 'sensitivity --json' "
                            f"({type(exc).__name__}: {exc})") from None
        with _drawable(report_path):
            write_plot(result, out)
    else:
        with _drawable(report_path):
            plot_report(data, out)
    click.echo(f"Wrote {out}")


class _drawable:
    """Values a picture cannot hold (NaN, Inf, text where numbers go, empty series) in a hand-
    edited or damaged JSON: one DataError line."""

    def __init__(self, path):
        self.path = path

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if exc is not None and isinstance(exc, (TypeError, KeyError, ValueError, AttributeError, IndexError,
                                                ZeroDivisionError, OverflowError)):
            from admm_onnx.errors import DataError

            raise DataError(f"{self.path} holds values that cannot be drawn ({type(exc).__name__}: {exc})"[:300]) \
                from None
        return False
