"""Pictures of a run from its report: ``admm-onnx plot REPORT.json -o FILE.(png|svg|html)``.

Charts (each a plain spec, drawn two ways):

- ADMM residuals (primal, per layer per iteration, log scale) and rho per layer per iteration;
- loss and top-1 per epoch, coloured by phase (dense, ADMM, retraining);
- kept fraction per layer (also what ``inspect --plot`` draws);
- weight-magnitude histograms before/after, one per pruned layer.

SVG and HTML are written by this module alone (no dependency; the HTML page embeds the SVG
inline and loads nothing from the network); PNG needs matplotlib (``pip install
"admm-onnx[plot]"``). Every series carries its name (``data-series`` in SVG), so a test or a
reader can check what is drawn.
"""
from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .errors import ConfigError, DataError

FORMATS = ("png", "svg", "html")
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
          "#17becf")
PHASE_COLORS = {"train": "#7f7f7f", "admm": "#1f77b4", "retrain": "#2ca02c"}


def _chart(title, kind, series, xlabel="", ylabel="", logy=False, categories=None, logx=False) -> Dict[str, object]:
    """A chart spec. ``series``: ``{"name", "x", "y"}`` (+ ``"color"``; + ``"lo"``/``"hi"``, a
    shaded band around a line)."""
    return {"title": title, "kind": kind, "series": series, "xlabel": xlabel, "ylabel": ylabel, "logy": logy,
            "categories": categories, "logx": logx}


def _phase(label: str) -> str:
    head = str(label).split(" ")[0].lower()
    return head if head in PHASE_COLORS else "train"


def report_charts(report: Dict[str, object]) -> List[Dict[str, object]]:
    """Chart specs for a report (the dict written by ``--report``)."""
    charts = []
    residuals = report.get("residuals") or []
    names = list(residuals[0]) if residuals else []
    if names:
        its = list(range(1, len(residuals) + 1))
        charts.append(_chart("ADMM primal residual ||W-Z||/||W||", "lines", [
            {"name": n, "x": its, "y": [r.get(n, {}).get("primal") for r in residuals]} for n in names
        ], "ADMM iteration", "primal residual", logy=True))
        charts.append(_chart("ADMM dual residual ||Z-Z_prev||/||W||", "lines", [
            {"name": n, "x": its, "y": [r.get(n, {}).get("dual") for r in residuals]} for n in names
        ], "ADMM iteration", "dual residual", logy=True))
        if any("rho" in r.get(n, {}) for r in residuals for n in names):
            charts.append(_chart("rho per layer", "lines", [
                {"name": n, "x": its, "y": [r.get(n, {}).get("rho") for r in residuals]} for n in names
            ], "ADMM iteration", "rho", logy=True))
    epochs = report.get("epochs") or []
    if epochs:
        # the loss (ADMM's includes the penalty) spans decades: log scale; top-1 in percent
        for key, title, ylabel, scale, logy in (
                ("train_loss", "training loss per epoch (ADMM: with the penalty)", "loss", 1.0, True),
                ("eval_accuracy", "top-1 per epoch (evaluation split)", "top-1 (%)", 100.0, False)):
            series = []
            for phase in PHASE_COLORS:
                pts = [(i + 1, e.get(key)) for i, e in enumerate(epochs) if _phase(e.get("phase", "")) == phase]
                pts = [(x, scale * y) for x, y in pts if y is not None]
                if pts:
                    series.append({"name": phase, "x": [p[0] for p in pts], "y": [p[1] for p in pts],
                                   "color": PHASE_COLORS[phase]})
            if series:
                charts.append(_chart(title, "points", series, "epoch", ylabel, logy=logy and all(
                    y > 0 for s in series for y in s["y"])))
    layers = report.get("layers") or []
    if layers:
        charts.append(kept_chart(layers))
    for name, h in (report.get("histograms") or {}).items():
        edges = h["edges"]
        mids = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:])]
        charts.append(_chart(f"{name}: |w| of nonzero weights (zeros: {h['zeros_before']:,} before, "
                             f"{h['zeros_after']:,} after)", "steps", [
                                 {"name": "before", "x": mids, "y": h["before"]},
                                 {"name": "after", "x": mids, "y": h["after"]},
                             ], "log10 |w|", "count"))
    return charts


