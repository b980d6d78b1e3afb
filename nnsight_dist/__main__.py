"""``python -m nnsight_dist SUBCOMMAND ...``: dispatch to the subcommand's module in ``cli/``.

Subcommand modules are imported only when their subcommand runs, so one that is missing
or heavy costs the others nothing.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

#: Subcommand name -> ("module", "function"); the function takes the remaining argv and
#: returns the exit status.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "info": ("nnsight_dist.cli.info", "main_info"),
    "plan": ("nnsight_dist.cli.plan", "main_plan"),
    # Collection (the lead's): runs under torchrun / mpirun / srun.
    "cache": ("nnsight_dist.cli.cache", "main_cache"),
}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the subcommand named by ``argv[0]`` with the rest of ``argv``."""
    parser = argparse.ArgumentParser(prog="python -m nnsight_dist",
                                     description="nnsight_dist command line.")
    parser.add_argument("command", choices=sorted(SUBCOMMANDS), help="the subcommand")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="its arguments (see COMMAND --help)")
    args = parser.parse_args(argv)
    module, function = SUBCOMMANDS[args.command]
    return int(getattr(importlib.import_module(module), function)(args.args) or 0)


if __name__ == "__main__":
    sys.exit(main())
