"""The ``aimesh`` subcommands, one module each.

Every module exposes ``add_parser(subparsers) -> None`` and ``run(args) -> int`` (the exit code);
:mod:`aimesh.cli` lists them in order and dispatches.  A command that talks to the mesh does so
through :func:`aimesh.commands.mesh.run_on_mesh`, which owns the connection, the error messages
and the exit codes.
"""
