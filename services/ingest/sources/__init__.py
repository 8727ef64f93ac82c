"""Input formats: each source turns files into blocks of numpy columns plus a reject report.

Sources are synchronous and run in a worker thread (the parsers release the GIL); they know
nothing of NATS.  :func:`open_source` picks one from the request and validates the input.
"""

from services.ingest.sources.common import Block, RejectLog, Source
from services.ingest.sources.formats import open_source

__all__ = ["Block", "RejectLog", "Source", "open_source"]
