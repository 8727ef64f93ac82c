"""The old home of :func:`aimesh.jobs.train`, kept while tests and benchmarks on other branches
still import it from here; new code imports :mod:`aimesh.jobs`."""

from aimesh.jobs import train

__all__ = ["train"]
