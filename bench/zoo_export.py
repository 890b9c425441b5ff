"""Export a held-out-like zoo of real models to ONNX (default: /tmp/zoo), for bench/zoo_run.py.

Never a dependency of admm-onnx: run it in a separate venv with the exporting libraries.

    python3 -m venv /work/venvs/torch
    /work/venvs/torch/bin/pip install torch==2.13.0 "onnx<1.18" onnxscript transformers skl2onnx \
        scikit-learn huggingface-hub pyyaml safetensors
    /work/venvs/torch/bin/pip install --no-deps timm     # timm's torchvision dependency: see below
    /work/venvs/torch/bin/python bench/zoo_export.py [--out /tmp/zoo] [NAME ...]

    python3 -m venv /work/venvs/tf && /work/venvs/tf/bin/pip install tensorflow-cpu tf2onnx "onnx<1.18"
    /work/venvs/tf/bin/python bench/zoo_export.py --tf [--out /tmp/zoo]

Nothing is downloaded: every model is built from its library's own architecture code with
random weights (seeded). timm CNNs and ViTs are full size (224x224 inputs); Hugging Face
encoders use their real architecture with a small config (2 layers, hidden 128, BERT's 30,522
token vocabulary) so that pruning runs take minutes on 2 cores. Each export uses the
exporter's defaults as a user would call it (``torch.onnx.export(model, args, path)`` is the
dynamo exporter in torch 2.13; ``dynamo=False`` is the TorchScript one), with a dynamic batch
axis (and sequence axis for text). A README.txt describing every file is written beside them.
timm imports torchvision, whose only wheel here does not load beside the CPU torch; its model
code does not need it, so the stand-in of tests/fixtures/make_zoo_fixtures.py is used.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
#: name -> one line for README.txt (filled by the exporters as they run)
DESCRIPTIONS = {}
SEQ = 32


def _torch_setup():
    sys.path.insert(0, os.path.join(HERE, "..", "tests", "fixtures"))
    import make_zoo_fixtures  # noqa: F401  (installs the torchvision stand-in, seeds helpers)

    return make_zoo_fixtures


def _finish(path, what):
    import onnx

    model = onnx.load(path, load_external_data=False)
    onnx.checker.check_model(path)
    size = os.path.getsize(path) + sum(
        os.path.getsize(os.path.join(os.path.dirname(path), f)) for f in os.listdir(os.path.dirname(path))
        if f.startswith(os.path.basename(path) + ".") or f == os.path.basename(path) + ".data")
    opset = max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    sig = lambda vs: ", ".join(f"{v.name}{_shape(v)}" for v in vs)  # noqa: E731
    inits = {t.name for t in model.graph.initializer}
    line = (f"{os.path.basename(path)}: {what}; IR {model.ir_version}, opset {opset}, {size / 1e6:.1f} MB; "
            f"inputs {sig([i for i in model.graph.input if i.name not in inits])} -> outputs {sig(model.graph.output)}")
    DESCRIPTIONS[os.path.basename(path)] = line
    print(line, flush=True)


def _shape(value):
    from onnx import helper

    t = value.type.tensor_type if value.type.HasField("tensor_type") else None
    if t is None:
        return f" ({value.type.WhichOneof('value')})"
    dims = [d.dim_param or str(d.dim_value) if (d.HasField("dim_value") or d.dim_param) else "?" for d in t.shape.dim]
    return f" {helper.tensor_dtype_to_np_dtype(t.elem_type).name}[{','.join(dims)}]"


# -- torch exporters ---------------------------------------------------------------------------
def export(model, args, path, input_names, output_names, dynamic, what, dynamo, external=False):
    """``dynamic``: name -> {axis: symbol} (TorchScript ``dynamic_axes``); the dynamo exporter
    gets the same axes as ``dynamic_shapes`` keyed by the forward's argument names."""
    import torch

    model.eval()
    if dynamo:
        shapes = tuple({ax: torch.export.Dim.DYNAMIC for ax in dynamic.get(n, {})} or None for n in input_names)
        torch.onnx.export(model, args, path, input_names=input_names, output_names=output_names,
                          dynamic_shapes=shapes, external_data=external)
    else:
        torch.onnx.export(model, args, path, dynamo=False, input_names=input_names, output_names=output_names,
                          dynamic_axes=dynamic, opset_version=17)
    _finish(path, what + (" (dynamo exporter" if dynamo else " (TorchScript exporter") +
            (", external data)" if external else ")"))


