"""The ``console`` command's options and wiring (the CLI reads the environment and calls
:func:`run`); Starlette and uvicorn are imported only when the command runs."""

from __future__ import annotations

import argparse
from typing import Any

from qtasks_stream.app import STAGES, QueueTasks
from qtasks_stream.errors import ConfigurationError

__all__ = ["TOKEN_VARIABLE", "add_parser", "run"]

#: The environment variable holding the console's bearer token.
TOKEN_VARIABLE = "QTASKS_CONSOLE_TOKEN"


def add_parser(sub: Any) -> None:
    console = sub.add_parser(
        "console", help="pages and an HTTP API on the tasks (pip install 'qtasks-stream[console]')"
    )
    console.add_argument("-A", "--app", required=True, help="module:app")
    console.add_argument("--host", default="127.0.0.1", help="address (default: %(default)s)")
    console.add_argument("--port", type=int, default=8088, help="port (default: %(default)s)")
    console.add_argument(
        "--public-reads", action="store_true", help="pages and API reads without the token"
    )
    console.add_argument(
        "--trace-url", default=None, help="a trace's address, with {trace_id} (e.g. Jaeger)"
    )
    console.add_argument(
        "--stages",
        default=None,
        help="stages to run beside the console (default: all of them on the embedded "
        "default, none on Kafka, where workers run them and the view is shared)",
    )


def run(app: QueueTasks, args: argparse.Namespace, token: str | None, shared_log: bool) -> int:
    """Serve the console of ``app`` (configured by the CLI); ``token`` is the value of
    :data:`TOKEN_VARIABLE`, ``shared_log`` whether the app is on Kafka."""
    try:
        from qtasks_stream.console.server import run_console
    except ImportError as exc:
        raise ConfigurationError(
            f"the console needs its extra: pip install 'qtasks-stream[console]' ({exc})"
        ) from exc
    if args.stages is None:
        stages: list[str] = [] if shared_log else list(STAGES)
    else:
        stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    return run_console(
        app,
        args.host,
        args.port,
        token,
        public_reads=args.public_reads,
        trace_url=args.trace_url,
        stages=stages,
    )
