"""Tables and JSON for channel groups (``admm-onnx groups``) and for a channel-pruning run."""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence

from .analysis import ChannelAnalysis


def _table(header: Sequence[str], rows: List[Sequence[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)] if rows else [len(h) for h in header]
    fmt = lambda cells: "| " + " | ".join(  # noqa: E731
        str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
    ) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([fmt(header), sep] + [fmt(r) for r in rows])


def groups_dict(analysis: ChannelAnalysis) -> Dict[str, object]:
    total = analysis.counts()
    out = []
    for g in analysis.groups:
        c = analysis.group_counts(g)
        out.append({
            "id": g.id, "name": g.name, "producers": g.producers, "channels": g.size,
            "prunable": g.prunable, "blocked": g.blocked,
            "macs": c["macs"], "params": c["params"],
            "macs_share": c["macs"] / total["macs"] if total["macs"] else 0.0,
            "params_share": c["params"] / total["params"] if total["params"] else 0.0,
            "members": [{"initializer": m.init, "axis": m.axis, "positions": len(m.positions)} for m in g.members],
        })
    return {"total": total, "groups": out}


def groups_table(analysis: ChannelAnalysis) -> str:
    """One row per group: channels, MACs and parameters it scales (share of the model), why blocked."""
    data = groups_dict(analysis)
    rows = []
    for g in data["groups"]:
        if not g["members"]:
            continue
        rows.append((
            g["name"], str(g["channels"]), str(len(g["producers"])), str(len(g["members"])),
            f"{100 * g['macs_share']:.1f}%", f"{100 * g['params_share']:.1f}%",
            "yes" if g["prunable"] else "no: " + "; ".join(g["blocked"][:2]) if g["blocked"] else "no: one channel",
        ))
    t = data["total"]
    head = ("Group", "Channels", "Producers", "Slices", "MACs", "Params", "Prunable")
    n_ok = sum(1 for g in data["groups"] if g["prunable"])
    summary = (f"{n_ok} of {len(rows)} groups prunable; model: {t['macs']:,} MACs (batch 1), {t['params']:,} parameters. "
               "MACs/Params: share of the model that scales with the group's channels.")
    return _table(head, rows) + "\n" + summary


def shrink_rows(analysis: ChannelAnalysis, keep: Mapping[int, Sequence[int]]) -> List[Dict[str, object]]:
    """Per pruned group: channels, MACs and parameters before and after."""
    rows = []
    for g in analysis.groups:
        if g.id not in keep or len(keep[g.id]) == g.size:
            continue
        before = analysis.group_counts(g)
        # MACs/params the group touches after: count the model with only this group's keep set
        only = {g.id: keep[g.id]}
        full, after = analysis.counts(), analysis.counts(only)
        rows.append({
            "group": g.name, "channels": g.size, "channels_after": int(len(keep[g.id])),
            "macs": before["macs"], "macs_after": before["macs"] - (full["macs"] - after["macs"]),
            "params": before["params"], "params_after": before["params"] - (full["params"] - after["params"]),
        })
    return rows


def shrink_table(rows: List[Dict[str, object]], total_before: Dict[str, int], total_after: Dict[str, int]) -> str:
    head = ("Group", "Channels", "Kept", "MACs", "MACs after", "Params", "Params after")
    body = [(r["group"], str(r["channels"]), str(r["channels_after"]), f"{r['macs']:,}", f"{r['macs_after']:,}",
             f"{r['params']:,}", f"{r['params_after']:,}") for r in rows]
    body.append(("Model", "", "", f"{total_before['macs']:,}", f"{total_after['macs']:,}",
                 f"{total_before['params']:,}", f"{total_after['params']:,}"))
    speed = total_before["macs"] / max(1, total_after["macs"])
    return _table(head, body) + f"\nMACs {speed:.2f}x fewer, parameters {total_before['params'] / max(1, total_after['params']):.2f}x fewer"
