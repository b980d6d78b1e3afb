"""``python -m nnsight_dist info STORE_DIR``: describe an activation store (and verify it)."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from ..store.format import StoreError
from ..store.reader import ActivationStore


def main_info(argv: Optional[Sequence[str]] = None) -> int:
    """Print the store's description; with ``--verify``, check every file's size and
    sha256 too. Returns the exit status (1 for a store that cannot be read or is damaged)."""
    parser = argparse.ArgumentParser(prog="python -m nnsight_dist info",
                                     description="Describe an activation store.")
    parser.add_argument("store", help="the store's directory (the out_dir of collect_activations)")
    parser.add_argument("--verify", action="store_true",
                        help="check every file the manifest lists (size and sha256)")
    args = parser.parse_args(argv)
    try:
        store = ActivationStore(args.store)
        print(store.describe())
        if args.verify:
            summary = store.verify(progress=sys.stderr.isatty())
            print(f"verified {summary['files']} files, {summary['bytes']} bytes: all match the manifest")
    except StoreError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
