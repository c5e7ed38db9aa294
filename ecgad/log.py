"""The one logger of ecgad: every module and job logs through ``get_logger(__name__)``.

Why one place: progress lines of the jobs, the archive sink and the Train workers used to be four hand-rolled
``print`` helpers, each with its own format. They all go through the ``ecgad`` logger now, which writes one line
per message to stdout (``HH:MM:SS name: message``): Ray forwards a worker's stdout to the driver's console and to
``ray job logs``, so a line written on any node shows up where the job's user reads. ``ECGAD_LOG_LEVEL`` (default
``INFO``) sets how much is written; the handler is installed once per process, on first use.
"""

from __future__ import annotations

import logging
import os
import sys

ROOT = "ecgad"
_FORMAT = "%(asctime)s %(name)s: %(message)s"


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` is when a line is logged, not to the one of when the handler was made, so
    lines follow a redirected stdout (``contextlib.redirect_stdout``, pytest's capture)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:
        pass


def _install_handler() -> logging.Logger:
    root = logging.getLogger(ROOT)
    if not any(getattr(h, "_ecgad", False) for h in root.handlers):
        handler = _StdoutHandler()
        handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
        handler._ecgad = True  # type: ignore[attr-defined]  # marks ours, so a second install is a no-op
        root.addHandler(handler)
        root.setLevel(os.environ.get("ECGAD_LOG_LEVEL", "INFO").upper())
        root.propagate = False  # one line per message, even where the application configured the root logger
    return root


def get_logger(name: str) -> logging.Logger:
    """The logger for module ``name`` (pass ``__name__``), a child of ``ecgad`` (``jobs.train`` becomes
    ``ecgad.jobs.train``), so one handler and one level govern every line the project writes."""
    _install_handler()
    return logging.getLogger(name if name == ROOT or name.startswith(ROOT + ".") else f"{ROOT}.{name}")
