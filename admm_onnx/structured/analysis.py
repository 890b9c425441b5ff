"""Channel-dependency analysis: which initializer slices must go together with each prunable
producer's output channel.

One pass over the nodes in topological order runs each node's rule (rules/, an op-type
registry). Rules give index maps on *atoms* (one per producer output channel, see maps.py):
member slices of initializers, couplings between atoms (residual Add, SE Mul, Concat on another
axis), node fixes for shrink, MACs. Then:

- atoms coupled by a rule are one *channel* (union-find);
- channels of one producer, or coupled across producers, form one *group*: one channel budget
  k, one index space 0..n-1 (a channel Split cuts its input's space into separate groups);
- a group is *blocked* (never pruned) when any of its channels reaches a graph output, a
  channel-mixing op, a dynamic shape, or an op without a rule; the reasons are kept.

The result, :class:`ChannelAnalysis`, lists the groups with their member slices (initializer,
axis, position -> channel index) and counts MACs (batch 1) and parameters for any keep set.
"""
from __future__ import annotations

import fnmatch
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Dict, List, Mapping as TMapping, Optional, Sequence, Tuple

import numpy as np
import onnx

from ..errors import ModelError
from ..graph.analysis import subgraph_reads

from .graph import GraphView
from .maps import Blocked, Macs, Mapping, Origin, Slice
from .rules import PRODUCERS, rule_for


class _UnionFind:
    def __init__(self):
        self.parent: List[int] = []

    def add(self, n: int) -> np.ndarray:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return np.arange(start, start + n, dtype=np.int64)

    def find(self, a: int) -> int:
        p = self.parent
        root = a
        while p[root] != root:
            root = p[root]
        while p[a] != root:
            p[a], a = root, p[a]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(int(a)), self.find(int(b))
        if ra != rb:
            if ra < rb:
                self.parent[rb] = ra
            else:
                self.parent[ra] = rb


@dataclass
class Member:
    """Slices of one initializer along one axis that belong to a group: position ``positions[i]``
    goes with the group's channel ``channels[i]``."""

    init: str
    axis: int
    positions: np.ndarray
    channels: np.ndarray
    stat: bool = False


@dataclass
class Group:
    """Channels that are removed together, with one budget."""

    id: int
    name: str
    producers: List[str]
    size: int
    members: List[Member] = field(default_factory=list)
    blocked: List[str] = field(default_factory=list)

    @property
    def prunable(self) -> bool:
        return not self.blocked and self.size > 1 and bool(self.members)


@dataclass
class ChannelAnalysis:
    """What :func:`analyse` found; counts need the model's initializer shapes (kept here)."""

    groups: List[Group]
    #: (initializer, axis) -> per position (group id, channel) or (-1, -1)
    slots: Dict[Tuple[str, int], np.ndarray]
    #: node index in model.graph.node -> fixes for shrink, with the atom -> (group, channel) map
    fixes: List[Tuple[int, object]]
    atom_channel: np.ndarray  # atom -> (group, channel)
    macs: List[Macs]
    init_shapes: Dict[str, Tuple[int, ...]]
    init_itemsize: Dict[str, int]
    cuts: List[List[np.ndarray]] = field(default_factory=list)

    # -- keep sets -------------------------------------------------------------------
    def full_keep(self) -> Dict[int, np.ndarray]:
        return {g.id: np.arange(g.size) for g in self.groups}

    def kept_atoms(self, keep: TMapping[int, Sequence[int]]):
        """A function atoms -> bool (True: kept, or -1) for the keep set ``keep``
        (group id -> kept channel indices; groups not named keep everything)."""
        masks = {}
        for g in self.groups:
            m = np.ones(g.size, bool)
            if g.id in keep:
                m[:] = False
                m[np.asarray(keep[g.id], dtype=np.int64)] = True
            masks[g.id] = m
        gc = self.atom_channel
        flat = np.ones(len(gc), bool)
        for i, (g, c) in enumerate(gc):
            if g >= 0:
                flat[i] = masks[g][c]

        def kept(atoms: np.ndarray) -> np.ndarray:
            atoms = np.asarray(atoms, dtype=np.int64)
            out = np.ones(atoms.shape, bool)
            sel = atoms >= 0
            out[sel] = flat[atoms[sel]]
            return out

        return kept

    def position_keep(self, keep) -> Dict[Tuple[str, int], np.ndarray]:
        """(initializer, axis) -> boolean mask of the kept positions."""
        masks = {g.id: np.ones(g.size, bool) for g in self.groups}
        for gid, idx in keep.items():
            masks[gid][:] = False
            masks[gid][np.asarray(idx, dtype=np.int64)] = True
        out = {}
        for key, slot in self.slots.items():
            m = np.ones(len(slot), bool)
            for p, (g, c) in enumerate(slot):
                if g >= 0:
                    m[p] = masks[g][c]
            out[key] = m
        return out

    # -- counts ------------------------------------------------------------------------
    def counts(self, keep: Optional[TMapping[int, Sequence[int]]] = None) -> Dict[str, int]:
        """MACs (batch 1, prunable ops), parameters and bytes of all initializers for a keep set."""
        keep = keep or {}
        kept = self.kept_atoms(keep)
        macs = 0.0
        for m in self.macs:
            f = float(m.full)
            if m.out is not None and len(m.out):
                f *= kept(m.out).sum() / len(m.out)
            if m.inp is not None and len(m.inp):
                f *= kept(m.inp).sum() / len(m.inp)
            macs += f
        pos = self.position_keep(keep)
        params = 0
        nbytes = 0
        per_init = defaultdict(dict)
        for (name, axis), m in pos.items():
            per_init[name][axis] = int(m.sum())
        for name, shape in self.init_shapes.items():
            dims = list(shape)
            for axis, n in per_init.get(name, {}).items():
                dims[axis] = n
            size = int(np.prod(dims, dtype=np.int64)) if dims else 1
            params += size
            nbytes += size * self.init_itemsize[name]
        return {"macs": int(round(macs)), "params": params, "bytes": nbytes}

    def group_counts(self, group: Group) -> Dict[str, int]:
        """MACs and parameters that scale with ``group``'s channels (touched by it)."""
        atoms = {i for i, (g, _) in enumerate(self.atom_channel) if g == group.id}
        macs = 0
        for m in self.macs:
            if any(a in atoms for arr in (m.out, m.inp) if arr is not None for a in arr.tolist()):
                macs += m.full
        params = sum(int(np.prod(self.init_shapes[n], dtype=np.int64)) for n in {mb.init for mb in group.members})
        return {"macs": macs, "params": params}

    def select(self, patterns: Sequence[str]) -> List[Group]:
        return [g for g in self.groups if any(fnmatch.fnmatchcase(g.name, p) for p in patterns)]

    @property
    def prunable(self) -> List[Group]:
        return [g for g in self.groups if g.prunable]


