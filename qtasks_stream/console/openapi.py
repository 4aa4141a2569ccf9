"""The console API's OpenAPI 3.1 document, written by hand: the API is small and stable."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["openapi_document"]


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_ERRORS = {
    str(status): _json(_ref("Error"), text)
    for status, text in (
        (400, "bad input: the message names the problem; nothing was written"),
        (401, "the bearer token is missing or wrong"),
        (404, "no such task, task name or dead letter"),
        (409, "the task's state does not allow it"),
        (413, "the body is too large; nothing was written"),
    )
}
_ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
_AS_OF = {
    "name": "as_of",
    "in": "query",
    "schema": {"type": "string"},
    "description": "the task as it stood then (ISO 8601 or epoch seconds), from the log",
}
_REASON = {
    "content": {
        "application/json": {
            "schema": {"type": "object", "properties": {"reason": {"type": "string"}}}
        }
    }
}


def _query(name: str, description: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "schema": {"type": "string"}, "description": description}


def openapi_document(task_names: Sequence[str]) -> dict[str, Any]:
    """The document, with the app's task names as the submission path's values."""
    task = {
        "type": "object",
        "properties": {
            name: {"type": kind} if kind else {}
            for name, kind in (
                ("id", "string"),
                ("name", "string"),
                ("status", "string"),
                ("final", "boolean"),
                ("queue", "string"),
                ("priority", "integer"),
                ("attempt", "integer"),
                ("args", "array"),
                ("kwargs", "object"),
                ("result", None),
                ("error_type", None),
                ("error_message", None),
                ("traceback", None),
                ("created_at", "string"),
                ("updated_at", "string"),
                ("cancel_requested", "boolean"),
                ("cancel_reason", None),
                ("tags", "array"),
                ("worker_id", None),
                ("due_at", None),
                ("idempotency_key", None),
            )
        },
    }
    secured: list[dict[str, list[str]]] = [{"bearer": []}]
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "qtasks-stream console API",
            "version": "1",
            "description": "Reads come from the task view and the log; writes append to the log.",
        },
        "security": secured,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error", "status"],
                    "properties": {"error": {"type": "string"}, "status": {"type": "integer"}},
                },
                "Task": task,
                "Submission": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "args": {"type": "array"},
                        "kwargs": {"type": "object"},
                        "priority": {"type": "integer"},
                        "queue": {"type": "string"},
                        "countdown": {"type": "number"},
                        "max_time": {"type": "number"},
                        "tags": {"type": "array", "items": {"type": "string"}},
                    },
                },
            },
        },
        "paths": {
            "/api/tasks": {
                "get": {
                    "summary": "tasks from the view, oldest first, a page at a time",
                    "parameters": [
                        _query("status", "new, scheduled, process, retry, success, error, ..."),
                        _query("name", "task name"),
                        _query("tag", "a tag the task has"),
                        _query("queue", "the named queue the task was submitted to"),
                        _query("since", "created at or after (ISO 8601 or epoch seconds)"),
                        _query("until", "created before"),
                        _query("limit", "1..10000, default 50"),
                        _query("after", "next_cursor of the previous page"),
                    ],
                    "responses": {
                        "200": _json(
                            {
                                "type": "object",
                                "properties": {
                                    "tasks": {"type": "array", "items": _ref("Task")},
                                    "next_cursor": {"type": ["string", "null"]},
                                },
                            },
                            "one page",
                        ),
                        **_ERRORS,
                    },
                }
            },
            "/api/tasks/{name}": {
                "post": {
                    "summary": "submit a task",
                    "parameters": [
                        {
                            "name": "name",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string", "enum": list(task_names)},
                        },
                        {
                            "name": "Idempotency-Key",
                            "in": "header",
                            "schema": {"type": "string"},
                            "description": "a repeat with the same key answers the first task",
                        },
                    ],
                    "requestBody": {
                        "content": {"application/json": {"schema": _ref("Submission")}}
                    },
                    "responses": {"202": _json(_ref("Task"), "submitted"), **_ERRORS},
                }
            },
            "/api/tasks/{id}": {
                "get": {
                    "summary": "one task (from the view; with as_of, from the log)",
                    "parameters": [_ID, _AS_OF],
                    "responses": {"200": _json(_ref("Task"), "the task"), **_ERRORS},
                }
            },
            "/api/tasks/{id}/history": {
                "get": {
                    "summary": "every event of the task by attempt, from the log "
                    "(the document of `qtasks-stream history --json`)",
                    "parameters": [_ID, _AS_OF],
                    "responses": {"200": _json({"type": "object"}, "the history"), **_ERRORS},
                }
            },
            "/api/tasks/{id}/cancel": {
                "post": {
                    "summary": "ask for the task to be cancelled",
                    "parameters": [_ID],
                    "requestBody": _REASON,
                    "responses": {"202": _json({"type": "object"}, "requested"), **_ERRORS},
                }
            },
            "/api/tasks/{id}/resubmit": {
                "post": {
                    "summary": "a new attempt of an ended task (error, timeout, dead_letter)",
                    "parameters": [_ID],
                    "requestBody": _REASON,
                    "responses": {"202": _json({"type": "object"}, "resubmitted"), **_ERRORS},
                }
            },
            "/api/counts": {
                "get": {
                    "summary": "tasks per status",
                    "responses": {"200": _json({"type": "object"}, "counts"), **_ERRORS},
                }
            },
            "/api/dead-letters": {
                "get": {
                    "summary": "the dead-letter topic's records, newest first",
                    "parameters": [_query("stage", "only this stage's"), _query("key", "task id")],
                    "responses": {"200": _json({"type": "object"}, "the letters"), **_ERRORS},
                }
            },
            "/api/dead-letters/replay": {
                "post": {
                    "summary": "replay dead letters into their stage (each at most once)",
                    "requestBody": {
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "required": ["letters"],
                                    "properties": {
                                        "letters": {
                                            "type": "array",
                                            "items": {"type": "string"},
                                            "description": "PARTITION:OFFSET of each",
                                        },
                                        "reason": {"type": "string"},
                                    },
                                }
                            }
                        }
                    },
                    "responses": {"200": _json({"type": "object"}, "one outcome each"), **_ERRORS},
                }
            },
            "/api/live": {
                "get": {
                    "summary": "server-sent events: `changed` when the view applied events",
                    "responses": {"200": {"description": "text/event-stream"}},
                }
            },
        },
    }
