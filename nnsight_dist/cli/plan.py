"""``python -m nnsight_dist plan CONFIG_OR_DIR --tp T --pp P``: the sharding of a model, before loading it."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from ..intervention.errors import TopologyError, UnshardableModel


def main_plan(argv: Optional[Sequence[str]] = None) -> int:
    """Print the plan (:func:`nnsight_dist.engines.plan.plan`) of a checkpoint directory or a
    ``config.json``; with ``--json``, as JSON. Returns the exit status: 2 with the reason on
    stderr when the degrees cannot split the model, 1 when the configuration cannot be read
    or the dtype is not one."""
    parser = argparse.ArgumentParser(prog="python -m nnsight_dist plan",
                                     description="Plan a model's sharding on the meta device (no weights, no ranks).")
    parser.add_argument("config", help="a checkpoint directory (its config.json) or a config.json path")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (default 1)")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel degree (default 1)")
    parser.add_argument("--dtype", default=None, help="parameter dtype, e.g. bfloat16 (default: the config's, else float32)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    args = parser.parse_args(argv)
    from ..engines.plan import plan

    try:
        result = plan(args.config, tp=args.tp, pp=args.pp, dtype=args.dtype)
    except (UnshardableModel, TopologyError) as e:
        print(f"refused: {e}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as e:  # no such file, not a configuration, not a dtype
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result.to_json(), indent=1) if args.json else result)
    return 0
