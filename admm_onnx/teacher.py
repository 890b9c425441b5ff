"""The dense model as teacher: its outputs added to every feed, for distillation and fidelity.

:class:`Teacher` runs the training copy of the user's model with its original weights in an
ORT ``InferenceSession`` (the same function the student starts from). :func:`with_teacher`
adds the teacher's value of every selected output to a reader's feeds under
:func:`~admm_onnx.losses.teacher_name`:

- an in-memory :class:`~admm_onnx.data.ArrayReader` built by admm-onnx gets the teacher's
  outputs for all its rows once (cached as more arrays: shuffling and batching carry them),
  when they take at most :data:`CACHE_BYTES`;
- any other reader is wrapped: the teacher runs on each batch as it is read.
"""
from __future__ import annotations

import logging
from typing import Dict, Optional, Sequence

import numpy as np
import onnx

from .data import ArrayReader, WrappedReader
from .feeds import VALID, model_feed
from .losses import teacher_name

log = logging.getLogger(__name__)

#: Teacher outputs cached per reader up to this many bytes; beyond, computed per batch.
CACHE_BYTES = 512 * 2**20


class Teacher:
    """The dense model's selected ``outputs`` for a feed."""

    def __init__(self, model: onnx.ModelProto, outputs: Sequence[str]):
        from .pipeline import _session

        self.outputs = list(outputs)
        self.session = _session(model)
        self.inputs = [i.name for i in self.session.get_inputs()]
        #: The batch size the model's inputs fix (zoo models often have 1), else None.
        dims = {i.shape[0] for i in self.session.get_inputs() if i.shape and isinstance(i.shape[0], int)}
        self.fixed_batch = dims.pop() if len(dims) == 1 else None

    def run(self, feed: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        feed = model_feed(feed, self.inputs)
        rows = len(next(iter(feed.values()))) if feed else 0
        fixed = self.fixed_batch
        if not fixed or rows == fixed:
            values = self.session.run(self.outputs, feed)
            return {teacher_name(o): np.asarray(v) for o, v in zip(self.outputs, values)}
        # a fixed batch: run the rows in pieces of that size, the last one padded with its first row
        parts = []
        for start in range(0, rows, fixed):
            piece = {k: a[start:start + fixed] for k, a in feed.items()}
            n = len(next(iter(piece.values())))
            if n < fixed:
                piece = {k: np.concatenate([a, np.repeat(a[:1], fixed - n, axis=0)]) for k, a in piece.items()}
            parts.append([np.asarray(v)[:n] for v in self.session.run(self.outputs, piece)])
        return {teacher_name(o): np.concatenate([p[i] for p in parts]) for i, o in enumerate(self.outputs)}


class TeacherReader(WrappedReader):
    """``reader``'s feeds plus the teacher's outputs, computed batch by batch."""

    def __init__(self, reader, teacher: Teacher):
        super().__init__(reader)
        self.teacher = teacher

    def transform(self, feed):
        if all(teacher_name(o) in feed for o in self.teacher.outputs):
            return feed
        return {**feed, **self.teacher.run(feed)}


def with_teacher(reader, teacher: Optional[Teacher]):
    """``reader`` whose feeds carry the teacher's outputs (see the module docstring)."""
    if reader is None or teacher is None:
        return reader
    if isinstance(reader, TeacherReader) or getattr(reader, "teacher", None) is teacher:
        return reader
    if isinstance(reader, ArrayReader) and getattr(reader, "fitted", False) and not reader.pad_last:
        if _cache(reader, teacher):
            return reader
    return TeacherReader(reader, teacher)


def _cache(reader: ArrayReader, teacher: Teacher) -> bool:
    """Add the teacher's outputs for every row of ``reader`` as arrays; False if too large."""
    rows = reader._rows
    chunk = max(1, min(rows, reader.batch_size * 4))
    first = teacher.run({k: a[:chunk] for k, a in reader.arrays.items()})
    per_row = sum(v.nbytes for v in first.values()) / max(1, chunk)
    if per_row * rows > CACHE_BYTES or any(v.shape[:1] != (chunk,) for v in first.values()):
        return False
    parts = {k: [v] for k, v in first.items()}
    for start in range(chunk, rows, chunk):
        for k, v in teacher.run({k: a[start:start + chunk] for k, a in reader.arrays.items()}).items():
            parts[k].append(v)
    reader.arrays.update({k: np.concatenate(v) for k, v in parts.items()})
    reader.teacher = teacher
    return True