def timm_model(name, out, dynamo=False, external=False, file=None, **kw):
    import timm
    import torch

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kw)
    size = model.pretrained_cfg.get("input_size", (3, 224, 224))
    x = torch.randn(2, *size)
    axes = {"image": {0: "batch"}, "logits": {0: "batch"}}
    path = os.path.join(out, file or f"timm_{name}.onnx")
    export(model, (x,), path, ["image"], ["logits"], axes, f"timm {name}, random init, {size}", dynamo, external)


def _logits_wrappers():
    """transformers models returning their logits tensor, with named arguments (the dynamo
    exporter's ``dynamic_shapes`` follow the forward's signature)."""
    import torch.nn as nn

    class Logits3(nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).logits

    class Logits2(Logits3):
        def forward(self, input_ids, attention_mask):
            return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    return Logits3, Logits2


def hf_text(kind, out, dynamo=False):
    import torch
    import transformers as tr

    fx = _torch_setup()
    Logits3, Logits2 = _logits_wrappers()
    torch.manual_seed(0)
    small = dict(vocab_size=30522, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=512, max_position_embeddings=512)
    three = ["input_ids", "attention_mask", "token_type_ids"]
    two = three[:2]
    if kind == "bert_seqcls":
        model, names, outs = tr.BertForSequenceClassification(tr.BertConfig(num_labels=3, **small)), three, ["logits"]
        what = "transformers BertForSequenceClassification (2 layers, hidden 128, 3 labels)"
    elif kind == "bert_tokcls":
        model, names, outs = tr.BertForTokenClassification(tr.BertConfig(num_labels=9, **small)), three, ["logits"]
        what = "transformers BertForTokenClassification (2 layers, hidden 128, 9 labels: NER-shaped)"
    elif kind == "distilbert_seqcls":
        cfg = tr.DistilBertConfig(vocab_size=30522, dim=128, n_layers=2, n_heads=2, hidden_dim=512, num_labels=2)
        model, names, outs = tr.DistilBertForSequenceClassification(cfg), two, ["logits"]
        what = "transformers DistilBertForSequenceClassification (2 layers, dim 128, 2 labels)"
    elif kind == "roberta_seqcls":
        cfg = tr.RobertaConfig(num_labels=2, **{**small, "vocab_size": 50265, "max_position_embeddings": 514})
        model, names, outs = tr.RobertaForSequenceClassification(cfg), two, ["logits"]
        what = "transformers RobertaForSequenceClassification (2 layers, hidden 128, vocab 50,265; position ids from a CumSum of the mask)"
    elif kind == "minilm_embedding":
        cfg = tr.BertConfig(**{**small, "hidden_size": 384, "num_attention_heads": 12, "intermediate_size": 1536})
        model = fx.MeanPooled(tr.BertModel(cfg, add_pooling_layer=False))
        names, outs = two, ["sentence_embedding"]
        what = "sentence embedding: transformers BertModel (all-MiniLM-L6-v2 widths, 2 layers) + mask mean pooling + L2 normalise"
    else:
        raise ValueError(kind)
    model.eval()
    wrapped = model if kind == "minilm_embedding" else (Logits3 if len(names) == 3 else Logits2)(model)
    ids = torch.randint(5, 1000, (2, SEQ))
    mask = torch.ones(2, SEQ, dtype=torch.int64)
    mask[1, SEQ // 2:] = 0
    feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros(2, SEQ, dtype=torch.int64)}
    axes = {n: {0: "batch", 1: "sequence"} for n in names}
    axes[outs[0]] = {0: "batch", 1: "sequence"} if kind == "bert_tokcls" else {0: "batch"}
    path = os.path.join(out, f"hf_{kind}{'_dynamo' if dynamo else ''}.onnx")
    export(wrapped, tuple(feeds[n] for n in names), path, names, outs, axes, what, dynamo)


