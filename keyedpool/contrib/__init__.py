"""Adapters at the edge: frameworks and brokers. They import the core, never the reverse.

Each adapter has its own extra, e.g. ``pip install keyedpool[flask]``.
"""
