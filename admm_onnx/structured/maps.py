"""What a rule returns: index maps (channel origins, member slices, couplings, node fixes) or
the reason it cannot prove that removing channels is safe.

Channels are tracked as *atoms*: every output channel of every prunable producer (Conv,
ConvTranspose, Gemm, MatMul with a constant weight) gets an integer id. A tensor that carries
pruned channels has an :class:`Origin`: its channel axis and, for each position along it, the
atom it comes from (-1: a channel no producer can remove, e.g. one from a graph input).
Index maps are therefore plain NumPy operations on atom arrays: concatenation (Concat), slices
(Split), ``np.repeat`` (depthwise multiplier, Flatten/Reshape block maps) - so ``concat(x, x)``
and offsets are right by construction.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

import numpy as np


@dataclass
class Origin:
    """Channel axis of a tensor and the atom of each position on it (-1: not removable)."""

    axis: int
    atoms: np.ndarray

    def __post_init__(self):
        self.atoms = np.asarray(self.atoms, dtype=np.int64)

    @property
    def tracked(self) -> bool:
        return bool((self.atoms >= 0).any())


@dataclass
class Slice:
    """Initializer positions along ``axis`` that move with channels: position p goes with atom
    ``atoms[p]`` (-1: stays). ``stat``: not a trained parameter (BatchNorm running statistics)."""

    init: str
    axis: int
    atoms: np.ndarray
    stat: bool = False

    def __post_init__(self):
        self.atoms = np.asarray(self.atoms, dtype=np.int64)


@dataclass
class Macs:
    """Multiply-accumulates of one node at batch 1 and the positions they scale with:
    macs(kept) = full * kept(out)/len(out) * kept(in)/len(in)."""

    node: str
    full: int
    out: Optional[np.ndarray] = None
    inp: Optional[np.ndarray] = None


#: A node rewrite applied by shrink: fix(model, node, kept) where ``kept(atoms)`` returns a
#: boolean array (True for kept positions and for -1).
Fix = Callable[..., None]


@dataclass
class Mapping:
    """A rule's answer when it can prove safety."""

    outputs: dict = field(default_factory=dict)  # output tensor name -> Origin
    members: List[Slice] = field(default_factory=list)
    couple: List[Tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    #: atoms that must stay (with the reason), while the rest of the node is fine
    blocks: List[Tuple[np.ndarray, str]] = field(default_factory=list)
    fixes: List[Fix] = field(default_factory=list)
    macs: List[Macs] = field(default_factory=list)
    #: atom arrays whose channels may form separate groups (the outputs of a channel Split)
    cuts: List[List[np.ndarray]] = field(default_factory=list)


@dataclass
class Blocked:
    """A rule's answer when it cannot prove safety: every channel reaching the node stays."""

    reason: str
