"""Logging setup for the command line, and the node and peer ids carried by every record.

trio_replica logs through the standard `logging` module, one logger per component
(``trio_replica.node``, ``trio_replica.link``, ``trio_replica.membership``, ...). This module
owns what the records carry and how they are printed:

* `NODE` and `PEER` are context variables. Trio copies the current context into every task
  it spawns, so setting `NODE` in the task that enters ``open_node`` (see `node_context`)
  labels every record logged by the node's tasks, including its links and components,
  even when several nodes share one process. An embedder does the same::

      with trio_replica.runtime.logs.node_context(config.name):
          async with trio_replica.open_node(config) as node:
              ...

  A record can also name them explicitly: ``log.info("...", extra={"peer": peer.id})``.
* `ContextFilter` copies the context variables into each record (as ``record.node`` and
  ``record.peer``, None when unknown) without overriding values passed through ``extra``.
* `JsonFormatter` prints one JSON object per line: time, level, logger, message, node and
  peer when known, and the traceback when there is one.
* `setup_logging` installs one stderr handler on the root logger with the filter and the
  text or JSON formatter; the CLI calls it for ``--log-level`` and ``--log-json``.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime
import json
import logging
import sys
from collections.abc import Iterator
from typing import IO

#: The id of the node whose task is running; None outside any node.
NODE: contextvars.ContextVar[str | None] = contextvars.ContextVar("trio_replica_node", default=None)
#: The id of the peer a task talks to, when a task serves one peer; None otherwise.
PEER: contextvars.ContextVar[str | None] = contextvars.ContextVar("trio_replica_peer", default=None)

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(node_label)s]: %(message)s"


@contextlib.contextmanager
def node_context(node_id: str, peer_id: str | None = None) -> Iterator[None]:
    """Label the records logged in this block, and in every task spawned from it, with
    `node_id` (and `peer_id`). Restores the previous values on exit."""
    node_token = NODE.set(node_id)
    peer_token = PEER.set(peer_id) if peer_id is not None else None
    try:
        yield
    finally:
        if peer_token is not None:
            PEER.reset(peer_token)
        NODE.reset(node_token)


class ContextFilter(logging.Filter):
    """Add ``node``, ``peer`` and ``node_label`` to every record (never drops one).

    Installed on a handler, it sees the records of every logger that propagates there.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        node = getattr(record, "node", None) or NODE.get()
        peer = getattr(record, "peer", None) or PEER.get()
        record.node, record.peer = node, peer
        label = node or "-"
        record.node_label = f"{label}>{peer}" if peer else label
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line; keys absent rather than null when unknown."""

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.datetime.fromtimestamp(record.created, tz=datetime.UTC)
        out: dict[str, object] = {
            "time": when.isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in ("node", "peer"):
            value = getattr(record, key, None)
            if value is not None:
                out[key] = str(value)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        # default=str: a stray non-JSON value in `extra` must never lose the record.
        return json.dumps(out, default=str)


def setup_logging(
    level: str = "WARNING", *, json_lines: bool = False, stream: IO[str] | None = None
) -> None:
    """Log records at `level` and above to `stream` (stderr), as text or JSON lines.

    Replaces the handlers of the root logger, so calling it twice does not duplicate lines.
    """
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.addFilter(ContextFilter())
    handler.setFormatter(JsonFormatter() if json_lines else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))
