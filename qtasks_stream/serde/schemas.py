"""The Avro schemas shipped with the package (``schemas/avro/*.avsc`` in the source tree)."""

from __future__ import annotations

import importlib.resources
from pathlib import Path

__all__ = ["load_schema_text"]


def _schema_dir() -> Path:
    # In a wheel the schemas are force-included as qtasks_stream/_schemas; in a source
    # checkout (editable install, tests) they are the top-level schemas/avro folder.
    packaged = importlib.resources.files("qtasks_stream") / "_schemas"
    if packaged.is_dir():
        return Path(str(packaged))
    return Path(__file__).resolve().parents[2] / "schemas" / "avro"


def load_schema_text(name: str) -> str:
    """The text of schema ``name`` (``TaskEvent``, ``WorkItem``...)."""
    return (_schema_dir() / f"{name}.avsc").read_text(encoding="utf-8")
