"""Dream Window: a living AI dream on the desktop, driven by a crash-safe SQLite ledger."""

__version__ = "0.1.0"
