"""The errors a run stops with for people to fix: each names the problem and the fix.
"""

from __future__ import annotations


class DataError(RuntimeError):
    """Raw data missing or unreadable; the message names the files and the fix."""