def kept_chart(layers: Sequence[Dict[str, object]]) -> Dict[str, object]:
    """Bar chart: percent of weights kept per layer (rows of the report or ``inspect --json``)."""
    names = [str(r["name"]) for r in layers]
    kept = [float(r["kept_percent"]) for r in layers]
    return _chart("kept fraction per layer (% nonzero)", "bars", [{"name": "kept_percent", "x": list(range(len(names))),
                                                                   "y": kept}],
                  "", "% kept", categories=names)


# ------------------------------------------------------------------------------------------ SVG

W, H, ML, MR, MT, MB = 640, 300, 70, 150, 30, 60


def _ticks(lo: float, hi: float, n: int = 5) -> List[float]:
    if hi <= lo:
        return [lo]
    step = 10 ** math.floor(math.log10((hi - lo) / n))
    for m in (1, 2, 5, 10):
        if (hi - lo) / (step * m) <= n:
            step *= m
            break
    start = math.ceil(lo / step) * step
    return [start + i * step for i in range(int((hi - start) / step) + 1)]


def _log_ticks(lo: float, hi: float, n: int = 6) -> List[float]:
    """Ticks (as log10 values) at 1, 2 and 5 times powers of ten between ``lo`` and ``hi`` (log10);
    decades only when those are too many, every k-th decade when even those are."""
    eps = 1e-9
    cand = {m: [math.log10(m) + d for d in range(math.floor(lo) - 1, math.ceil(hi) + 1)
                if lo - eps <= math.log10(m) + d <= hi + eps] for m in (1, 2, 5)}
    every = sorted(cand[1] + cand[2] + cand[5])
    if 2 <= len(every) <= n:
        return every
    if len(every) < 2:  # less than a factor 2.5: plain ticks in value space
        return [math.log10(v) for v in _ticks(10 ** lo, 10 ** hi, n - 2) if v > 0] or [lo]
    decades = cand[1]
    if len(decades) < 2:
        return every[:: math.ceil(len(every) / n)]
    k = max(1, math.ceil(len(decades) / n))
    return decades[::k]


def _fmt(v: float) -> str:
    return f"{v:.3g}"


ROW = 18  # height of one bar in a bar chart (one row per layer)


def _is_hbars(chart: Dict[str, object]) -> bool:
    """Bar charts over named layers are drawn as horizontal bars, one row per layer: names of
    any length stay readable however many layers the model has."""
    return chart["kind"] == "bars" and bool(chart["categories"])


def chart_height(chart: Dict[str, object]) -> int:
    return MT + MB + ROW * len(chart["categories"]) if _is_hbars(chart) else H


def _hbars_svg(chart: Dict[str, object], y0: int) -> str:
    names = [str(n) for n in chart["categories"]]
    s = chart["series"][0]
    values = [0.0 if v is None else float(v) for v in s["y"]]
    left = min(300, 12 + 6 * max(len(n) for n in names))
    pw = W - left - 70
    hi = max(values + [1e-12])
    ticks = _ticks(0.0, hi)
    hi = max(hi, ticks[-1])

    def px(v):
        return left + v / hi * pw

    color = s.get("color", COLORS[0])
    height = chart_height(chart)
    out = [f'<g transform="translate(0,{y0})" data-chart="{html.escape(chart["title"])}">',
           f'<text x="{W / 2}" y="18" text-anchor="middle" font-size="14">{html.escape(chart["title"])}</text>']
    bottom = MT + ROW * len(names)
    for t in ticks:
        out.append(f'<line x1="{px(t):.1f}" x2="{px(t):.1f}" y1="{MT}" y2="{bottom}" stroke="#eee"/>'
                   f'<text x="{px(t):.1f}" y="{bottom + 14}" text-anchor="middle" font-size="10">{_fmt(t)}</text>')
    out.append(f'<text x="{left + pw / 2}" y="{height - 25}" text-anchor="middle" font-size="11">'
               f'{html.escape(chart["ylabel"])}</text>')
    out.append(f'<g data-series="{html.escape(s["name"])}" fill="{color}">')
    for i, (name, v) in enumerate(zip(names, values)):
        y = MT + ROW * i
        out.append(f'<text x="{left - 6}" y="{y + ROW * 0.7:.1f}" text-anchor="end" font-size="11" fill="black">'
                   f'{html.escape(name)}</text>'
                   f'<rect x="{left}" y="{y + 3}" width="{max(0.0, px(v) - left):.1f}" height="{ROW - 6}"/>'
                   f'<text x="{px(v) + 4:.1f}" y="{y + ROW * 0.7:.1f}" font-size="10" fill="black">{_fmt(v)}</text>')
    out.append("</g>")
    out.append(f'<line x1="{left}" x2="{left}" y1="{MT}" y2="{bottom}" stroke="#999"/></g>')
    return "\n".join(out)