def segmentation(out):
    """A small U-Net: (N, 3, 128, 128) -> per-pixel class scores (N, 5, 128, 128)."""
    import torch
    import torch.nn as nn

    def block(i, o):
        return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(),
                             nn.Conv2d(o, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU())

    class UNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.e1, self.e2, self.e3 = block(3, 16), block(16, 32), block(32, 64)
            self.pool = nn.MaxPool2d(2)
            self.up2 = nn.ConvTranspose2d(64, 32, 2, stride=2)
            self.d2 = block(64, 32)
            self.d1 = block(48, 16)
            self.head = nn.Conv2d(16, 5, 1)

        def forward(self, x):
            a = self.e1(x)
            b = self.e2(self.pool(a))
            c = self.e3(self.pool(b))
            d = self.d2(torch.cat([self.up2(c), b], 1))
            u = nn.functional.interpolate(d, scale_factor=2.0, mode="bilinear", align_corners=False)
            return self.head(self.d1(torch.cat([u, a], 1)))

    torch.manual_seed(0)
    model = UNet()
    path = os.path.join(out, "seg_unet.onnx")
    export(model, (torch.randn(2, 3, 128, 128),), path, ["image"], ["masks"],
           {"image": {0: "batch"}, "masks": {0: "batch"}},
           "segmentation U-Net (ConvTranspose + bilinear Resize + skip Concat), per-pixel scores (N, 5, H, W)", False)


def detection(out):
    """SSD-shaped: a timm resnet18 trunk, per-anchor box deltas and class scores, plus the
    argmax class ids (int64) and the best score, as detection exports often add."""
    import timm
    import torch
    import torch.nn as nn

    class Detector(nn.Module):
        def __init__(self):
            super().__init__()
            self.trunk = timm.create_model("resnet18", pretrained=False, features_only=True, out_indices=(3, 4))
            chans = self.trunk.feature_info.channels()
            self.box = nn.ModuleList(nn.Conv2d(c, 6 * 4, 3, padding=1) for c in chans)
            self.cls = nn.ModuleList(nn.Conv2d(c, 6 * 21, 3, padding=1) for c in chans)

        def forward(self, x):
            boxes, scores = [], []
            for f, b, c in zip(self.trunk(x), self.box, self.cls):
                n = f.shape[0]
                boxes.append(b(f).permute(0, 2, 3, 1).reshape(n, -1, 4))
                scores.append(c(f).permute(0, 2, 3, 1).reshape(n, -1, 21))
            boxes = torch.cat(boxes, 1)
            probs = torch.cat(scores, 1).softmax(-1)
            best, labels = probs[..., 1:].max(-1)
            return boxes, probs, labels + 1, best

    torch.manual_seed(0)
    model = Detector()
    names = ["boxes", "scores", "labels", "best_score"]
    axes = {"image": {0: "batch"}, **{n: {0: "batch"} for n in names}}
    export(model, (torch.randn(2, 3, 320, 320),), os.path.join(out, "det_ssd_resnet18.onnx"), ["image"], names, axes,
           "SSD-shaped detector: timm resnet18 features (strides 16, 32), 6 anchors, boxes (N, A, 4), softmax "
           "scores (N, A, 21), int64 labels, best score", False)


