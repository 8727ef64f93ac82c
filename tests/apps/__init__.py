"""Small services built on the real runtime, run as real processes by the tests."""
