"""The daemon's log: a rotating file in the home's logs folder, and stderr (text or JSON lines)."""

from __future__ import annotations

import json
import logging
import logging.handlers
import sys

from runner.errors import StorageFullError
from runner.settings import Settings


def setup_logging(settings: Settings) -> None:
    settings.logs_dir.mkdir(parents=True, exist_ok=True)
    handler = _LogFile(settings.logs_dir / "agent_orchestrator.log", maxBytes=10 * 1024 * 1024, backupCount=5)
    stream = logging.StreamHandler(sys.stderr)
    formatter: logging.Formatter = (_JsonFormatter() if settings.log_format == "json" else
                                    logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for h in (handler, stream):
        h.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler, stream]
    root.setLevel(settings.log_level.upper())
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)  # "Task queue depth" under any load


class _LogFile(logging.handlers.RotatingFileHandler):
    """The log file sits in the home. When that disk is full a line cannot be written: say so once on
    stderr, which still gets every line, rather than print a traceback for each line; the file takes
    lines again (and what was kept in its buffer) once there is space."""

    full = False  # the last line that failed found the disk full (said once on stderr)
    failed = False  # the line being written failed

    def emit(self, record: logging.LogRecord) -> None:
        self.failed = False
        super().emit(record)  # calls handleError on failure
        if self.full and not self.failed:
            self.full = False
            sys.stderr.write(f"log file {self.baseFilename}: writable again\n")

    def handleError(self, record: logging.LogRecord) -> None:
        self.failed = True
        exc = sys.exc_info()[1]
        if exc is None or StorageFullError.of(exc) is None:
            super().handleError(record)
        elif not self.full:
            self.full = True
            sys.stderr.write(f"log file {self.baseFilename}: the disk is full, lines go to stderr only until "
                             "space is freed\n")


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps({"ts": self.formatTime(record), "level": record.levelname, "logger": record.name,
                           "message": record.getMessage()})
