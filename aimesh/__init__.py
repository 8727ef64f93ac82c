"""The aimesh command line and the local supervisor (``aimesh up``)."""
