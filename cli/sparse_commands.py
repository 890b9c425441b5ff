"""CLI commands for sparse deployment files: ``export``, ``densify`` and ``inspect``.

The commands are plain click commands; the application's group registers them with
``group.add_command(...)`` (see :data:`COMMANDS`). User errors are raised as
:class:`admm_onnx.errors.AdmmOnnxError` subclasses for the caller to report.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple

import click
import onnx

from admm_onnx import formats, io, sparse
from admm_onnx.errors import ConfigError, ModelError


def _load(path: Path) -> Tuple[onnx.ModelProto, bool]:
    """Load ``path`` with its external data; also say whether it used external data."""
    model = io.load_model(path, load_external_data=False)
    external = io.uses_external_data(model)
    if external:
        model = io.load_model(path)
    return model, external


def _plan_output(model_path: Path, output: Path, external: bool, *inputs) -> None:
    """Refuse an output that is the input model, its external data, any other input (``inputs``:
    paths, or data specs), a device, a folder..."""
    from admm_onnx.data import dataset_paths

    plan = io.OutputPlan()
    plan.add_model_input(model_path)
    for extra in inputs:
        if extra is not None:
            plan.add_input(*dataset_paths(str(extra)), what="an input")
    plan.add_output(output, "-o", model=True, external=True if external else None)


def _footprint(path: Path) -> int:
    """Bytes on disk of a model file plus the external data files it points to."""
    total = path.stat().st_size
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # the file was just read or written by us; size is best effort
        return total
    locations = set()
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            locations.update(e.value for e in tensor.external_data if e.key == "location")
    for loc in locations:
        data = path.parent / loc
        if data.is_file():
            total += data.stat().st_size
    return total


def _ratio(a: int, b: int) -> str:
    return f"{a / b:.1f}x" if b else "-"


def format_table(rows: Sequence[sparse.WeightRow], totals: Optional[sparse.WeightRow] = None) -> str:
    """A plain-text table of weight rows (name, op, shape, count, nonzero, kept, storage, bits per
    stored value, bytes)."""
    header = ("weight", "op", "shape", "weights", "nonzero", "kept %", "storage", "bits", "bytes", "dense bytes",
              "prunable")
    body: List[Tuple[str, ...]] = []
    all_rows = list(rows) + ([totals] if totals is not None else [])
    for i, r in enumerate(all_rows):
        total = totals is not None and i == len(all_rows) - 1
        body.append((
            r.name, r.op, "x".join(str(d) for d in r.shape), f"{r.weights:,}", f"{r.nonzero:,}",
            f"{r.kept_percent:.2f}", r.storage, "" if total else str(r.bits), f"{r.stored_bytes:,}",
            f"{r.dense_bytes:,}", r.prunable,
        ))
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)]
    left = {0, 1, 2, 6, 10}

    def line(cells: Iterable[str]) -> str:
        return "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    out = [line(header), line("-" * w for w in widths)]
    out += [line(b) for b in body[: len(rows)]]
    if totals is not None:
        out.append(line("-" * w for w in widths))
        out.append(line(body[-1]))
    return "\n".join(out)


@click.command("export")
@click.argument("model_path", metavar="PRUNED.onnx", type=click.Path(path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Sparse ONNX file to write.")
@click.option("--format", "fmt", type=click.Choice(sparse.FORMATS), default="csr", show_default=True,
              help="; ".join(f"{f.name}: {f.summary}" for f in formats.REGISTRY.values() if f.name in sparse.FORMATS)
              + ".")
@click.option("--min-sparsity", type=float, default=0.5, show_default=True,
              help="Encode a weight only if at least this fraction of it is zero (packed: quantized weights always).")
@click.option("--values", type=click.Choice(sparse.VALUE_TYPES), default="fp32", show_default=True,
              help="fp16 (lossy): csr stores its values as float16; packed stores the float32 biases it leaves "
                   "dense (of Conv, ConvTranspose, Gemm; >= 16 entries) as float16.")
@click.option("--names", type=click.Choice(["short", "keep"]), default="short", show_default=True,
              help="packed: short generated names for the graph's internal values (activations, biases) and no "
                   "node names, or keep them all (graph inputs, outputs and encoded weights always keep theirs).")
@click.option("--quantization", "quant_path", type=click.Path(path_type=Path), default=None, metavar="REPORT.json",
              help="packed: the prune report whose quantization specs to use (default: the specs the "
                   "quantized run recorded in PRUNED.onnx).")
@click.option("-d", "--data", "calib_data", default=None, metavar="DATA",
              help="qdq: calibration data for the activation ranges, as prune's -d (digits | mnist:DIR | FILE.npz); "
                   "its training images are used.")
@click.option("--calibration-samples", type=int, default=1000, show_default=True,
              help="qdq: at most this many calibration images.")
@click.option("--activations", type=click.Choice(["uint8", "int8"]), default="uint8", show_default=True,
              help="qdq: activation type (uint8: every conv fused in onnxruntime 1.32 on x86-64; int8: S8S8).")
@click.option("--remove-dead-channels", "remove_dead", is_flag=True,
              help="First remove the channels no weight reads any more (after pruning, most of LeNet-5's fc1 "
                   "units), repeating until none is left: a smaller and faster file whose outputs match "
                   "PRUNED.onnx's to float rounding (checked in onnxruntime), not bit for bit.")
def export_cmd(model_path: Path, output: Path, fmt: str, min_sparsity: float, values: str, names: str,
               quant_path: Optional[Path], calib_data: Optional[str], calibration_samples: int, activations: str,
               remove_dead: bool) -> None:
    """Store the weights of PRUNED.onnx compactly (sparse, packed) or as int8 (qdq) in a new ONNX file."""
    model, external = _load(model_path)
    _plan_output(model_path, output, external, quant_path, calib_data)
    from admm_onnx.graph.opset import within_runtime_versions

    model = within_runtime_versions(model)  # the checks run in onnx's checker and onnxruntime 1.19
    from admm_onnx import formats

    stored = formats.detect(model)
    if stored is not None:
        raise ConfigError(f"{model_path} is already an exported {stored.name} file",
                          hint=("densify it first (admm-onnx densify), then export" if stored.name != "qdq" else
                                "export from the float model it came from"))
    if remove_dead and quant_path is not None:
        raise ConfigError("--remove-dead-channels uses the quantization specs recorded in PRUNED.onnx; "
                          "drop --quantization")
    model, slimmed = _dead_channels(model, remove_dead)
    options = {}
    if fmt == "qdq":
        options.update(_calibration(model, calib_data, calibration_samples, activations))
    elif calib_data is not None:
        raise ConfigError("-d/--data (calibration) is a qdq option; add --format qdq")
    if names != "short":
        if fmt != "packed":
            raise ConfigError("--names is a packed option; add --format packed")
        options["names"] = names
    if quant_path is not None:
        if fmt != "packed":
            raise ConfigError("--quantization is a packed option; add --format packed")
        io.check_input_file(quant_path, "quantization report", error=ConfigError)
        options["quantization"] = quant_path
    try:
        result, report = sparse.export_sparse(model, fmt=fmt, min_sparsity=min_sparsity, values=values, **options)
    except ModelError as exc:
        if not (slimmed and str(exc).startswith("no sparse weights")):
            raise
        # the zeros were whole dead channels: removing them left a smaller dense model, which is the result
        from admm_onnx import formats

        result, report = formats.export(model, "dense")
        click.echo(f"no weight is left sparse enough for {fmt} once the dead channels are gone: writing the model "
                   "without them, dense")
        fmt = "dense"
    io.save_model(result, output, external_data=True if external else None)
    rows = report.rows
    click.echo(format_table(rows, rows.totals))
    for name, reason in report.skipped.items():
        click.echo(f"kept dense: {name} ({reason})")
    if report.float16:
        click.echo(f"stored as float16 (lossy), cast back to float32 at load: {', '.join(report.float16)}")
    if values == "fp16" and model.ByteSize() < io.PROTOBUF_LIMIT and result.ByteSize() < io.PROTOBUF_LIMIT:
        change = sparse.max_output_change(model, result, sparse.sample_feeds(model))
        click.echo(f"fp16 values are lossy: max |output change| {change:.3g} on a random sample batch")
    before, after = _footprint(model_path), _footprint(output)
    click.echo(
        f"wrote {output}: {len(report.encoded)} weight(s) as {fmt}"
        f"{'-' + values if fmt == 'csr' else (f', {len(report.float16)} dense initializer(s) as float16' if report.float16 else '')}; weights{' without dead channels' if slimmed else ''} {report.total_dense_bytes:,} -> "
        f"{report.total_stored_bytes:,} bytes ({_ratio(report.total_dense_bytes, report.total_stored_bytes)}); "
        f"file {before:,} -> {after:,} bytes ({_ratio(before, after)})"
    )
    if after > before and fmt in ("csr", "coo", "packed"):
        click.echo(f"warning: the {fmt} file is {after - before:,} bytes larger than the model it came from: its "
                   "decode graph costs more than the zeros save at this size; the dense file is the smaller one",
                   err=True)


def _dead_channels(model: onnx.ModelProto, remove: bool) -> Tuple[onnx.ModelProto, bool]:
    """(``model`` without its dead channels if ``remove``, else unchanged, with a hint when it has
    some; whether any were removed)."""
    from admm_onnx.structured.dead import dead_channels, remove_dead_channels

    if not remove:
        try:
            _, dead = dead_channels(model)
        except Exception:  # a graph the channel analysis does not follow: nothing to suggest
            dead = {}
        if dead:
            click.echo(f"at least {sum(dead.values()):,} channel(s) no weight reads ({', '.join(sorted(dead))}; "
                       "removing them can free more): --remove-dead-channels writes a smaller, faster file")
        return model, False
    try:
        slim, removed = remove_dead_channels(model)
    except ValueError as exc:
        raise ConfigError(f"cannot remove dead channels: {exc}") from None
    if removed:
        click.echo("removed dead channels: " + ", ".join(f"{n} {k:,}" for n, k in sorted(removed.items())))
    else:
        click.echo("no dead channels")
    return slim, bool(removed)


def _calibration(model: onnx.ModelProto, data: Optional[str], samples: int, activations: str) -> dict:
    """qdq's encode options: the training images of ``data`` fitted to the model's input."""
    import numpy as np

    from admm_onnx.data import Dataset, load_dataset
    from admm_onnx.feeds import fit_array, input_specs

    if data is None:
        raise ConfigError("--format qdq needs calibration data: add -d DATA (the images the model will see)")
    if samples < 1:
        raise ConfigError(f"--calibration-samples must be at least 1, got {samples}")
    dataset = load_dataset(data)
    specs = input_specs(model)
    if len(specs) != 1:
        raise ConfigError(f"qdq calibration from -d supports single-input models; this one takes {len(specs)} inputs "
                          f"({', '.join(s.name for s in specs)})")
    if isinstance(dataset, Dataset):
        x_all = dataset.x_train
    elif len(dataset.train) == 1:  # a .npz keyed by the input's name (labels are not needed)
        x_all = next(iter(dataset.train.values()))
    else:
        raise ConfigError(f"qdq calibration needs one array for input {specs[0].name!r}; -d holds "
                          f"{', '.join(sorted(dataset.train))}")
    x = x_all[np.random.default_rng(0).permutation(len(x_all))[:samples]]
    x = fit_array(x, specs[0], Path(data).stem)  # the input's dtype (token ids stay integers) and shape
    return {"calibration": x, "activations": activations, "max_samples": samples}


@click.command("densify")
@click.argument("model_path", metavar="SPARSE.onnx", type=click.Path(path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Dense ONNX file to write.")
def densify_cmd(model_path: Path, output: Path) -> None:
    """Turn a sparse ONNX file (csr or coo) back into plain dense weights."""
    model, external = _load(model_path)
    _plan_output(model_path, output, external)
    dense = sparse.densify(model)
    io.save_model(dense, output, external_data=True if external else None)
    click.echo(f"wrote {output}: {_footprint(model_path):,} -> {_footprint(output):,} bytes")


@click.command("inspect")
@click.argument("model_path", metavar="MODEL.onnx", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path), default=None, metavar="FILE",
              help="Also draw the kept fraction per weight as FILE.(png|svg|html).")
def inspect_cmd(model_path: Path, as_json: bool, plot_path: Optional[Path]) -> None:
    """Show each weight's sparsity, storage (dense or any export format), bits and bytes."""
    model, _ = _load(model_path)
    table = sparse.inspect_model(model)
    if plot_path is not None:
        from admm_onnx.plot import kept_chart, write_charts

        io.check_output_path(plot_path, model_path, option="--plot")
        write_charts([kept_chart(table.to_dict()["layers"])], plot_path, f"admm-onnx inspect {model_path.name}")
        click.echo(f"Wrote {plot_path}", err=as_json)
    totals = table.totals
    file_bytes = _footprint(model_path)
    if as_json:
        doc = {"model": str(model_path), "file_bytes": file_bytes, **table.to_dict()}
        click.echo(json.dumps(doc, indent=2))
        return
    click.echo(format_table(table, totals))
    click.echo(
        f"{model_path}: {file_bytes:,} bytes on disk; weights {totals.nonzero:,} of {totals.weights:,} nonzero "
        f"({totals.kept_percent:.2f}% kept), stored {totals.stored_bytes:,} of {totals.dense_bytes:,} dense bytes "
        f"({_ratio(totals.dense_bytes, totals.stored_bytes)})"
    )


#: The commands to register on the application's click group.
COMMANDS = (export_cmd, densify_cmd, inspect_cmd)
