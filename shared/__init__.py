"""The aimesh runtime: actors, services, wire names and schemas, config, tracing.

This package never imports torch, so the router and the metrics service start fast; a test
walks the imports to keep it so.
"""

__version__ = "0.1.0"
