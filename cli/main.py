"""The ``admm-onnx`` command line: a thin layer over the library.

Every :class:`~admm_onnx.errors.AdmmOnnxError` becomes one line on stderr and exit code 2
(``--debug`` shows the traceback); Ctrl-C exits with code 130.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import logging
import shlex
import sys
import warnings
import time
from pathlib import Path
from typing import Optional

import click

from admm_onnx.errors import AdmmOnnxError, ConfigError, DataError, as_user_error, clean_message
from admm_onnx.training import Progress

from .options import at_least, named

log = logging.getLogger("admm_onnx.cli")


class Interrupted(Exception):
    """Ctrl-C (or SIGTERM / SIGHUP: ``signum``) with a message saying how to go on."""

    def __init__(self, message: str, signum: Optional[int] = None):
        super().__init__(message)
        self.signum = signum


class ClickProgress(Progress):
    """Progress bars with ETA on stderr (nothing when quiet or not a terminal-less pipe)."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self._bar = None
        self._ctx = None

    def start(self, total: int, label: str) -> None:
        # Not a terminal (a log file, CI): no bars; the per-epoch log line says the same once.
        if not self.enabled or not total or not sys.stderr.isatty():
            return
        self._ctx = click.progressbar(
            length=total, label=label.ljust(24), file=sys.stderr, show_eta=True, show_percent=True, width=30
        )
        self._bar = self._ctx.__enter__()

    def advance(self, n: int = 1, **info) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def finish(self) -> None:
        if self._ctx is not None:
            self._ctx.__exit__(None, None, None)
        self._ctx = self._bar = None


class _LogFile(logging.FileHandler):
    """--log-file: a write that fails (a full disk) stops the file log with one line on stderr,
    instead of logging's traceback for every record after it."""

    failed = False

    def handleError(self, record) -> None:
        if not self.failed:
            self.failed = True
            exc = sys.exc_info()[1]
            sys.stderr.write(f"warning: --log-file {self.baseFilename} could not be written "
                             f"({getattr(exc, 'strerror', None) or exc}); the file log stops here\n")
        with contextlib.suppress(Exception):
            self.close()

    def emit(self, record) -> None:
        if not self.failed:
            super().emit(record)


def _setup_logging(quiet: bool, debug: bool) -> None:
    level = logging.DEBUG if debug else (logging.WARNING if quiet else logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.setLevel(level)
    handlers = [handler]
    ctx = click.get_current_context(silent=True)
    log_file = (ctx.find_root().obj or {}).get("log_file") if ctx is not None else None
    if log_file:
        _check_log_file(ctx, log_file)
        # The whole log at INFO (DEBUG with --debug) with times, whatever -q says; appended.
        try:
            fh = _LogFile(log_file, encoding="utf-8", delay=True)  # created when first used
        except OSError as exc:
            raise ConfigError(f"cannot write the --log-file {log_file}: {exc.strerror or exc}") from None
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        fh.setLevel(logging.DEBUG if debug else logging.INFO)
        handlers.append(fh)
        level = min(level, fh.level)
    root = logging.getLogger("admm_onnx")
    for old in root.handlers:
        if isinstance(old, logging.FileHandler):
            old.close()
    root.handlers[:] = handlers
    root.setLevel(level)
    root.propagate = False


def _check_log_file(ctx, log_file: str) -> None:
    """--log-file is an output: a regular file (appended) that is none of the command's inputs
    or outputs. Every other word of the command line naming an existing file counts (a model
    with its external data), so ``--log-file m.onnx inspect m.onnx`` is refused."""
    from admm_onnx.io import OutputPlan

    words = list((ctx.find_root().obj or {}).get("argv") or [])
    values, same = [], []
    target = os.path.realpath(log_file)
    for i, word in enumerate(words):
        if word is None:
            continue
        if word.startswith("--log-file="):  # its own option (given once or more: the last counts)
            continue
        if word == "--log-file":
            words[i + 1 : i + 2] = [None] if i + 1 < len(words) else []
            continue
        if not word:
            continue
        if any(c and not c.startswith("-") and os.path.realpath(c) == target
               for c in (word, word.split("=", 1)[-1], word.split(":", 1)[-1])):
            same.append(word)
        for candidate in (word, word.split("=", 1)[-1], word.split(":", 1)[-1]):
            if candidate and os.path.exists(candidate):
                values.append(candidate)
                break
    plan = OutputPlan()
    plan.add_input(*values, what="named on the command line")  # a model counts with its external data
    plan.add_output(log_file, "--log-file")
    if same:  # an output of the command (not written yet): the log would be replaced or overwrite it
        raise ConfigError(f"--log-file {log_file} is also an output of the command ({same[0]}); the log would be "
                          "lost or the output overwritten", hint="give the log its own file")


def _input_names(model) -> list:
    """The model's input names (graph inputs that are no initializer), read from its header; []
    when it cannot be read (the command's own load says why)."""
    from admm_onnx.errors import AdmmOnnxError
    from admm_onnx.graph.analysis import graph_inputs
    from admm_onnx.io import load_model

    try:
        return [v.name for v in graph_inputs(load_model(model, load_external_data=False))]
    except (AdmmOnnxError, OSError, ValueError):
        return []


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity), at least 1."""
    import os

    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def check_parallelism(workers: Optional[int], threads: Optional[int]):
    """``--workers`` capped at the usable cores (a warning says so); an absurd ``--threads``
    refused. Returns (workers, threads) with None kept as None."""
    cores = usable_cores()
    if workers is not None:
        if workers < 1:
            raise ConfigError(f"--workers must be > 0, got {workers}")
        if workers > cores:
            click.echo(f"warning: --workers {workers} is more than the {cores} usable core(s); using {cores}", err=True)
            workers = cores
    if threads is not None:
        limit = max(16, 8 * cores)
        if threads < 0:
            raise ConfigError(f"--threads must be >= 0 (0: one per core), got {threads}")
        if threads > limit:
            raise ConfigError(f"--threads {threads} is far more than the {cores} usable core(s); at most {limit} are accepted",
                              hint="0 uses one thread per core")
    return workers, threads


def _capped(config):
    """The configuration with its workers / threads (options or config file) checked and capped."""
    workers, threads = check_parallelism(config.workers, config.threads)
    return config.replace(workers=workers, threads=threads)


def _write_json(path: Optional[str], data) -> None:
    """Write ``data`` as JSON to ``path`` atomically (the path was checked by an OutputPlan)."""
    if not path:
        return
    from admm_onnx.io import write_text

    write_text(path, json.dumps(data, indent=2, default=float) + "\n")


class _Group(click.Group):
    """click turns an EOFError (a truncated input file, deep inside numpy or gzip) into Abort
    ("Interrupted") and echoes a blank line for Ctrl-C: both are translated here, before click
    sees them, so a truncated file is one error line and an interrupt one line too."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except EOFError as exc:
            from admm_onnx.errors import DataError

            raise DataError(f"an input file is truncated or corrupt ({clean_message(str(exc)) or 'unexpected end of file'})") from exc
        except KeyboardInterrupt as exc:
            signum = getattr(exc, "signum", None)
            raise Interrupted(f"Interrupted{f' by signal {signum}' if signum else ''}.", signum) from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logs.")