def chart_svg(chart: Dict[str, object], y0: int = 0) -> str:
    """One chart as an SVG ``<g>`` placed at vertical offset ``y0``."""
    if _is_hbars(chart):
        return _hbars_svg(chart, y0)
    series = chart["series"]
    logy = chart["logy"]
    logx = chart.get("logx", False)

    def ty(v):
        return math.log10(v) if logy else v

    def tx(v):
        return math.log10(v) if logx else v

    xs = [tx(x) for s in series for x in s["x"] if not logx or x > 0]
    ys = [ty(y) for s in series for key in ("y", "lo", "hi") for y in s.get(key) or () if y is not None and (not logy or y > 0)]
    out = [f'<g transform="translate(0,{y0})" data-chart="{html.escape(chart["title"])}">',
           f'<text x="{W / 2}" y="18" text-anchor="middle" font-size="14">{html.escape(chart["title"])}</text>']
    if not xs or not ys:
        out.append(f'<text x="{W / 2}" y="{H / 2}" text-anchor="middle">no data</text></g>')
        return "\n".join(out)
    x_lo, x_hi = min(xs), max(xs)
    y_lo, y_hi = min(ys), max(ys)
    if chart["kind"] in ("bars", "steps") and not logy:
        y_lo = min(0.0, y_lo)
    if y_hi - y_lo < 1e-12:
        y_lo, y_hi = y_lo - 0.5, y_hi + 0.5
    if x_hi - x_lo < 1e-12:
        x_lo, x_hi = x_lo - 0.5, x_hi + 0.5
    if chart["kind"] == "bars":
        x_lo, x_hi = x_lo - 0.5, x_hi + 0.5
    pw, ph = W - ML - MR, H - MT - MB

    def px(x):
        return ML + (x - x_lo) / (x_hi - x_lo) * pw

    def py(y):
        return MT + ph - (y - y_lo) / (y_hi - y_lo) * ph

    out.append(f'<rect x="{ML}" y="{MT}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>')
    for t in (_log_ticks(y_lo, y_hi) if logy else _ticks(y_lo, y_hi)):
        label = _fmt(10 ** t) if logy else _fmt(t)
        out.append(f'<line x1="{ML}" x2="{ML + pw}" y1="{py(t):.1f}" y2="{py(t):.1f}" stroke="#eee"/>'
                   f'<text x="{ML - 5}" y="{py(t) + 4:.1f}" text-anchor="end" font-size="10">{label}</text>')
    if chart["categories"]:
        for i, name in enumerate(chart["categories"]):
            out.append(f'<text x="{px(i):.1f}" y="{MT + ph + 14}" text-anchor="middle" font-size="10">'
                       f'{html.escape(name)}</text>')
    else:
        for t in (_log_ticks(x_lo, x_hi) if logx else _ticks(x_lo, x_hi)):
            label = _fmt(10 ** t) if logx else _fmt(t)
            out.append(f'<text x="{px(t):.1f}" y="{MT + ph + 14}" text-anchor="middle" font-size="10">{label}</text>')
    out.append(f'<text x="{ML + pw / 2}" y="{H - 25}" text-anchor="middle" font-size="11">'
               f'{html.escape(chart["xlabel"])}</text>')
    out.append(f'<text x="14" y="{MT + ph / 2}" text-anchor="middle" font-size="11" '
               f'transform="rotate(-90 14 {MT + ph / 2})">{html.escape(chart["ylabel"])}</text>')
    for k, s in enumerate(series):
        color = s.get("color", COLORS[k % len(COLORS)])
        def ok(x, y):
            return y is not None and (not logy or y > 0) and (not logx or x > 0)

        pts = [(px(tx(x)), py(ty(y))) for x, y in zip(s["x"], s["y"]) if ok(x, y)]
        name = html.escape(s["name"])
        out.append(f'<g data-series="{name}" fill="{color}" stroke="{color}">')
        if s.get("lo") and s.get("hi"):
            band = [(x, lo, hi) for x, lo, hi in zip(s["x"], s["lo"], s["hi"]) if ok(x, lo) and ok(x, hi)]
            edge = [(px(tx(x)), py(ty(hi))) for x, _, hi in band] + [(px(tx(x)), py(ty(lo))) for x, lo, _ in band[::-1]]
            out.append(f'<polygon points="{" ".join(f"{x:.1f},{y:.1f}" for x, y in edge)}" fill-opacity="0.15" '
                       f'stroke="none"/>')
        if chart["kind"] == "bars":
            bw = pw / max(1, len(s["x"])) * 0.7
            for x, y in pts:
                out.append(f'<rect x="{x - bw / 2:.1f}" y="{min(y, py(0)):.1f}" width="{bw:.1f}" '
                           f'height="{abs(py(0) - y):.1f}" stroke="none"/>')
        elif chart["kind"] == "points":
            out += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5"/>' for x, y in pts]
        else:
            if chart["kind"] == "steps":
                pts = [p for x, y in pts for p in ((x, y),)]
            path = " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)
            out.append(f'<polyline points="{path}" fill="none" stroke-width="1.5"/>')
        out.append("</g>")
        if not chart["categories"]:
            ly = MT + 12 + 16 * k
            out.append(f'<rect x="{ML + pw + 10}" y="{ly - 8}" width="10" height="10" fill="{color}"/>'
                       f'<text x="{ML + pw + 25}" y="{ly + 1}" font-size="11">{name}</text>')
    out.append("</g>")
    return "\n".join(out)


