"""Logging set-up, done once by an entry point (the CLI); library modules only call ``logging.getLogger``."""

from __future__ import annotations

import logging
import sys

_HANDLER_NAME = "moeserve"
LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def configure_logging(level: str = "info") -> None:
    """Send moeserve's records to stderr at ``level`` (debug|info|warning|error).

    Idempotent: a second call only changes the level, so tests and nested entry points cannot stack handlers.
    """
    root = logging.getLogger()
    if not any(handler.get_name() == _HANDLER_NAME for handler in root.handlers):
        handler = _StderrHandler()
        handler.set_name(_HANDLER_NAME)
        handler.setFormatter(logging.Formatter(LOG_FORMAT, datefmt="%H:%M:%S"))
        root.addHandler(handler)
    root.setLevel(level.upper())
    # transformers and httpx log through their own loggers; keep their chatter at warning unless debugging.
    quiet = logging.DEBUG if level == "debug" else logging.WARNING
    for name in ("transformers", "httpx", "urllib3", "filelock"):
        logging.getLogger(name).setLevel(quiet)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted, not the stream of the moment it was made
    (so a handler installed under a redirected stderr, as in tests, never writes to a closed stream)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        """StreamHandler assigns its stream at construction; the property ignores it."""