@click.option("--log-file", type=click.Path(dir_okay=False), default=None, metavar="FILE", callback=named(),
              help="Also append the full log, with times, to FILE (even with -q).")
@click.version_option(package_name="admm-onnx")
@click.pass_context
def cli(ctx, debug, log_file):
    """ADMM weight pruning for ONNX models, with sparse ONNX export."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    ctx.obj["log_file"] = log_file
    if ctx.invoked_subcommand is not None and not any(a in ("-h", "--help") for a in ctx.obj.get("argv", ())):
        # every command: warnings on stderr, --log-file gets the whole log (commands that show
        # progress set their own level)
        _setup_logging(True, debug)


def _output_option(help_text: str, required: bool = True):
    """``-o/--output FILE``, the file a command writes (one style on every command), plus the
    old spelling ``--out`` as a hidden, deprecated alias."""

    def decorate(f):
        f = click.option("--out", "out_old", default=None, hidden=True, type=click.Path(dir_okay=False))(f)
        f = click.option("-o", "--output", "out", default=None, type=click.Path(dir_okay=False), metavar="FILE",
                         help=help_text + ("  [required]" if required else ""))(f)
        return f

    return decorate


def _merge_output(out: Optional[str], out_old: Optional[str], old_flag: str = "--out", required: bool = False):
    """The written file from ``-o/--output`` or its deprecated alias (a warning)."""
    if out_old is not None:
        click.echo(f"warning: {old_flag} is deprecated; use -o/--output", err=True)
        if out is not None and out != out_old:
            raise ConfigError(f"both -o/--output {out} and {old_flag} {out_old} given; use -o/--output only")
        out = out_old
    if out is None and required:
        raise click.UsageError("Missing option '-o' / '--output'.")
    if out is not None and not str(out).strip():
        raise ConfigError("-o/--output is empty; give a file name")
    if out is not None and str(out).endswith(("/", os.sep)):
        raise ConfigError(f"-o/--output {out} names a folder; give a file name")
    return out


def default_output(model: str) -> str:
    """``MODEL.pruned.onnx`` beside MODEL (``net.onnx`` -> ``net.pruned.onnx``)."""
    path = Path(model)
    if not path.name:  # "", ".", "/": no file to name the output after
        raise ConfigError(f"model path {model!r} names no file; give the ONNX model to prune")
    stem = path.name[: -len(".onnx")] if path.name.lower().endswith(".onnx") else path.name
    return str(path.with_name(stem + ".pruned.onnx"))


def _model_output_option(help_text: str):
    return click.option("--model-output", "output_name", default=None, metavar="NAME",
                        help=help_text + "  [default: the first output]")


def _common_training_options(f):
    f = click.option("-d", "--data", required=True, help="digits | mnist:DIR | FILE.npz (x/y, or one array per "
                     "model input keyed by its name, labels optional)")(f)
    f = click.option("--labels-key", default=None, metavar="KEY",
                     help="Array holding the labels in a .npz keyed by input names.  [default: labels, label or y]")(f)
    f = click.option("--lr", type=float, default=None, help="Learning rate (AdamW).  [default: 1e-3]")(f)
    f = click.option("--batch-size", type=int, default=None, help="Mini-batch size.  [default: 64]")(f)
    f = click.option("--seed", type=int, default=None, help="Seed for data order.  [default: 0]")(f)
    f = click.option("--threads", type=int, default=None,
                     help="ONNX Runtime threads (0: one per core).  [default: 0]")(f)
    f = click.option("--workers", type=int, default=None,
                     help="Processes each training batch is split over (e.g. the number of cores).  [default: 1]")(f)
    f = click.option("--loss", type=click.Choice(["auto", "cross_entropy", "mse", "distill", "ce+distill"]), default=None,
                     help="Objective: cross_entropy/mse on labels, distill from the dense model, or both.  "
                          "[default: auto: cross_entropy with labels, distill without]")(f)
    f = click.option("--model-output", "output_name", default=None, metavar="NAME", multiple=True,
                     help="Model output the loss uses (repeat for several).  [default: the first float output "
                          "computed from weights]")(f)
    f = click.option("-q", "--quiet", is_flag=True, help="No progress bars or logs.")(f)
    return f


@cli.command()
@click.argument("model", type=click.Path(dir_okay=False))
@_output_option("Pruned model to write.  [default: MODEL.pruned.onnx]", required=False)
@click.option("--config", "config_path", type=click.Path(dir_okay=False), callback=named(),
              help="Rules and schedule (TOML or JSON).")
@click.option("--sparsity", type=float, default=None, help="Fraction of weights zeroed in every prunable layer.")
@click.option("--compression", default=None, help="Budget: keep 1/C of the prunable weights, e.g. 71x; "
              "per-layer ratios chosen from a sensitivity sweep (rules in --config still pin or exclude).")
@click.option("--target-params", type=int, default=None, help="Budget: number of weights kept in total.")
@click.option("--target-macs", type=float, default=None, help="Budget: fraction of the MACs kept, e.g. 0.5.")
@click.option("--allocation", type=click.Choice(["sensitivity", "global", "uniform"]), default=None,
              help="With a budget: per-layer ratios from a sensitivity sweep, or a global top-k in the ADMM "
                   "Z-step (the split emerges during training); with --structure channel --target-macs: "
                   "sensitivity (channels per group from a sweep over the groups) or uniform (one kept fraction "
                   "for every group).  [default: sensitivity]")
@click.option("--min-keep", type=float, default=None,
              help="With a budget: least fraction any allocated weight keeps.  [default: the lowest sensitivity level, 0.002]")
@click.option("--max-keep", type=float, default=None, help="With a budget: most fraction any allocated weight keeps.  [default: 1]")
@click.option("--admm-iters", type=int, default=None, help="ADMM iterations.  [default: 10]")
@click.option("--epochs-per-iter", type=int, default=None, help="Training epochs per ADMM iteration.  [default: 1]")
@click.option("--admm-update-steps", type=int, default=None,
              help="Z/U update every K optimizer steps inside ADMM epochs (0: once per iteration).  [default: 20]")
@click.option("--retrain-epochs", type=int, default=None, help="Masked retraining epochs (0 allowed).  [default: 4]")
@click.option("--bits", type=click.Choice(["2", "3", "4", "8"]), default=None,
              help="Quantize every prunable weight to symmetric k-bit levels (with --sparsity: both).")
@click.option("--quant-scale", type=click.Choice(["channel", "tensor"]), default=None,
              help="With --bits: one scale per output channel or one per weight tensor.  [default: channel]")
@click.option("--rho", type=float, default=None, help="Initial ADMM penalty rho.  [default: auto, per layer from the loss gradient]")
@click.option("--rho-mode", type=click.Choice(["balance", "growth"]), default=None,
              help="rho per layer from the residuals (balance) or times --rho-growth per Z/U update.  [default: balance]")
@click.option("--rho-growth", type=float, default=None, help="rho multiplier per Z/U update with --rho-mode growth.  [default: 1.3]")
@click.option("--admm-tol", type=float, default=None,
              help="ADMM stops when every primal residual ||W-Z||/||W|| is below this (0: never early).  [default: 0.02]")
@click.option("--retrain-lr", type=float, default=None, help="Learning rate for retraining.  [default: --lr]")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), help="Write the report as JSON here.")
@click.option("--sparse-output", type=click.Path(dir_okay=False), default=None,
              help="Also write a CSR sparse deployment file here (as 'admm-onnx export').")
@click.option("--workdir", type=click.Path(file_okay=False), default=None,
              help="Where the run keeps its state for --resume.  [default: OUTPUT.admm-work]")
@click.option("--resume", is_flag=True, help="Continue an interrupted run from its work directory.")
@click.option("--keep-workdir", is_flag=True, help="Keep the work directory after success.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="Also draw the report as FILE.(png|svg|html) (as 'admm-onnx plot').")
@click.option("--structure", type=click.Choice(["element", "channel"]), default="element",
              help="channel: remove whole channels (coupled groups, see 'admm-onnx groups') and write a smaller dense "
                   "model; --sparsity is then the fraction of channels removed per group, --target-macs the MACs "
                   "kept.  [default: element]")
@click.option("--round-to", type=int, default=None, callback=at_least(1), help="With --structure channel: kept channels a multiple of N (8: ORT's fast conv layout).  [default: 8]")
@click.option("--temperature", type=float, default=None,
              help="Softmax temperature of distillation on class scores.  [default: 2]")
@_common_training_options
@click.pass_context
def prune(ctx, model, out, out_old, config_path, sparsity, compression, target_params, target_macs, allocation, min_keep,
          max_keep,
          admm_iters, epochs_per_iter, admm_update_steps, retrain_epochs, bits, quant_scale, rho, rho_mode, rho_growth,
          admm_tol, retrain_lr, report_path, sparse_output, workdir, resume, keep_workdir, plot_path, structure, round_to,
          data, labels_key, lr, batch_size, seed, workers, threads, loss, temperature, output_name, quiet):
    """ADMM-prune MODEL on DATA and write the pruned model to OUTPUT.

    The run saves its state after every ADMM iteration and retraining epoch; after Ctrl-C, a
    crash or a kill, the same command with --resume continues from the last completed step.
    """
    from admm_onnx.config import PruneConfig, load_config
    from admm_onnx.data import dataset_paths, load_dataset
    from admm_onnx.io import OutputPlan, load_model, uses_external_data
    from admm_onnx.pipeline import make_readers, prepare_model, prune as run_prune
    from admm_onnx.workdir import WorkDir, default_workdir

    _setup_logging(quiet, ctx.obj["debug"])
    out = _merge_output(out, out_old) or default_output(model)
    if workdir == "":
        raise ConfigError("--workdir is empty; give a folder name")
    if quant_scale is not None and bits is None:
        raise ConfigError("--quant-scale applies with --bits only")
    quant_scale = quant_scale or "channel"
    if sparsity is not None and not 0.0 <= sparsity < 1.0:
        raise ConfigError(f"--sparsity must be in [0, 1), got {sparsity} (0.9 zeroes 90% of the weights)")
    config = load_config(config_path) if config_path else PruneConfig()
    channels = _channel_targets(structure, sparsity, target_macs, round_to, allocation, admm_update_steps)
    if channels is not None:
        if bits is not None:
            raise ConfigError("--bits does not combine with --structure channel (channel pruning writes the smaller "
                              "float model)", hint="prune the channels first, then run prune --bits on the result")
        if config.rules or any(v is not None for v in (config.compression, config.target_params, config.target_macs)):
            raise ConfigError("--structure channel takes --sparsity or --target-macs for whole channel groups; the "
                              "--config file's weight rules and budgets do not apply to it",
                              hint="drop them from the config file (the training settings there still apply)")
        sparsity = target_macs = allocation = None  # channel budgets, not weight rules
    elif allocation == "uniform":
        raise ConfigError("--allocation uniform is for --structure channel --target-macs")
    if rho_growth is not None and (rho_mode or config.rho_mode) != "growth":
        raise ConfigError("--rho-growth applies to --rho-mode growth only (with residual balancing, the default, "
                          "rho follows the residuals)")
    if sparsity is not None or bits is not None:
        config = config.with_sparsity(sparsity, None if bits is None else int(bits), quant_scale)
    config = config.replace(
        admm_iters=admm_iters, epochs_per_iter=epochs_per_iter, admm_update_steps=admm_update_steps,
        retrain_epochs=retrain_epochs, rho=rho,
        rho_mode=rho_mode, rho_growth=rho_growth, admm_tol=admm_tol, lr=lr, retrain_lr=retrain_lr, batch_size=batch_size, seed=seed, loss=loss,
        output=list(output_name) or None, threads=threads, workers=workers, labels_key=labels_key,
        temperature=temperature,
    )
    if any(v is not None for v in (compression, target_params, target_macs)):
        if sparsity is not None:
            raise ConfigError("--sparsity and a budget (--compression, --target-params, --target-macs) exclude each other")
        if bits is not None and channels is None:
            raise ConfigError("--bits with a budget (--compression, --target-params) is not supported: the budget "
                              "chooses per-layer sparsity only",
                              hint="prune with the budget first, then run prune --bits on the pruned model")
        config = config.replace(compression=compression, target_params=target_params, target_macs=target_macs)
    config = config.replace(min_keep=min_keep, max_keep=max_keep, allocation=allocation)
    given = [o for o, v in (("--allocation", allocation), ("--min-keep", min_keep), ("--max-keep", max_keep)) if v is not None]
    if channels is None and given and config.compression is None and config.target_params is None \
            and config.target_macs is None:
        raise ConfigError(f"{', '.join(given)} only apply with a budget (--compression, --target-params or "
                          "--target-macs); without one they would be ignored")
    config = _capped(config)
    if plot_path:
        from admm_onnx.plot import plot_format

        plot_format(plot_path)  # fail on a bad suffix before training
    work = Path(workdir) if workdir else default_workdir(out)
    # Every input and output of the run, checked against each other before anything is written.
    external = uses_external_data(load_model(model, load_external_data=False)) or None
    plan = OutputPlan()
    plan.add_model_input(model)
    plan.add_input(config_path, what="the --config file")
    plan.add_input(*dataset_paths(data), what="the -d data")
    plan.add_output(out, "-o", model=True, external=external)
    plan.add_output(sparse_output, "--sparse-output", model=True, external=external)
    plan.add_output(report_path, "--report")
    plan.add_output(plot_path, "--plot")
    plan.add_output(ctx.find_root().obj.get("log_file"), "--log-file")  # not inside the work directory
    plan.add_workdir(work)
    dataset = load_dataset(data, labels_key, _input_names(model))
    prepared = prepare_model(model, config.output)
    if channels is not None:
        if resume:
            raise ConfigError("--resume is not supported with --structure channel")
        if sparse_output:
            raise ConfigError("--sparse-output stores zeros inside weights; --structure channel removes whole "
                              "channels, so -o is already the small dense model", hint="drop --sparse-output")
    elif config.compression is None and config.target_params is None and config.target_macs is None:
        weights = config.plan(prepared.info)  # fail on bad rules before loading data
        if sparse_output and not any(w.sparsity >= 0.5 for w in weights.values()):
            raise ConfigError("--sparse-output stores the weights pruned to >= 50% zeros, and no rule prunes one "
                              "that far" + (" (only --bits)" if not any(w.sparsity > 0 for w in weights.values()) else ""),
                              hint="raise --sparsity, or use admm-onnx export (--min-sparsity, --format packed) "
                                   "on the pruned model")
    train_reader, eval_reader, _ = make_readers(prepared, dataset, config.batch_size, config.seed)
    from admm_onnx.interrupts import deferred

    t0 = time.perf_counter()
    finished = False
    plan.keep_previous()  # an unfinished run gives back the earlier outputs it replaced
    try:  # an interrupt anywhere from here (between the training's end and the final writes too)
        try:
            report = run_prune(prepared, out, train_reader, config, eval_reader, ClickProgress(not quiet), work, resume,
                               channels=channels, keep_workdir=True)  # removed here once every output is written
        except Exception as exc:
            _take_back(plan, work, resumable=channels is None)
            user = as_user_error(exc)  # a full disk, a vanished file...: the user's to fix, then resume
            if user is None:
                raise
            if (work / "progress.json").exists() and not isinstance(user, (ConfigError,)) and user.resumable:
                user.hint = (user.hint + "; " if user.hint else "") + f"progress so far is in {work}, continue with --resume"
            if user is exc:
                raise
            raise user from exc
        # The outputs are written as one step: a signal now waits until they all are, and a failure
        # takes back the ones this run created (the work directory stays for --resume).
        with deferred(final=True):
            try:
                _finish_prune(ctx, report, out, sparse_output, report_path, plot_path, t0)
            except Exception as exc:
                _take_back(plan, work, resumable=channels is None)
                user = as_user_error(exc)
                if isinstance(exc, OSError) and exc.filename is None and _stdout_broken(exc):
                    from admm_onnx.errors import OutputError

                    user = OutputError(f"cannot write to standard output: {exc.strerror or exc}")
                if user is None or channels is not None:
                    raise
                user.hint = (user.hint + "; " if user.hint else "") + \
                    f"the training is done and kept in {work}: the same command with --resume writes the outputs"
                if user is exc:
                    raise
                raise user from exc
            plan.commit()  # the earlier outputs kept aside go
            if not keep_workdir:
                WorkDir(work).remove()  # only what the run wrote
            finished = True
    except (KeyboardInterrupt, click.exceptions.Abort) as exc:  # (Ctrl-C without the CLI's handler: API use)
        if finished:  # every output is written: the signal came too late to stop anything
            return
        raise _prune_interrupted(exc, plan, work, resumable=channels is None) from None


def _take_back(plan, work: Path, resumable: bool) -> None:
    """An unfinished prune: the outputs it wrote go (e.g. -o written just before an interrupt,
    without its --report); so does its work directory when it cannot be resumed (channel runs)."""
    from admm_onnx.workdir import WorkDir

    removed = plan.remove_created()
    if removed:
        log.info("removed the unfinished run's outputs: %s", ", ".join(map(str, removed)))
    if not resumable:
        WorkDir(work).remove()  # only what the run wrote


def _prune_interrupted(exc: BaseException, plan, work: Path, resumable: bool = True) -> "Interrupted":
    """The error of an interrupted prune, after :func:`_take_back`."""
    signum = getattr(exc, "signum", None)
    how = f" by signal {signum}" if signum else ""
    _take_back(plan, work, resumable)
    if not resumable:
        return Interrupted(f"Interrupted{how}. Channel pruning does not resume; nothing of the run was kept.", signum)
    if (work / "progress.json").exists():
        return Interrupted(f"Interrupted{how}. Progress is saved in {work}: run the same command with --resume to "
                           "continue.", signum)
    return Interrupted(f"Interrupted{how} before the first step completed; nothing to resume.", signum)


def _finish_prune(ctx, report, out, sparse_output, report_path, plot_path, t0) -> None:
    report.phase_seconds["total"] = time.perf_counter() - t0
    report.command = shlex.join(["admm-onnx", *ctx.obj.get("argv", [])])
    click.echo(report.table())
    if report.allocation and report.allocation.get("global"):
        click.echo(f"Allocation for {report.allocation['budget']}: global top-k across "
                   f"{', '.join(report.allocation['global']['tensors'])} (split above)")
    elif report.allocation and report.allocation.get("method") == "uniform":
        click.echo(f"Allocation for {report.allocation['budget']}: one kept fraction for every channel group; "
                   f"MACs kept {100 * report.allocation['kept_macs_fraction']:.2f}%")
    elif report.allocation and report.allocation.get("method") == "sensitivity":
        a = report.allocation
        click.echo(f"Allocation for {a['budget']}: channels per group from their sensitivity; predicted one-shot "
                   f"{a['metric']} {a['predicted_one_shot_metric']:.4f} (dense {a['dense_metric']:.4f}, "
                   f"{a['samples']:,} training samples); MACs kept {100 * a['kept_macs_fraction']:.2f}%")
    elif report.allocation:
        a = report.allocation
        click.echo(f"Allocation for {a['budget']}: predicted one-shot {a['metric']} {a['predicted_one_shot_metric']:.4f}, "
                   f"measured {a['measured_one_shot_metric']:.4f} (dense {a['dense_metric']:.4f}, {a['samples']:,} "
                   f"training samples); MACs kept {100 * a['kept_macs_fraction']:.2f}%")
    click.echo(f"Wrote {out} in {report.phase_seconds['total']:.1f} s")
    if sparse_output:
        _write_sparse(out, sparse_output)
    _write_json(report_path, report.to_dict())
    if plot_path:
        from admm_onnx.plot import plot_report

        plot_report(report.to_dict(), plot_path)
        click.echo(f"Wrote {plot_path}")


def _channel_targets(structure, sparsity, target_macs, round_to, allocation=None, update_steps=None):
    """ChannelTargets for --structure channel (None otherwise); --admm-update-steps, when given,
    is its Z/U update interval (channel ADMM's default: once per iteration)."""
    if structure != "channel":
        if round_to is not None:
            raise ConfigError("--round-to needs --structure channel")
        return None
    from admm_onnx.structured.targets import ChannelTargets

    if allocation == "global":
        raise ConfigError("--allocation global is for weight budgets; with --structure channel use sensitivity or uniform")
    return ChannelTargets(sparsity=sparsity, target_macs=target_macs, round_to=round_to or 8, allocation=allocation,
                          update_steps=update_steps or 0)


def _write_sparse(model_path, output) -> None:
    from admm_onnx import io, sparse

    model = io.load_model(model_path)
    result, export = sparse.export_sparse(model)
    io.save_model(result, output, external_data=True if io.uses_external_data(
        io.load_model(model_path, load_external_data=False)) else None)
    click.echo(
        f"Wrote {output}: {len(export.encoded)} weight(s) as CSR, weights {export.total_dense_bytes:,} -> "
        f"{export.total_stored_bytes:,} bytes"
    )


@cli.command()
@click.argument("model", type=click.Path(dir_okay=False))
@_output_option("Trained model to write.")
@click.option("--epochs", type=int, required=True, help="Training epochs.")
@_common_training_options
@click.pass_context
def train(ctx, model, out, out_old, epochs, data, labels_key, lr, batch_size, seed, workers, threads, loss, output_name,
          quiet):
    """Dense training of MODEL on DATA (e.g. from scratch) before pruning."""
    from admm_onnx.config import PruneConfig
    from admm_onnx.data import dataset_paths, load_dataset
    from admm_onnx.io import OutputPlan, load_model, uses_external_data
    from admm_onnx.pipeline import make_readers, prepare_model, train as run_train
    from admm_onnx.workdir import WorkDir, default_workdir

    _setup_logging(quiet, ctx.obj["debug"])
    out = _merge_output(out, out_old, required=True)
    if epochs < 1:
        raise click.BadParameter("must be at least 1", param_hint="--epochs")
    workers, threads = check_parallelism(workers, threads)
    config = PruneConfig().replace(lr=lr, batch_size=batch_size, seed=seed, loss=loss, output=list(output_name) or None,
                                   threads=threads,
                                   workers=workers)
    plan = OutputPlan()
    plan.add_model_input(model)
    plan.add_input(*dataset_paths(data), what="the -d data")
    plan.add_output(out, "-o", model=True, external=uses_external_data(load_model(model, load_external_data=False)) or None)
    work = plan.add_workdir(default_workdir(out), option="-o")
    dataset = load_dataset(data, labels_key, _input_names(model))
    prepared = prepare_model(model, config.output)
    train_reader, eval_reader, _ = make_readers(prepared, dataset, config.batch_size, config.seed)
    from admm_onnx.interrupts import deferred

    plan.keep_previous()  # an unfinished run gives back the -o it replaced
    finished = False
    try:  # one handler from the training to the last line (a signal between them too)
        report = run_train(prepared, out, train_reader, epochs, eval_reader, config, ClickProgress(not quiet), work)
        with deferred(final=True):  # -o is written: a signal now changes nothing
            figures = []
            if report.accuracy_after is not None:
                figures.append(f"Top-1 {100 * report.accuracy_after:.2f}%")
            if report.loss_after is not None:
                figures.append(f"loss {report.loss_after:.4f}")
            said = f"{figures[0]} ({figures[1]})" if len(figures) == 2 else (figures[0] if figures else "Trained")
            click.echo(f"{said} after {epochs} epoch(s); wrote {out}")  # a full stdout fails the run, as prune's
            plan.commit()
            finished = True
    except BaseException:
        if finished:  # complete: a late signal changes nothing
            return
        WorkDir(work).remove()  # train does not resume: none of its training files stay
        plan.remove_created()  # -o written just before an interrupt or a failure: the run did not end
        raise


@cli.command("eval")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-d", "--data", required=True, help="digits | mnist:DIR | FILE.npz")
@click.option("--labels-key", default=None, metavar="KEY",
              help="Array holding the labels in a .npz keyed by input names.  [default: labels, label or y]")
@click.option("--batch-size", type=int, default=256, show_default=True)
@_model_output_option("Model output holding the logits.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def eval_cmd(model, data, labels_key, batch_size, output_name, as_json):
    """Top-1 accuracy and loss of MODEL on the evaluation split of DATA."""
    from admm_onnx.data import load_dataset
    from admm_onnx.pipeline import evaluate, make_readers, prepare_model

    if batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {batch_size}")
    prepared = prepare_model(_float_model_of_qdq(model) or model, output_name)
    dataset = load_dataset(data, labels_key, _input_names(model))
    # Only the evaluation reader is used: the (unused) training reader must not refuse a data
    # set smaller than one batch.
    train = getattr(dataset, "train", None)  # a .npz keyed by input names (FeedDataset)
    n_train = (len(getattr(dataset, "x_train", ())) or
               (len(next(iter(train.values()))) if isinstance(train, dict) and train else 0) or batch_size)
    _, eval_reader, _ = make_readers(prepared, dataset, max(1, min(batch_size, n_train)))
    stats = evaluate(model, eval_reader, prepared.output_name)
    if stats.accuracy is None:
        labels = getattr(dataset, "y_test", None)
        if labels is None:
            raise DataError("eval measures top-1 against class labels; the data has none",
                            hint="give labels (labels/y, --labels-key)")
        if labels.dtype.kind in "iu" and labels.size and (labels == -100).all():
            raise DataError("eval measures top-1 against class labels; every label of the evaluation split is -100 "
                            "(an ignored position)")
        raise DataError(f"eval measures top-1 against class labels; the labels ({labels.dtype}, shape "
                        f"{list(labels.shape)}) are not class indices of output {prepared.output_name!r}",
                        hint="one integer class per output position: the output's shape without its class axis")
    if as_json:
        finite = lambda v: v if v is None or math.isfinite(v) else None  # noqa: E731 - JSON has no NaN
        click.echo(json.dumps({"accuracy": finite(stats.accuracy), "loss": finite(stats.loss), "samples": stats.samples}))
    else:
        click.echo(f"Top-1 {100 * stats.accuracy:.2f}%  loss {stats.loss:.4f}  ({stats.samples} samples)")


def _float_model_of_qdq(path):
    """For an int8 qdq file, the float model its weights decode to (eval reads the inputs,
    outputs and classes from it, and runs the qdq file itself); None for any other model."""
    from admm_onnx import formats
    from admm_onnx.io import load_model

    header = load_model(path, load_external_data=False)
    fmt = formats.detect(header)
    if fmt is None or fmt.name != "qdq":
        return None
    return formats.decode(load_model(path))


@cli.group()
def models():
    """Reference models (LeNet-5, LeNet-300-100, ResNet-20)."""


@models.command("build")
@click.argument("name")
@_output_option("Model file to write.")
@click.option("--input-shape", default="1x28x28", show_default=True, help="C x H x W.")
@click.option("--classes", type=int, default=10, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, callback=at_least(0))
def models_build(name, out, out_old, input_shape, classes, seed):
    """Build reference model NAME (lenet5, lenet300-100, resnet20) with random weights."""
    from admm_onnx.errors import ConfigError
    from admm_onnx.io import check_output_path, save_model
    from admm_onnx.models import build

    try:
        shape = tuple(int(v) for v in input_shape.lower().split("x"))
    except ValueError:
        raise ConfigError(f"--input-shape must look like 1x28x28, got {input_shape!r}") from None
    if len(shape) != 3 or min(shape) < 1:
        raise ConfigError(f"--input-shape must be C x H x W with positive sizes, got {input_shape!r}")
    if shape[0] * shape[1] * shape[2] > 2**24:
        raise ConfigError(f"--input-shape {input_shape} is too large for a reference model (at most 16M values)")
    if classes < 1 or classes > 100000:
        raise ConfigError(f"--classes must be between 1 and 100000, got {classes}")
    out = _merge_output(out, out_old, required=True)
    check_output_path(out)
    try:
        model = build(name, input_shape=shape, num_classes=classes, seed=seed)
    except ZeroDivisionError:
        raise ConfigError(f"cannot build {name} for --input-shape {input_shape}: the input is too small for its "
                          "convolutions and pooling", hint="give a larger height and width, e.g. 1x28x28") from None
    except (ValueError, KeyError) as exc:
        raise ConfigError(f"cannot build {name} for --input-shape {input_shape}: {exc}") from None
    save_model(model, out)
    click.echo(f"Wrote {out}")


@cli.command()
@click.option("-o", "--output", "out_dir", default=None, type=click.Path(file_okay=False),
              help="Folder for the models and report.json.  [default: admm-demo]")
@click.option("--out-dir", "out_dir_old", default=None, hidden=True, type=click.Path(file_okay=False))
@click.option("-q", "--quiet", is_flag=True, help="No progress bars or logs.")
@click.pass_context
def demo(ctx, out_dir, out_dir_old, quiet):
    """Build LeNet-5, train it, ADMM-prune it and retrain it, on the embedded digits data."""
    from admm_onnx.demo import run_demo

    from admm_onnx.demo import DEMO_FILES
    from admm_onnx.io import claim_output_folder

    _setup_logging(quiet, ctx.obj["debug"])
    out_dir = Path(_merge_output(out_dir, out_dir_old, "--out-dir") or "admm-demo")
    with claim_output_folder(out_dir, DEMO_FILES, "-o", final=True):  # its end is the command's
        run_demo(out_dir, ClickProgress(not quiet), echo=click.echo)


def _register_optional_commands() -> None:
    try:
        from . import sparse_commands
    except ImportError:  # pragma: no cover
        return
    for name in ("export", "densify", "inspect"):
        command = getattr(sparse_commands, name, None) or getattr(sparse_commands, f"{name}_cmd", None)
        if command is not None:
            cli.add_command(command, name)


_register_optional_commands()

from .structured_commands import groups as _groups  # noqa: E402
from .sensitivity_cmd import sensitivity as _sensitivity  # noqa: E402

cli.add_command(_groups, "groups")
cli.add_command(_sensitivity)

from .plot_cmd import plot as _plot  # noqa: E402

cli.add_command(_plot)

#: one line per command in ``admm-onnx --help`` (click cuts the docstrings' first sentences at
#: about 45 characters, mid-phrase)
SHORT_HELP = {
    "prune": "ADMM-prune a model (the main job).",
    "train": "Dense training, e.g. before pruning.",
    "eval": "Top-1 and loss on the evaluation split.",
    "sensitivity": "Per-layer sensitivity sweep.",
    "demo": "The whole pipeline on embedded digits.",
    "export": "Write a sparse/quantized deployment file.",
    "densify": "Sparse file back to dense weights.",
    "inspect": "Sparsity and storage per weight.",
    "plot": "Pictures of a report or a sweep.",
    "groups": "Channel groups for --structure channel.",
    "models": "Build the reference models.",
}
for _name, _text in SHORT_HELP.items():
    if _name in cli.commands:
        cli.commands[_name].short_help = _text


from admm_onnx.interrupts import Signalled as _Signalled  # noqa: E402  (SIGTERM / SIGHUP)


def _install_signal_handlers() -> dict:
    """SIGINT, SIGTERM and SIGHUP all raise (admm_onnx.interrupts): the run commits its state
    and says how to resume, temp folders and exchange files are removed on the way out."""
    import signal

    from admm_onnx.interrupts import handler

    previous = {}
    for name in ("SIGINT", "SIGTERM", "SIGHUP"):
        sig = getattr(signal, name, None)
        if sig is None:
            continue
        try:
            previous[sig] = signal.signal(sig, handler)
        except (ValueError, OSError):  # not the main thread
            pass
    return previous


def _restore_signal_handlers(previous: dict) -> None:
    import signal

    for sig, handler in previous.items():
        try:
            signal.signal(sig, handler)
        except (ValueError, OSError, TypeError):
            pass


def _split_debug(argv):
    """The global options anywhere before ``--`` (also after the subcommand): ``--debug`` and
    ``--log-file FILE`` / ``--log-file=FILE`` are moved in front of the subcommand."""
    args = list(argv if argv is not None else sys.argv[1:])
    cut = args.index("--") if "--" in args else len(args)
    head, tail, front, debug, i = args[:cut], args[cut:], [], False, 0
    rest = []
    while i < len(head):
        a = head[i]
        if a == "--debug":
            debug = True
        elif a == "--log-file" and i + 1 < len(head):
            front += head[i:i + 2]
            i += 1
        elif a.startswith("--log-file="):
            front.append(a)
        else:
            rest.append(a)
        i += 1
    return (["--debug"] if debug else []) + front + rest + tail, debug


def _command_path(args) -> str:
    """The command ARGS name ('admm-onnx prune'), for a usage error click raised without its
    context (an option missing its value at the end of the line)."""
    group, path, i = cli, ["admm-onnx"], 0
    while i < len(args):
        a = args[i]
        if a == "--log-file":
            i += 2
            continue
        sub = group.commands.get(a) if isinstance(group, click.Group) else None
        if sub is None:
            if not a.startswith("-"):
                break
        else:
            path.append(a)
            group = sub
        i += 1
    return " ".join(path)


def _usage_line(exc: click.exceptions.UsageError, args=()) -> str:
    command = exc.ctx.command_path if exc.ctx is not None else _command_path(args)
    if isinstance(exc, click.exceptions.NoSuchOption) and exc.ctx is not None and exc.possibilities:
        # never suggest a hidden (deprecated) spelling such as --out
        hidden = {o for p in exc.ctx.command.params if getattr(p, "hidden", False) for o in p.opts}
        exc.possibilities = [p for p in exc.possibilities if p not in hidden]
    message = " ".join(exc.format_message().split())
    return f"error: {message} (see '{command} --help')"


def main(argv=None) -> int:
    args, debug = _split_debug(argv)
    if not [a for a in args if a != "--debug"]:  # no command: the help, as for --help
        with click.Context(cli, info_name="admm-onnx") as ctx:
            click.echo(cli.get_help(ctx))
        return 0
    from admm_onnx import interrupts

    interrupts.reset()  # a new command (in-process callers run several)
    previous = _install_signal_handlers()
    try:
        with warnings.catch_warnings():
            if not debug:  # NumPy's overflow/invalid-value notes are not for users (--debug shows them)
                warnings.simplefilter("ignore", RuntimeWarning)
            cli.main(args=args, prog_name="admm-onnx", standalone_mode=False,
                     obj={"argv": list(argv if argv is not None else sys.argv[1:])})
    except Interrupted as exc:
        click.echo(str(exc), err=True)
        return 128 + exc.signum if getattr(exc, "signum", None) else 130
    except _Signalled as exc:
        click.echo(f"Interrupted by signal {exc.signum}.", err=True)
        return 128 + exc.signum
    except (click.exceptions.Abort, KeyboardInterrupt):
        click.echo("Interrupted.", err=True)
        return 130
    except click.exceptions.UsageError as exc:
        if debug:
            raise
        if type(exc).__name__ == "NoArgsIsHelpError" and exc.ctx is not None:  # a group alone: its help, as bare admm-onnx
            click.echo(exc.ctx.get_help())
            return 0
        click.echo(_usage_line(exc, args), err=True)
        return 2
    except click.exceptions.ClickException as exc:
        if debug:
            raise
        click.echo(f"error: {' '.join(exc.format_message().split())}", err=True)
        return 2
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except AdmmOnnxError as exc:
        if debug:
            raise
        click.echo(f"error: {exc.one_line()}", err=True)
        return 2
    except Exception as exc:  # anything else escaping the library is a bug
        user_error = as_user_error(exc)
        if debug:
            raise
        if isinstance(exc, OSError) and exc.filename is None and _stdout_broken(exc):
            click.echo(f"error: cannot write to standard output: {exc.strerror or exc}", err=True)
            return 2
        if user_error is not None:
            click.echo(f"error: {user_error.one_line()}", err=True)
            return 2
        text = clean_message(str(exc))[:300]
        click.echo(f"error: internal error: {type(exc).__name__}{': ' + text if text else ''} "
                   f"(this is a bug; run with --debug for the traceback)", err=True)
        return 1
    finally:
        if argv is None:  # the admm-onnx process: the command is over, a signal now would only cut the exit short
            _ignore_signals()
        else:  # called in-process (tests, scripts): hand the signals back
            _restore_signal_handlers(previous)
            interrupts.reset()
    return 0


def _stdout_broken(exc: OSError) -> bool:
    """Whether EXC is standard output refusing what the CLI echoed (a full device, a closed
    pipe): the error names no file, so the failing frame tells it from a full disk elsewhere."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None or tb.tb_frame.f_code.co_name != "echo":
        return False
    stream = tb.tb_frame.f_locals.get("file")
    if stream is None or getattr(stream, "name", None) != "<stdout>":
        return False
    try:  # drop what cannot be written, so the interpreter's exit flush does not fail again
        sys.stdout = open(os.devnull, "w")
    except OSError:
        pass
    return True


def _ignore_signals() -> None:
    import signal

    for name in ("SIGINT", "SIGTERM", "SIGHUP"):
        sig = getattr(signal, name, None)
        if sig is not None:
            try:
                signal.signal(sig, signal.SIG_IGN)
            except (ValueError, OSError):
                pass


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
