"""The command line: one module per subcommand of ``python -m nnsight_dist``.

Each module exposes a ``main_<name>(argv) -> int`` taking the arguments after the
subcommand's name; ``nnsight_dist/__main__.py`` dispatches to it.
"""
