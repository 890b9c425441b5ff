"""Run ``admm-onnx prune MODEL -d DATA -o OUT --sparsity 0.5`` on every model of a zoo folder
(bench/zoo_export.py writes one to /tmp/zoo) and check each output in the newest ONNX Runtime.

    python bench/zoo_run.py [--zoo /tmp/zoo] [--out /tmp/zoo-run] [--ort-python PY] [NAME ...]
        [--timeout 900] [-- EXTRA PRUNE OPTIONS]

Per model:
1. Data made from the model's input signature (seeded): float inputs standard normal, token
   ids uniform in [5, vocabulary) (the vocabulary read from the embedding table the ids index),
   attention masks of ones with the last quarter of every other row zero, token types zeros;
   the first dim is the sample count (also when the model fixes its batch size), other dynamic dims 32. ``--form names`` (default)
   writes one array per input name (evaluation arrays as ``test/NAME``) and no labels, so the
   tool prunes without labels (self-distillation), or with ``--labels teacher`` the dense
   model's argmax as labels when its first float output is (N, C) class scores (no labels
   otherwise);
   ``--form xy`` writes the single-input ``x_train, y_train, x_test, y_test`` form with the
   dense model's own argmax as labels (single-input classifiers only).
2. The CLI with default settings but ``--sparsity 0.5`` and a short schedule (:data:`QUICK`,
   replaced by whatever follows ``--``), a report, a timeout.
3. In a second Python with plain ``onnxruntime`` (``--ort-python``; default: the deploy venv
   if present, else /work/venvs/ort132): the pruned file loads, its input/output names, types
   and shapes equal the original's, it runs on the test inputs; the agreement with the dense
   model (cosine of the first float output, top-1 agreement for class scores) is recorded.
Writes ``OUT/zoo.json`` and prints a markdown table (model, exporter, result, time, reason).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
#: Prune options used unless others follow ``--``: a short schedule so that a full-size CNN
#: or encoder takes a minute or two on 2 cores (the defaults' 10 ADMM + 4 retraining epochs
#: over 64-sample batches are what a real run uses; the graph is the same either way).
QUICK = ("--batch-size", "8", "--admm-iters", "3", "--retrain-epochs", "1")
SEQ = 32

#: ``run_any_batch(session, feed)``: all outputs; a model with a fixed batch size runs one sample
#: at a time (ZipMap outputs, lists of dicts, are joined). Source text: CHECK runs it in the
#: plain-onnxruntime venv, teacher_labels in this process.
RUN_ANY_BATCH = r"""
def run_any_batch(sess, feed):
    try:
        return sess.run(None, feed)
    except Exception:
        n = len(next(iter(feed.values())))
        rows = [sess.run(None, {k: v[i:i + 1] for k, v in feed.items()}) for i in range(n)]
        return [sum((list(x) for x in r), []) if isinstance(r[0], list) else np.concatenate(r) for r in zip(*rows)]
"""

#: Runs in the plain-onnxruntime venv: argv[1] = JSON job file; prints one JSON line.
CHECK = r"""
import json, sys
import numpy as np
import onnxruntime as ort
""" + RUN_ANY_BATCH + r"""
job = json.load(open(sys.argv[1]))
feed = {k: v for k, v in np.load(job["feed"]).items()}
so = ort.SessionOptions(); so.log_severity_level = 3
opts = dict(providers=["CPUExecutionProvider"], sess_options=so)
dense = ort.InferenceSession(job["dense"], **opts)
pruned = ort.InferenceSession(job["pruned"], **opts)
sig = lambda s: [[v.name, v.type, [d if isinstance(d, int) else None for d in v.shape]] for v in s]
res = {"ort": ort.__version__,
       "inputs_same": sig(dense.get_inputs()) == sig(pruned.get_inputs()),
       "outputs_same": sig(dense.get_outputs()) == sig(pruned.get_outputs()),
       "signature": {"inputs": sig(pruned.get_inputs()), "outputs": sig(pruned.get_outputs())}}
a = run_any_batch(dense, feed)
b = run_any_batch(pruned, feed)
res["ran"] = True
res["outputs"] = {}
for o, x, y in zip(pruned.get_outputs(), a, b):
    if isinstance(x, list):  # ZipMap
        keys = list(x[0].keys())
        x = np.array([[r[k] for k in keys] for r in x]); y = np.array([[r[k] for k in keys] for r in y])
    x, y = np.asarray(x), np.asarray(y)
    info = {"shape": list(y.shape), "dtype": str(y.dtype)}
    if np.issubdtype(x.dtype, np.floating):
        xf, yf = x.reshape(len(x), -1).astype(np.float64), y.reshape(len(y), -1).astype(np.float64)
        den = np.linalg.norm(xf, axis=1) * np.linalg.norm(yf, axis=1)
        info["cosine"] = float(np.mean((xf * yf).sum(1) / np.maximum(den, 1e-30)))
        info["finite"] = bool(np.isfinite(y).all())
        if x.ndim >= 2 and x.shape[-1] > 1:
            info["top1_agree"] = float(np.mean(x.argmax(-1) == y.argmax(-1)))
    else:
        info["equal"] = float(np.mean(x == y))
    res["outputs"][o.name] = info
