"""``admm-onnx groups``: the channel groups structured pruning would remove channels from."""
from __future__ import annotations

import json

import click


@click.command("groups")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def groups(model, as_json):
    """Channel groups of MODEL: sizes, share of MACs and parameters, and why blocked ones are."""
    from admm_onnx.io import load_model
    from admm_onnx.structured import analyse
    from admm_onnx.structured.report import groups_dict, groups_table

    from admm_onnx.structured.untie import untie_constants

    analysis = analyse(untie_constants(load_model(model))[0])
    if as_json:
        click.echo(json.dumps(groups_dict(analysis), indent=2, default=float))
    else:
        click.echo(groups_table(analysis))