def sklearn_models(out):
    import onnx
    from skl2onnx import to_onnx
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier, MLPRegressor
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = load_digits(return_X_y=True)
    x = x.astype(np.float32)
    made = [
        ("skl_mlp_classifier.onnx", MLPClassifier(hidden_layer_sizes=(128, 64), max_iter=50, random_state=0).fit(x, y),
         "scikit-learn MLPClassifier(128, 64) on digits, skl2onnx to_onnx defaults (label output first, ZipMap)"),
        ("skl_mlp_regressor.onnx",
         MLPRegressor(hidden_layer_sizes=(64,), max_iter=100, random_state=0).fit(x, x[:, :8] / 16.0),
         "scikit-learn MLPRegressor(64), 8 targets, to_onnx defaults"),
        ("skl_scaler_logreg.onnx", make_pipeline(StandardScaler(), LogisticRegression(max_iter=200)).fit(x, y),
         "scikit-learn StandardScaler + LogisticRegression pipeline, to_onnx defaults (label, ZipMap)"),
    ]
    for name, est, what in made:
        model = to_onnx(est, x[:1])
        path = os.path.join(out, name)
        onnx.save(model, path)
        _finish(path, what)


def keras_cnn(out):
    import tensorflow as tf
    import tf2onnx

    tf.random.set_seed(0)
    L = tf.keras.layers
    inp = tf.keras.Input((32, 32, 3), name="image")
    h = L.Conv2D(16, 3, padding="same", activation="relu")(inp)
    h = L.BatchNormalization()(h)
    h = L.MaxPooling2D()(h)
    h = L.DepthwiseConv2D(3, padding="same", activation="relu")(h)
    h = L.Conv2D(32, 1, activation="relu")(h)
    h = L.GlobalAveragePooling2D()(h)
    h = L.Dropout(0.2)(h)
    h = L.Dense(64, activation="relu")(h)
    logits = L.Dense(10, activation="softmax", name="probs")(h)
    model = tf.keras.Model(inp, logits)
    path = os.path.join(out, "tf_keras_cnn.onnx")
    spec = (tf.TensorSpec((None, 32, 32, 3), tf.float32, name="image"),)
    tf2onnx.convert.from_keras(model, input_signature=spec, output_path=path)
    _finish(path, f"Keras CNN (NHWC input, Conv/BN/DepthwiseConv/Dense, softmax), tf2onnx {tf2onnx.__version__}")


TORCH = {
    "timm_resnet18": lambda o: timm_model("resnet18", o),
    "timm_efficientnet_b0": lambda o: timm_model("efficientnet_b0", o),
    "timm_mobilenetv3_large": lambda o: timm_model("mobilenetv3_large_100", o, file="timm_mobilenetv3_large.onnx"),
    "timm_regnetx_002": lambda o: timm_model("regnetx_002", o, dynamo=True),
    "timm_convnext_atto": lambda o: timm_model("convnext_atto", o, dynamo=True),
    "timm_vit_tiny": lambda o: timm_model("vit_tiny_patch16_224", o, file="timm_vit_tiny.onnx"),
    "timm_vit_tiny_dynamo": lambda o: timm_model("vit_tiny_patch16_224", o, dynamo=True, file="timm_vit_tiny_dynamo.onnx"),
    "timm_resnet18_dynamo_ext": lambda o: timm_model("resnet18", o, dynamo=True, external=True,
                                                     file="timm_resnet18_dynamo_ext.onnx"),
    "hf_bert_seqcls": lambda o: hf_text("bert_seqcls", o),
    "hf_bert_seqcls_dynamo": lambda o: hf_text("bert_seqcls", o, dynamo=True),
    "hf_bert_tokcls": lambda o: hf_text("bert_tokcls", o),
    "hf_distilbert_seqcls": lambda o: hf_text("distilbert_seqcls", o),
    "hf_roberta_seqcls": lambda o: hf_text("roberta_seqcls", o),
    "hf_minilm_embedding": lambda o: hf_text("minilm_embedding", o),
    "seg_unet": segmentation,
    "det_ssd_resnet18": detection,
    "sklearn": sklearn_models,
}
TF = {"tf_keras_cnn": keras_cnn}