def charts_svg(charts: Sequence[Dict[str, object]]) -> str:
    parts, y = [], 0
    for c in charts:
        parts.append(chart_svg(c, y))
        y += chart_height(c)
    body = "\n".join(parts)
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{max(y, H)}" '
            f'font-family="sans-serif">\n<rect width="100%" height="100%" fill="white"/>\n{body}\n</svg>\n')


def charts_html(charts: Sequence[Dict[str, object]], title: str, summary: str = "") -> str:
    figures = "\n".join(f'<figure>{charts_svg([c])}</figure>' for c in charts)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif;max-width:700px;margin:1em auto}figure{margin:0 0 1em 0}"
        "pre{background:#f6f6f6;padding:.5em;overflow-x:auto}</style></head><body>\n"
        f"<h1>{html.escape(title)}</h1>\n<pre>{html.escape(summary)}</pre>\n{figures}\n</body></html>\n"
    )


# ------------------------------------------------------------------------------------------ PNG


def charts_png(charts: Sequence[Dict[str, object]], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("PNG needs matplotlib", hint='pip install "admm-onnx[plot]", or write .svg or .html') from None
    heights = [3.2 * chart_height(c) / H for c in charts]
    fig, axes = plt.subplots(len(charts), 1, figsize=(8, sum(heights)), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    for ax, chart in zip(axes[:, 0], charts):
        if _is_hbars(chart):
            s = chart["series"][0]
            ax.barh(range(len(chart["categories"])), [0.0 if v is None else v for v in s["y"]],
                    color=s.get("color", COLORS[0]))
            ax.set_yticks(range(len(chart["categories"])))
            ax.set_yticklabels(chart["categories"], fontsize=8)
            ax.invert_yaxis()
            ax.set_title(chart["title"], fontsize=10)
            ax.set_xlabel(chart["ylabel"])
            ax.grid(alpha=0.3, axis="x")
            continue
        for k, s in enumerate(chart["series"]):
            color = s.get("color", COLORS[k % len(COLORS)])
            pts = [(x, y) for x, y in zip(s["x"], s["y"]) if y is not None]
            x, y = [p[0] for p in pts], [p[1] for p in pts]
            if chart["kind"] == "bars":
                ax.bar(x, y, color=color, label=s["name"])
            elif chart["kind"] == "points":
                ax.plot(x, y, "o", ms=3, color=color, label=s["name"])
            elif chart["kind"] == "steps":
                ax.step(x, y, where="mid", color=color, label=s["name"])
            else:
                ax.plot(x, y, "-o", ms=3, color=color, label=s["name"])
            if s.get("lo") and s.get("hi"):
                ax.fill_between(s["x"], s["lo"], s["hi"], color=color, alpha=0.15, lw=0)
        if chart["categories"]:
            ax.set_xticks(range(len(chart["categories"])))
            ax.set_xticklabels(chart["categories"], rotation=20, fontsize=8)
        elif len(chart["series"]) > 0:
            ax.legend(fontsize=8, loc="best")
        if chart["logy"]:
            ax.set_yscale("log")
        if chart.get("logx"):
            from matplotlib.ticker import FuncFormatter

            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_title(chart["title"], fontsize=10)
        ax.set_xlabel(chart["xlabel"])
        ax.set_ylabel(chart["ylabel"])
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90, format="png")
    plt.close(fig)


# --------------------------------------------------------------------------------------- files


def plot_format(path) -> str:
    """The picture format of ``path`` from its suffix; a ConfigError (before any work is done)
    for an unknown suffix or a PNG without matplotlib."""
    import importlib.util

    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix not in FORMATS:
        raise ConfigError(f"cannot tell the picture format of {path}", hint="end the name in .png, .svg or .html")
    if suffix == "png" and importlib.util.find_spec("matplotlib") is None:
        raise ConfigError("PNG needs matplotlib", hint='pip install "admm-onnx[plot]", or write .svg or .html')
    return suffix


def write_charts(charts: Sequence[Dict[str, object]], path, title: str = "admm-onnx", summary: str = "") -> Path:
    """Write ``charts`` to ``path`` (format from its suffix), atomically."""
    from .io import atomic_path, check_output_path

    fmt = plot_format(path)
    out = check_output_path(path)
    with atomic_path(out) as tmp:
        if fmt == "png":
            charts_png(charts, tmp)
        elif fmt == "svg":
            tmp.write_text(charts_svg(charts), encoding="utf-8")
        else:
            tmp.write_text(charts_html(charts, title, summary), encoding="utf-8")
    return out


def load_report(path) -> Dict[str, object]:
    from .io import check_input_file

    path = check_input_file(path, "report", error=DataError)  # a regular file: never blocks on a FIFO
    if path.stat().st_size > 512 * 2**20:
        raise DataError(f"{path} is {path.stat().st_size / 2**20:.0f} MiB; not an admm-onnx report")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        raise DataError(f"{path} is not a JSON report", hint="write one with prune --report") from None
    if not isinstance(data, dict) or "layers" not in data:
        raise DataError(f"{path} is not an admm-onnx report (no 'layers')", hint="write one with prune --report")
    return data


def plot_report(report: Dict[str, object], path, title: Optional[str] = None) -> Path:
    """Write the pictures of a report (a dict, e.g. :meth:`PruneReport.to_dict`) to ``path``."""
    try:
        charts, summary = _report_content(report)
    except (TypeError, KeyError, ValueError, AttributeError, IndexError) as exc:  # a hand-edited or foreign JSON
        raise DataError(f"the report is not an admm-onnx report as written by prune ({type(exc).__name__}: {exc})",
                        hint="write one with prune --report") from None
    return write_charts(charts, path, title or f"admm-onnx report: {report.get('output', '')}", summary)


def _report_content(report: Dict[str, object]):
    """(charts, summary line) of a report dict."""
    total = report.get("total") or {}

    def num(v, fmt):
        return format(v, fmt) if isinstance(v, (int, float)) else "-"

    acc = report.get("accuracy_after")
    summary = (f"{report.get('command') or ''}\n"
               f"compression {num(total.get('compression'), '.1f')}x ({num(total.get('nonzero'), ',')} of "
               f"{num(total.get('weights'), ',')} weights kept); top-1 after retraining "
               f"{num(100 * acc if isinstance(acc, (int, float)) else None, '.2f')}%").strip()
    return report_charts(report), summary
