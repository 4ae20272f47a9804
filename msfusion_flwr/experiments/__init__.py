"""Experiments around the app: the comparison harness and an in-process Grid for scripts and tests.

* :mod:`.comparison`: a matrix of runs (methods x seeds x any key), resumable, reported as CSV, Markdown and plots;
* :mod:`.loopback`: a Grid stand-in that drives the strategy and the ClientApp handlers in one process.
"""
