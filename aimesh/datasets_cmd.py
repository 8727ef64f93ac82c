"""The old home of :func:`aimesh.jobs.ingest` and :func:`aimesh.jobs.upload`, kept while tests and
benchmarks on other branches still import them from here; new code imports :mod:`aimesh.jobs`."""

from aimesh.commands.mesh import connect_once
from aimesh.jobs import ingest, upload

__all__ = ["connect_once", "ingest", "upload"]