class _Analyzer:
    def __init__(self, model: onnx.ModelProto):
        self.view = GraphView(model)
        self.model = model
        self.uf = _UnionFind()
        self.links = _UnionFind()
        self.space_of: List[int] = []  # atom -> space index
        self.spaces: List[Tuple[str, int]] = []  # (producer node name, start atom)
        self.origins: Dict[str, Origin] = {}
        self.slots: Dict[Tuple[str, int], np.ndarray] = {}
        self.stat: Dict[Tuple[str, int], bool] = {}
        self.blocks: Dict[int, List[str]] = defaultdict(list)
        self.fixes: List[Tuple[int, object]] = []
        self.macs: List[Macs] = []
        self.cuts: List[List[np.ndarray]] = []

    def new_space(self, node: onnx.NodeProto, n: int) -> np.ndarray:
        atoms = self.uf.add(n)
        self.links.add(n)
        for a in atoms[1:]:
            self.links.union(a - 1, a)
        self.spaces.append((node.name or node.output[0], int(atoms[0]) if n else -1))
        self.space_of.extend([len(self.spaces) - 1] * n)
        return atoms

    def _block(self, atoms, reason: str) -> None:
        for a in np.unique(np.asarray(atoms, dtype=np.int64)):
            if a >= 0:
                self.blocks[int(a)].append(reason)

    def run(self) -> ChannelAnalysis:
        view = self.view
        index = {id(n): i for i, n in enumerate(self.model.graph.node)}
        for node in view.nodes:
            for name in subgraph_reads(node):  # If/Loop/Scan bodies read outer values by name
                o = self.origins.get(name)
                if o is not None and o.tracked:
                    self._block(o.atoms, f"read inside a subgraph of {node.op_type} {node.name or node.output[0]!r}")
            ins = [self.origins.get(name) if name else None for name in node.input]
            ins = [o if o is not None and o.tracked else None for o in ins]
            if not any(o is not None for o in ins) and node.op_type not in PRODUCERS:
                continue
            result = rule_for(node.op_type, node.domain)(node, ins, self)
            if isinstance(result, Blocked):
                for o in ins:
                    if o is not None:
                        self._block(o.atoms, result.reason)
                continue
            self._apply(node, result, index[id(node)])
        for name in view.graph_outputs:
            o = self.origins.get(name)
            if o is not None:
                self._block(o.atoms, f"reaches graph output {name!r}")
        return self._finish()

    def _apply(self, node, res: Mapping, node_index: int) -> None:
        for name, o in res.outputs.items():
            if o is not None and o.tracked:
                self.origins[name] = o
        for s in res.members:
            key = (s.init, s.axis % max(1, len(self.view.shape(s.init) or [0])))
            old = self.slots.get(key)
            if old is None:
                self.slots[key] = s.atoms.copy()
            else:
                both = (old >= 0) & (s.atoms >= 0)
                for a, b in zip(old[both], s.atoms[both]):
                    self.uf.union(a, b)
                self.slots[key] = np.where(old >= 0, old, s.atoms)
            self.stat[key] = s.stat
        for a, b in res.couple:
            for u, v in zip(np.asarray(a).tolist(), np.asarray(b).tolist()):
                self.uf.union(u, v)
        for atoms, reason in res.blocks:
            self._block(atoms, reason)
        for fix in res.fixes:
            self.fixes.append((node_index, fix))
        self.macs.extend(res.macs)
        self.cuts.extend(res.cuts)

    def _finish(self) -> ChannelAnalysis:
        n_atoms = len(self.uf.parent)
        # Split outputs cut their producer's space: drop the links across the cut.
        cut_pairs = set()
        for parts in self.cuts:
            for left, right in zip(parts[:-1], parts[1:]):
                if len(left) and len(right):
                    cut_pairs.add((int(left[-1]), int(right[0])))
        links = _UnionFind()
        links.add(n_atoms)
        for a in range(1, n_atoms):
            if self.space_of[a] == self.space_of[a - 1] and (a - 1, a) not in cut_pairs:
                links.union(a - 1, a)
        for a in range(n_atoms):
            links.union(a, self.uf.find(a))
        # groups in atom order; channels = coupled atom classes, numbered in first-seen order
        group_of_root: Dict[int, int] = {}
        atom_channel = np.full((n_atoms, 2), -1, np.int64)
        channel_of: Dict[int, Tuple[int, int]] = {}
        sizes: List[int] = []
        producers: List[List[str]] = []
        blocked: List[List[str]] = []
        for a in range(n_atoms):
            groot = links.find(a)
            if groot not in group_of_root:
                group_of_root[groot] = len(sizes)
                sizes.append(0)
                producers.append([])
                blocked.append([])
            gid = group_of_root[groot]
            croot = self.uf.find(a)
            if croot not in channel_of:
                channel_of[croot] = (gid, sizes[gid])
                sizes[gid] += 1
            atom_channel[a] = channel_of[croot]
            space = self.spaces[self.space_of[a]][0]
            if space not in producers[gid]:
                producers[gid].append(space)
            for r in self.blocks.get(a, ()):
                if r not in blocked[gid]:
                    blocked[gid].append(r)
        # members per group
        members: List[List[Member]] = [[] for _ in sizes]
        slots = {}
        for key, atoms in self.slots.items():
            gc = np.full((len(atoms), 2), -1, np.int64)
            sel = atoms >= 0
            gc[sel] = atom_channel[atoms[sel]]
            slots[key] = gc
            for gid in np.unique(gc[sel, 0]):
                pos = np.flatnonzero(gc[:, 0] == gid)
                members[gid].append(Member(key[0], key[1], pos, gc[pos, 1], self.stat.get(key, False)))
        # A Split whose outputs end up in one group would have to cut them together: block.
        for parts in self.cuts:
            seen = {}
            for j, p in enumerate(parts):
                for g in {int(atom_channel[a, 0]) for a in p.tolist()}:
                    if seen.setdefault(g, j) != j and "Split outputs share one channel budget" not in blocked[g]:
                        blocked[g].append("Split outputs share one channel budget")
        groups = []
        for gid, n in enumerate(sizes):
            names = producers[gid]
            name = names[0] if len(names) == 1 else f"{names[0]}+{len(names) - 1}"
            groups.append(Group(gid, name, names, n, members[gid], blocked[gid]))
        inits = self.model.graph.initializer
        shapes = {t.name: tuple(int(d) for d in t.dims) for t in inits}
        itemsize = {t.name: onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize for t in inits}
        return ChannelAnalysis(groups, slots, self.fixes, atom_channel, self.macs, shapes, itemsize, self.cuts)


def analyse(model: onnx.ModelProto) -> ChannelAnalysis:
    """Channel groups of ``model`` (read-only). A graph whose shapes contradict its ops (a Conv
    weight of rank 1, say) is a :class:`ModelError`."""
    try:
        return _Analyzer(model).run()
    except (IndexError, ValueError, TypeError, KeyError, ZeroDivisionError) as exc:
        raise ModelError(f"the channel analysis cannot follow this graph: {type(exc).__name__}: {exc}",
                         hint="check the model with onnx.checker.check_model(model, full_check=True)") from None
