"""The ``drscreen`` command line: a thin dispatcher (see cli.main)."""