print(json.dumps(res))
"""


def default_ort_python() -> str:
    for cand in (ROOT / ".venv-deploy" / "bin" / "python", Path("/work/venvs/ort132/bin/python")):
        if cand.exists():
            return str(cand)
    return "python3"


def real_inputs(model):
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def vocab_size(model, name):
    """Rows of the embedding table that input ``name`` indexes (through Cast/Unsqueeze...)."""
    inits = {t.name: t for t in model.graph.initializer}
    frontier, seen = {name}, set()
    for _ in range(6):
        nxt = set()
        for node in model.graph.node:
            if node.op_type == "Gather" and len(node.input) > 1 and node.input[1] in frontier and node.input[0] in inits:
                return int(inits[node.input[0]].dims[0])
            if node.op_type in ("Cast", "Unsqueeze", "Reshape", "Identity", "Flatten") and node.input[0] in frontier:
                nxt.update(o for o in node.output if o not in seen)
        seen |= frontier
        frontier = nxt
    return 100


def make_inputs(model, n, seed):
    rng = np.random.default_rng(seed)
    out = {}
    for value in real_inputs(model):
        t = value.type.tensor_type
        dims = []
        for i, d in enumerate(t.shape.dim):
            if i == 0:
                dims.append(n)  # samples: a fixed batch size (1) is the tool's business
            else:
                dims.append(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else SEQ)
        dtype = helper.tensor_dtype_to_np_dtype(t.elem_type)
        low = value.name.lower()
        if np.issubdtype(dtype, np.integer):
            if "mask" in low:
                arr = np.ones(dims, dtype)
                if arr.ndim >= 2:
                    arr[1::2, -max(1, dims[1] // 4):] = 0
            elif "type" in low or "segment" in low:
                arr = np.zeros(dims, dtype)
            else:
                arr = rng.integers(5, max(6, vocab_size(model, value.name)), dims).astype(dtype)
        else:
            arr = rng.standard_normal(dims).astype(dtype)
        out[value.name] = arr
    return out


def teacher_labels(dense_path, feeds):
    """The dense model's argmax class per feed when its first float output is (N, C), else (None, None)."""
    import onnxruntime as ort  # the training package's inference session

    sess = ort.InferenceSession(str(dense_path), providers=["CPUExecutionProvider"])
    labels = []
    scope = {"np": np}
    exec(RUN_ANY_BATCH, scope)
    for feed in feeds:
        outs = [np.array([list(r.values()) for r in o]) if isinstance(o, list) else np.asarray(o)
                for o in scope["run_any_batch"](sess, feed)]
        scores = next(o for o in outs if o.dtype.kind == "f")
        if scores.ndim != 2 or len(scores) != len(next(iter(feed.values()))):
            return None, None
        labels.append(scores.argmax(-1).astype(np.int64))
    return labels


def write_data(path, model, train, test, form, dense_path, labels="none"):
    if form == "names":
        # Keyed by input name, the evaluation arrays as test/NAME (issue 12's form).
        arrays = {**train, **{f"test/{k}": v for k, v in test.items()}}
        if labels == "teacher":
            y_train, y_test = teacher_labels(dense_path, (train, test))
            if y_train is not None:  # class scores (N, C) only; other outputs go without labels
                arrays["labels"], arrays["test/labels"] = y_train, y_test
        np.savez(path, **arrays)
        return
    (name,) = list(train)
    y_train, y_test = teacher_labels(dense_path, (train, test))
    if y_train is None:
        raise ValueError("the first float output is not (N, C) class scores")
    np.savez(path, x_train=train[name], y_train=y_train, x_test=test[name], y_test=y_test)


def exporter_of(model):
    prod = f"{model.producer_name} {model.producer_version}".strip()
    if model.producer_name == "pytorch":
        kind = "torch dynamo" if "+" in model.producer_version or any(
            n.name.startswith("node_") for n in model.graph.node[:20]) else "torch TorchScript"
        return f"{kind} {model.producer_version}"
    return prod or "?"


def sparsity_of(path):
    model = onnx.load(str(path))
    zeros = total = 0
    for t in model.graph.initializer:
        if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) >= 2:
            a = numpy_helper.to_array(t)
            zeros += int((a == 0).sum())
            total += a.size
    return zeros / max(total, 1)


def reason_of(stderr):
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    for ln in lines:
        if ln.startswith("error:"):
            return ln[:300]
    return (lines[-1][:300] if lines else "no output")


