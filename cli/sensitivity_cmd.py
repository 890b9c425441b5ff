"""``admm-onnx sensitivity``: the per-layer sensitivity sweep (admm_onnx/allocation)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import click

from .options import at_least, named


def _levels(text):
    from admm_onnx.errors import ConfigError

    if text is None:
        return None
    out = []
    for part in text.split(","):
        part = part.strip()
        try:
            out.append(float(part[:-1]) / 100 if part.endswith("%") else float(part))
        except ValueError:
            raise ConfigError(f"--levels: {part!r} is not a fraction kept (0.1) or a percentage (10%)") from None
    return out


def _check_cache_dir(path: Path) -> None:
    """--cache must be a folder (or creatable in an existing, writable folder)."""
    from admm_onnx.errors import OutputError

    if path.exists():
        if not path.is_dir():
            raise OutputError(f"--cache: {path} exists and is not a folder")
        if not os.access(path, os.W_OK | os.X_OK):
            raise OutputError(f"--cache: cannot write in {path} (permission denied)")
        return
    parent = path.parent
    if not parent.is_dir():
        raise OutputError(f"--cache: the folder {parent} does not exist", hint="create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"--cache: cannot create {path} (no write permission in {parent})")


@click.command("sensitivity")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-d", "--data", required=True, help="digits | mnist:DIR | FILE.npz (the training split is used)")
@click.option("--levels", default=None,
              help="Fractions of each weight kept, comma-separated (0.1 or 10%).  [default: 50,30,20,10,5,3,2,1,0.5,0.2%]")
@click.option("--samples", type=int, default=2000, show_default=True, help="Training samples evaluated (a seeded subset).")
@click.option("--metric", type=click.Choice(["loss", "top1", "kl"]), default="loss", show_default=True,
              help="Cross-entropy, top-1 error, or KL divergence to the dense model's outputs (no labels needed).")
@click.option("--structure", type=click.Choice(["element", "filter", "channel", "groups"]), default="element",
              show_default=True, help="Prune single weights, whole output channels (filter) or input channels of one "
              "weight, or the channel groups of 'admm-onnx groups' (every tensor a removed channel touches).")
@click.option("--workers", type=int, default=None, help="Local worker processes.  [default: the number of cores]")
@click.option("--ray", "ray_address", default=None,
              help="Run on the Ray cluster at ADDRESS (or set RAY_ADDRESS; 'local' starts one here).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write the curves as JSON.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              metavar="FILE", help="Draw the curves as FILE.(png|svg|html) (as 'admm-onnx plot').")
@click.option("--cache", "cache_dir", type=click.Path(file_okay=False), default=None, callback=named("folder"),
              help="Cache the results in this folder (reruns compute only what is missing).  [default: $ADMM_ONNX_CACHE, else no cache]")
@click.option("--no-cache", is_flag=True, help="Neither read nor write the cache.")
@click.option("--seed", type=int, default=0, show_default=True, callback=at_least(0), help="Seed of the sample subset.")
@click.option("--model-output", "output_name", default=None, metavar="NAME",
              help="Model output holding the logits.  [default: the first output]")
@click.option("-q", "--quiet", is_flag=True, help="No logs.")
@click.pass_context
def sensitivity(ctx, model, data, levels, samples, metric, structure, workers, ray_address, json_path, plot_path,
                cache_dir, no_cache, seed, output_name, quiet):
    """For each prunable weight of MODEL, the metric after one-shot magnitude pruning at each
    level with every other weight dense (ONNX Runtime inference; cached; parallel)."""
    from admm_onnx.allocation.runners import make_runner
    from admm_onnx.allocation.sensitivity import DEFAULT_LEVELS, check_levels, run_sensitivity, write_plot
    from admm_onnx.data import load_dataset
    from admm_onnx.errors import ConfigError
    from admm_onnx.data import dataset_paths
    from admm_onnx.io import OutputPlan
    from admm_onnx.pipeline import prepare_model

    from .main import _setup_logging, _write_json, check_parallelism, usable_cores

    _setup_logging(quiet, ctx.obj["debug"])
    if samples < 1:
        raise ConfigError(f"--samples must be at least 1, got {samples}")
    level_list = check_levels(_levels(levels) or DEFAULT_LEVELS)
    workers, _ = check_parallelism(workers, None)
    # Every input and output, checked against each other before any work.
    plan = OutputPlan()
    plan.add_model_input(model)
    plan.add_input(*dataset_paths(data), what="the -d data")
    plan.add_output(json_path, "--json")
    plan.add_output(plot_path, "--plot")
    if cache_dir and no_cache:
        raise ConfigError("--cache and --no-cache exclude each other")
    if cache_dir and not no_cache:
        _check_cache_dir(Path(cache_dir))
        plan.add_input(cache_dir, what="the --cache folder")
    if plot_path:
        from admm_onnx.plot import plot_format

        plot_format(plot_path)  # a bad suffix, or PNG without matplotlib: stop before the sweep
    import numpy as np

    from .main import _input_names

    dataset = load_dataset(data, None, _input_names(model))  # before the model's preparation logs anything: a bad file is one line
    if hasattr(dataset, "x_train"):
        x_all, y_all = dataset.x_train, dataset.y_train
    else:  # arrays keyed by input name (several inputs, or no labels)
        x_all = dict(dataset.train)
        y_all = dataset.y_train
        if y_all is None and metric != "kl":
            raise ConfigError(f"--metric {metric} needs labels, and the data has none", hint="use --metric kl")
        if y_all is None:
            y_all = np.zeros(len(next(iter(x_all.values()))), np.int64)
    prepared = prepare_model(model, output_name)
    import onnx

    kinds = {o.name: o.type.tensor_type.elem_type for o in prepared.original.graph.output}
    kind = kinds.get(prepared.output_name)
    if kind is not None and kind not in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16):
        raise ConfigError(f"--model-output {prepared.output_name!r} is not a float output (scores or logits); "
                          "the sweep measures loss, top-1 or KL on one")
    idx = np.random.default_rng(seed).permutation(len(y_all))[:samples]
    idx.sort()
    if isinstance(x_all, dict):
        from admm_onnx.feeds import fit_inputs, input_specs

        x = fit_inputs({k: a[idx] for k, a in x_all.items()}, input_specs(prepared.original), Path(data).stem)
    else:
        from admm_onnx.feeds import fit_array

        x = fit_array(x_all[idx], prepared.inputs[0], Path(data).stem)  # the input's dtype and shape
    y = y_all[idx]
    runner = make_runner(workers if workers is not None else usable_cores(), ray_address)
    cache = None if no_cache else (cache_dir or "default")
    result = run_sensitivity(prepared, x, y, level_list, metric, structure, None, runner, cache)
    click.echo(result.table())
    click.echo(f"{result.computed} evaluation(s) in {result.seconds:.1f} s on {result.runner}, {result.cached} from the cache")
    from admm_onnx.interrupts import deferred

    # --plot and --json are one set: a signal waits until both are written, a failure takes back
    # the one this run created.
    with deferred(final=True):
        try:
            _write_outputs(result, plot_path, json_path, write_plot)
        except BaseException:
            plan.remove_created()
            raise


def _write_outputs(result, plot_path, json_path, write_plot) -> None:
    from .main import _write_json

    if plot_path:  # first: a sweep that cannot be drawn (NaN scores) leaves neither file
        try:
            write_plot(result, plot_path)
        except (ValueError, OverflowError, TypeError, ZeroDivisionError) as exc:
            from admm_onnx.errors import DataError

            raise DataError(f"the sweep's scores cannot be drawn ({type(exc).__name__}: {exc}); the model's "
                            "outputs may be NaN or Inf"[:300]) from None
        click.echo(f"Wrote {plot_path}")
    _write_json(json_path, result.to_dict())
