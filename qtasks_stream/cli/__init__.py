"""The ``qtasks-stream`` command line: :mod:`.main` parses the arguments, builds the settings
from the environment and runs the command; :mod:`.audit`, :mod:`.console` and
:mod:`.schedules` hold the options and output of their commands. Argparse and print glue only:
what the commands do lives in the app, :mod:`qtasks_stream.ops` and the console."""

from __future__ import annotations

from qtasks_stream.cli.main import main

__all__ = ["main"]