def hf_extra(kind, out, dynamo=False):
    """More encoder architectures (tiny configs), for --extra."""
    import torch
    import transformers as tr

    torch.manual_seed(0)
    Logits3, Logits2 = _logits_wrappers()
    small = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)
    if kind == "albert":
        model = tr.AlbertForSequenceClassification(tr.AlbertConfig(embedding_size=32, num_labels=2, **small))
    elif kind == "electra":
        model = tr.ElectraForSequenceClassification(tr.ElectraConfig(embedding_size=32, num_labels=2, **small))
    elif kind == "deberta_v2":
        model = tr.DebertaV2ForSequenceClassification(tr.DebertaV2Config(num_labels=2, vocab_size=1000, **small))
    elif kind == "mpnet":
        model = tr.MPNetForSequenceClassification(tr.MPNetConfig(num_labels=2, vocab_size=1000, **small))
    elif kind == "xlm_roberta":
        model = tr.XLMRobertaForSequenceClassification(tr.XLMRobertaConfig(num_labels=2, vocab_size=1000, **small))
    else:
        raise ValueError(kind)
    model.eval()
    ids = torch.randint(5, 900, (2, SEQ))
    mask = torch.ones(2, SEQ, dtype=torch.int64)
    wrapped = Logits2(model)
    path = os.path.join(out, f"hf_{kind}{'_dynamo' if dynamo else ''}.onnx")
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}, "logits": {0: "batch"}}
    export(wrapped, (ids, mask), path, ["input_ids", "attention_mask"], ["logits"], axes,
           f"transformers {type(model).__name__} (tiny config)", dynamo)


EXTRA = {
    "timm_swin_tiny": lambda o: timm_model("swin_tiny_patch4_window7_224", o, file="timm_swin_tiny.onnx"),
    "timm_deit_tiny_dynamo": lambda o: timm_model("deit_tiny_patch16_224", o, dynamo=True, file="timm_deit_tiny_dynamo.onnx"),
    "timm_densenet121": lambda o: timm_model("densenet121", o),
    "timm_inception_v3": lambda o: timm_model("inception_v3", o),
    "timm_levit_128s": lambda o: timm_model("levit_128s", o),
    "timm_mobilevit_xxs": lambda o: timm_model("mobilevit_xxs", o),
    "timm_ghostnet_100": lambda o: timm_model("ghostnet_100", o),
    "timm_resnet50_dynamo": lambda o: timm_model("resnet50", o, dynamo=True, file="timm_resnet50_dynamo.onnx"),
    "hf_albert": lambda o: hf_extra("albert", o),
    "hf_electra": lambda o: hf_extra("electra", o),
    "hf_deberta_v2": lambda o: hf_extra("deberta_v2", o),
    "hf_mpnet": lambda o: hf_extra("mpnet", o),
    "hf_xlm_roberta_dynamo": lambda o: hf_extra("xlm_roberta", o, dynamo=True),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", help="exports to make (default: all of the chosen library set)")
    ap.add_argument("--out", default="/tmp/zoo")
    ap.add_argument("--tf", action="store_true", help="the TensorFlow exports (run in a tensorflow venv)")
    ap.add_argument("--extra", action="store_true", help="more architectures (timm, transformers) beyond the main set")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    table = TF if args.tf else EXTRA if args.extra else TORCH
    if not args.tf:
        _torch_setup()
    failed = []
    for name, make in table.items():
        if args.names and name not in args.names:
            continue
        t = time.time()
        try:
            make(args.out)
            print(f"  ({time.time() - t:.0f} s)", flush=True)
        except Exception:
            traceback.print_exc()
            failed.append(name)
    desc_path = os.path.join(args.out, "descriptions.json")
    known = json.load(open(desc_path)) if os.path.exists(desc_path) else {}
    known.update(DESCRIPTIONS)
    json.dump(known, open(desc_path, "w"), indent=1, sort_keys=True)
    with open(os.path.join(args.out, "README.txt"), "w") as f:
        f.write("Held-out-like zoo of real ONNX exports for admm-onnx, made by bench/zoo_export.py (random\n"
                "weights, nothing downloaded). Run them with bench/zoo_run.py. One line per file:\n\n")
        for name in sorted(known):
            f.write(known[name] + "\n")
    if failed:
        print("failed:", ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
