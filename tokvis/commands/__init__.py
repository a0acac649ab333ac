"""Sub-commands of ``tokvis`` beyond the built-in ones in :mod:`tokvis.cli`.

Each module here defines ``register(subparsers)``, which adds its parser(s)
with ``set_defaults(func=...)``; :func:`tokvis.cli.build_parser` finds them,
so adding a command needs no edit elsewhere.  Keep heavy imports inside the
command functions so ``tokvis --help`` stays fast.
"""