def run_one(model_path, out_dir, args, extra):
    name = model_path.stem
    model = onnx.load(str(model_path), load_external_data=False)
    row = {"model": name, "exporter": exporter_of(model), "ir": model.ir_version,
           "opset": max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0),
           "inputs": len(real_inputs(model))}
    work = out_dir / name
    work.mkdir(parents=True, exist_ok=True)
    for f in work.iterdir():
        if f.is_file():
            f.unlink()
    train = make_inputs(model, args.samples, 0)
    test = make_inputs(model, args.test_samples, 1)
    data = work / "data.npz"
    form = args.form
    try:
        write_data(data, model, train, test, form, model_path, args.labels)
    except Exception as exc:  # noqa: BLE001
        row.update(result="data", reason=f"runner could not make {form} data: {exc}")
        return row
    np.savez(work / "feed.npz", **test)
    out = work / f"{name}.pruned.onnx"
    cmd = [args.admm, "prune", str(model_path), "-d", str(data), "-o", str(out), "--sparsity", str(args.sparsity),
           "--report", str(work / "report.json"), "-q", *extra]
    row["command"] = " ".join(cmd)
    t = time.time()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        row.update(result="timeout", seconds=round(time.time() - t, 1), reason=f"over {args.timeout} s")
        return row
    row["seconds"] = round(time.time() - t, 1)
    (work / "stderr.txt").write_text(proc.stderr)
    if proc.returncode != 0:
        row.update(result="prune failed", returncode=proc.returncode, reason=reason_of(proc.stderr))
        return row
    row["sparsity"] = round(sparsity_of(out), 4)
    job = work / "check.json"
    job.write_text(json.dumps({"dense": str(model_path), "pruned": str(out), "feed": str(work / "feed.npz")}))
    script = work / "check_ort.py"
    script.write_text(CHECK)
    chk = subprocess.run([args.ort_python, str(script), str(job)], capture_output=True, text=True, timeout=600)
    if chk.returncode != 0:
        row.update(result="ort failed", reason=reason_of(chk.stderr))
        return row
    res = json.loads(chk.stdout.strip().splitlines()[-1])
    row["ort"] = res["ort"]
    row["outputs"] = res["outputs"]
    if not (res["inputs_same"] and res["outputs_same"]):
        row.update(result="signature changed", reason=json.dumps(res["signature"])[:300])
        return row
    bad = [k for k, v in res["outputs"].items() if v.get("finite") is False]
    row.update(result="ok" if not bad else "non-finite output", reason=", ".join(bad))
    return row


def fidelity(row):
    parts = []
    for name, info in (row.get("outputs") or {}).items():
        if "cosine" in info:
            s = f"{name}: cos {info['cosine']:.3f}"
            if "top1_agree" in info:
                s += f", top-1 agree {info['top1_agree']:.2f}"
            parts.append(s)
    return "; ".join(parts[:2])


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = list(QUICK)
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", help="model stems to run (default: every *.onnx in --zoo)")
    ap.add_argument("--zoo", default="/tmp/zoo")
    ap.add_argument("--out", default="/tmp/zoo-run")
    ap.add_argument("--form", choices=["names", "xy"], default="names")
    ap.add_argument("--labels", choices=["none", "teacher"], default="none",
                    help="with --form names: no labels (distillation), or the dense model's argmax as labels")
    ap.add_argument("--samples", type=int, default=16, help="training samples made per model")
    ap.add_argument("--test-samples", type=int, default=8)
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--timeout", type=int, default=900)
    ap.add_argument("--admm", default=str(Path(sys.executable).with_name("admm-onnx")))
    ap.add_argument("--ort-python", default=default_ort_python())
    ap.add_argument("--json", default=None, help="results file (default OUT/zoo.json)")
    args = ap.parse_args(argv)
    zoo, out_dir = Path(args.zoo), Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    models = sorted(p for p in zoo.glob("*.onnx") if not args.names or p.stem in args.names)
    if args.names:  # in the order given
        models.sort(key=lambda p: args.names.index(p.stem))
    rows = []
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    load = os.getloadavg()
    for path in models:
        row = run_one(path, out_dir, args, extra)
        rows.append(row)
        print(f"{row['model']}: {row['result']} ({row.get('seconds', '-')} s) {row.get('reason', '')} "
              f"{fidelity(row)}", flush=True)
        result = {"started": started, "load_before": load, "load_after": os.getloadavg(),
                  "machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
                  "extra_options": extra, "form": args.form, "labels": args.labels, "samples": args.samples,
                  "rows": rows}
        Path(args.json or out_dir / "zoo.json").write_text(json.dumps(result, indent=1))  # after every model
    print("\n| model | exporter | IR/opset | inputs | result | time (s) | fidelity / reason |")
    print("|---|---|---|---|---|---:|---|")
    for r in rows:
        what = fidelity(r) if r["result"] == "ok" else r.get("reason", "")
        print(f"| {r['model']} | {r['exporter']} | {r['ir']}/{r['opset']} | {r['inputs']} | {r['result']} | "
              f"{r.get('seconds', '-')} | {what.replace('|', '/')} |")
    ok = sum(r["result"] == "ok" for r in rows)
    print(f"\n{ok} of {len(rows)} pruned and loaded in onnxruntime with unchanged signatures")
    return 0 if ok == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
