"""Subcommands of the ``sparsequant`` CLI that live in their own module.

Each module exposes ``add_parser(subparsers, common_parent)`` (registers the subcommand and sets
``func``) and ``run(args) -> int``. Heavy imports stay inside ``run`` so ``--help`` is instant.
"""
