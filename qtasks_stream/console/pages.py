"""The console's HTML: server-rendered with f-strings, every value from a task through
:func:`esc` (arguments, results, errors, tags, names, ids: all of it came from a task).

No inline script or handler anywhere (the Content-Security-Policy forbids them): the one
script, ``static/console.js``, reads ``data-*`` attributes.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, urlencode

import orjson

from qtasks_stream.console.operations import STATUSES, LetterRow, TaskDetail, dumps
from qtasks_stream.console.settings import ConsoleSettings
from qtasks_stream.ops.rerun import RESUBMITTABLE
from qtasks_stream.schedules.api import schedule_run
from qtasks_stream.state import Task
from qtasks_stream.views.base import TaskPage

__all__ = [
    "dead_letters_page",
    "error_page",
    "login_page",
    "replay_page",
    "task_page",
    "tasks_page",
]

#: Payload fields a timeline row shows apart (long) rather than in its one-line summary.
_APART = frozenset(
    {"traceback", "args", "kwargs", "value", "result", "arguments_avro", "result_avro"}
)
#: Flash messages after an action (a fixed set: nothing from the request is echoed).
FLASH = {
    "cancel": "Cancel requested: the task stops wherever it is.",
    "resubmit": "Resubmitted: a new attempt starts.",
}


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _pretty(value: Any) -> str:
    return esc(dumps(value, indent=True).decode())


def _when(moment: datetime | None) -> str:
    if moment is None:
        return ""
    return esc(moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z")


def _time_us(us: int) -> str:
    return _when(datetime.fromtimestamp(us / 1_000_000, tz=UTC))


def _page(title: str, body: str, settings: ConsoleSettings, app_name: str, csrf: bool) -> str:
    logout = (
        f'<form method="post" action="/logout" class="inline">{_csrf(settings)}'
        '<button type="submit" class="link">Log out</button></form>'
        if csrf
        else ""
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(title)} · qtasks-stream</title>
<link rel="stylesheet" href="/static/console.css">
<script src="/static/console.js" defer></script>
</head><body>
<header><nav><span class="brand">qtasks-stream</span> <span class="app">{esc(app_name)}</span>
<a href="/">Tasks</a> <a href="/dead-letters">Dead letters</a>
<a href="/api/openapi.json">API</a> {logout}</nav></header>
<main>
{body}
</main></body></html>"""


def _csrf(settings: ConsoleSettings) -> str:
    return f'<input type="hidden" name="csrf" value="{esc(settings.csrf_token)}">'


def _status(status: str) -> str:
    return f'<span class="status s-{esc(status)}">{esc(status)}</span>'


def _link(params: Mapping[str, str], **changes: str | None) -> str:
    merged = {k: v for k, v in {**params, **changes}.items() if v}
    return "/?" + urlencode(merged) if merged else "/"


def _counts(counts: Mapping[str, int], params: Mapping[str, str]) -> str:
    total = sum(counts.values())
    items = [
        f'<li><a href="{esc(_link(params, status=None, after=None))}">all <b>{total}</b></a></li>'
    ]
    for status in STATUSES:
        current = ' class="current"' if params.get("status") == status else ""
        items.append(
            f'<li{current}><a href="{esc(_link(params, status=status, after=None))}">'
            f'{_status(status)} <b data-count="{status}">{counts.get(status, 0)}</b></a></li>'
        )
    return f'<ul class="counts" id="counts">{"".join(items)}</ul>'


def _select(name: str, options: Iterable[str], chosen: str | None) -> str:
    opts = ['<option value="">any</option>'] + [
        f'<option value="{esc(o)}"{" selected" if o == chosen else ""}>{esc(o)}</option>'
        for o in options
    ]
    return f'<select name="{name}" id="f-{name}">{"".join(opts)}</select>'


def _short(text: str | None, limit: int = 80) -> str:
    if not text:
        return ""
    return esc(text if len(text) <= limit else text[: limit - 1] + "…")


def task_row(task: Task) -> str:
    return (
        f'<tr data-id="{esc(task.uuid)}"><td><a href="/tasks/{quote(task.uuid)}" class="mono">'
        f"{esc(task.uuid)}</a></td><td>{esc(task.task_name)}</td><td>{esc(task.queue)}</td>"
        f"<td>{_status(task.status)}</td>"
        f"<td>{task.attempt}</td><td>{_when(task.created_at)}</td><td>{_when(task.updated_at)}</td>"
        f"<td>{' '.join(f'<span class=tag>{esc(t)}</span>' for t in task.tags)}</td>"
        f"<td>{_short(task.error_message)}</td></tr>"
    )


def tasks_page(
    page: TaskPage,
    counts: Mapping[str, int],
    params: Mapping[str, str],
    task_names: Iterable[str],
    queues: Iterable[str],
    settings: ConsoleSettings,
    app_name: str,
    signed_in: bool,
) -> str:
    rows = "".join(task_row(t) for t in page.tasks) or (
        '<tr><td colspan="9" class="empty">no tasks match</td></tr>'
    )
    paging = []
    if params.get("after"):
        paging.append(f'<a href="{esc(_link(params, after=None))}">« first page</a>')
    if page.next_cursor is not None:
        paging.append(
            f'<a href="{esc(_link(params, after=page.next_cursor))}" id="next">next page »</a>'
        )
    # A queue the app no longer declares stays chosen when its tasks are listed.
    shown_queues = sorted({*queues, *filter(None, [params.get("queue")])})
    live = "/api/live?" + urlencode({k: v for k, v in params.items() if v})
    body = f"""<h1>Tasks</h1>
{_counts(counts, params)}
<form method="get" action="/" class="filters" id="filters">
<label>status {_select("status", STATUSES, params.get("status"))}</label>
<label>name {_select("name", sorted(task_names), params.get("name"))}</label>
<label>queue {_select("queue", shown_queues, params.get("queue"))}</label>
<label>tag <input name="tag" id="f-tag" value="{esc(params.get("tag", ""))}" size="10"></label>
<label>since <input name="since" value="{esc(params.get("since", ""))}" size="20"
 placeholder="2026-12-07T20:00:00Z"></label>
<label>until <input name="until" value="{esc(params.get("until", ""))}" size="20"
 placeholder="epoch seconds or ISO 8601"></label>
<button type="submit">Filter</button> <a href="/">clear</a>
</form>
<p class="live" id="live" data-src="{esc(live)}">live updates: <span id="live-state">off</span></p>
<table class="tasks" id="tasks"><thead><tr><th>id</th><th>name</th><th>queue</th>
<th>status</th><th>attempt</th>
<th>created</th><th>updated</th><th>tags</th><th>error</th></tr></thead>
<tbody id="task-rows">{rows}</tbody></table>
<p class="paging" id="paging">{" ".join(paging)}</p>"""
    return _page("Tasks", body, settings, app_name, signed_in)


def _detail_rows(pairs: Iterable[tuple[str, str]]) -> str:
    return "".join(f"<tr><th>{esc(k)}</th><td>{v}</td></tr>" for k, v in pairs if v != "")


def _event_summary(payload: Mapping[str, Any]) -> str:
    parts = []
    for key, value in payload.items():
        if key in _APART or value in (None, "", [], ()):
            continue
        if key.endswith("_us") and isinstance(value, int):
            shown = _time_us(value)
        elif isinstance(value, float):
            shown = esc(f"{value:.3f}")
        else:
            shown = esc(value)
        parts.append(f"{esc(key)}=<span class=mono>{shown}</span>")
    return ", ".join(parts)


def _decoded(text: Any) -> Any:
    """A JSON text payload field (arguments, a progress item, a result) as its value."""
    if not isinstance(text, str):
        return text
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return text


def _event_extra(kind: str, payload: Mapping[str, Any]) -> str:
    out = []
    if payload.get("arguments_avro") is not None:  # typed: decoded from its Avro record
        out.append(f"<div>arguments <pre>{_pretty(payload['arguments_avro'])}</pre></div>")
    elif kind in ("Submitted", "Resubmitted") and payload.get("args"):
        out.append(
            f"<div>args <pre>{_pretty(_decoded(payload.get('args')))}</pre>"
            f"kwargs <pre>{_pretty(_decoded(payload.get('kwargs')))}</pre></div>"
        )
    if kind == "Progress":
        out.append(f"<pre class=progress>{_pretty(_decoded(payload.get('value')))}</pre>")
    if kind == "Succeeded":
        result = payload.get("result_avro") or _decoded(payload.get("result"))
        out.append(f"<div>result <pre>{_pretty(result)}</pre></div>")
    if payload.get("traceback"):
        out.append(
            f"<details class=traceback><summary>traceback</summary>"
            f"<pre>{esc(payload['traceback'])}</pre></details>"
        )
    return "".join(out)


def _timeline(task_id: str, document: Mapping[str, Any]) -> str:
    attempts = document["attempts"]
    first = next((a["events"][0]["at_us"] for a in attempts if a["events"]), 0)
    previous = first
    sections = []
    for attempt in attempts:
        number = attempt["attempt"]
        head = ["before the first attempt" if number == 0 else f"attempt {number}"]
        if attempt["outcome"]:
            head.append(f"→ {attempt['outcome']}")
        if attempt["worker_id"]:
            head.append(f"on {attempt['worker_id']}")
        if attempt["duration_ms"] is not None:
            head.append(f"{attempt['duration_ms']:.1f} ms")
        if attempt["starts"] > 1:
            head.append(f"started {attempt['starts']} times")
        error = attempt["error"]
        rows = []
        for event in attempt["events"]:
            at = event["at_us"]
            as_of = quote(f"{at / 1_000_000:.6f}")
            rows.append(
                f'<tr class="ev k-{esc(event["kind"])}">'
                f"<td class=num>+{(at - first) / 1000:.1f}</td>"
                f"<td class=num>+{(at - previous) / 1000:.1f}</td><td>{_time_us(at)}</td>"
                f"<td>{esc(event['kind'])}</td><td class=mono>{esc(event['source'])}</td>"
                f"<td>{_event_summary(event['payload'])}"
                f"{_event_extra(event['kind'], event['payload'])}</td>"
                f'<td><a href="/tasks/{quote(task_id)}?as_of={as_of}">as of</a></td></tr>'
            )
            previous = at
        error_line = (
            f'<p class="error">{esc(error["type"])}: {esc(error["message"])}</p>' if error else ""
        )
        sections.append(
            f'<section class="attempt" data-attempt="{number}"><h3>{esc("  ".join(head))}</h3>'
            f"{error_line}<table class=timeline><thead><tr><th>+ms</th><th>Δms</th><th>at</th>"
            f"<th>event</th><th>source</th><th>details</th><th></th></tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table></section>"
        )
    return "".join(sections)


#: A workflow's status (:mod:`qtasks_stream.workflows.fold`) → the task status it is coloured as.
_WORKFLOW_COLOUR = {"running": "process", "succeeded": "success", "failed": "error"}


def _workflow_status(status: str) -> str:
    colour = _WORKFLOW_COLOUR.get(status, "cancel")
    return f'<span class="status s-{colour}">{esc(status)}</span>'


def _membership(detail: TaskDetail) -> list[tuple[str, str]]:
    """Facts rows naming the schedule whose run the task is and the workflow it is a step of."""
    rows = []
    run = schedule_run(detail.task.tags)
    if run is not None:
        name, tick = run
        link = esc(_link({}, tag=f"schedule:{name}"))
        rows.append(
            (
                "schedule",
                f'<a href="{link}" id="schedule">{esc(name)}</a>'
                + (f" run of the tick {esc(tick)}" if tick else ""),
            )
        )
    workflow = detail.workflow
    if workflow is not None:
        step = esc(detail.workflow_step or "")
        status = _workflow_status(workflow["status"])
        rows.append(
            (
                "workflow",
                f'<a href="#workflow" class="mono">{esc(workflow["workflow_id"])}</a> '
                f"step <span class=mono>{step}</span> ({status})",
            )
        )
    return rows


def _workflow(document: Mapping[str, Any], current: str) -> str:
    """A :func:`~qtasks_stream.workflows.tree.workflow_document` as nested lists, each step
    linked to its task page."""

    def node(item: Mapping[str, Any]) -> str:
        if item["type"] == "task":
            step = item["step"]
            head = f"<span class=mono>{esc(step['path'])}</span> {esc(item['task'])}"
            if "task_id" not in step:
                return f'<li class="step">{head}: not submitted</li>'
            here = " current" if step["task_id"] == current else ""
            group = f" <small>group {esc(step['group_id'])}</small>" if step.get("group_id") else ""
            return (
                f'<li class="step{here}" data-step="{esc(step["path"])}">{head} '
                f'<a href="/tasks/{quote(step["task_id"])}" class="mono">{esc(step["task_id"])}</a>'
                f" {_status(step['status'])} <small>attempts: {len(step['attempts'])}</small>"
                f"{group}</li>"
            )
        if item["type"] == "chord":
            return (
                f"<li>chord <small>on_error={esc(item['on_error'])}</small><ul>"
                f"{node(item['header'])}<li>then<ul>{node(item['body'])}</ul></li></ul></li>"
            )
        children = "".join(node(c) for c in item["children"])
        return f"<li>{esc(item['type'])}<ul>{children}</ul></li>"

    cancel = " (cancel requested)" if document["cancel_requested"] else ""
    return (
        f'<h2>Workflow <span class="mono small">{esc(document["workflow_id"])}</span></h2>'
        f'<section id="workflow"><p>{_workflow_status(document["status"])}{esc(cancel)} '
        f"<small>now, from the log</small></p>"
        f'<ul class="workflow">{node(document["tree"])}</ul></section>'
    )


def _action(task_id: str, action: str, label: str, question: str, settings: ConsoleSettings) -> str:
    return (
        f'<form method="post" action="/tasks/{quote(task_id)}/{action}" class="action" '
        f'data-confirm="{esc(question)}">{_csrf(settings)}'
        f'<input name="reason" placeholder="reason" size="16">'
        f'<button type="submit" id="{action}">{esc(label)}</button></form>'
    )


def task_page(
    detail: TaskDetail,
    settings: ConsoleSettings,
    app_name: str,
    signed_in: bool,
    flash: str | None,
) -> str:
    task, document = detail.task, detail.history
    tid = task.uuid
    banner = ""
    if detail.as_of_us is not None:
        banner = (
            f'<p class="asof-banner" id="asof-banner">As it stood at {_time_us(detail.as_of_us)} '
            f'(from the log). <a href="/tasks/{quote(tid)}">Now</a></p>'
        )
    message = f'<p class="flash" id="flash">{esc(FLASH[flash])}</p>' if flash in FLASH else ""
    trace = settings.trace_link(document.get("trace_id"))
    trace_html = (
        f'<a href="{esc(trace)}" id="trace" rel="noreferrer">{esc(document["trace_id"])}</a>'
        if trace
        else esc(document.get("trace_id") or "")
    )
    actions = []
    if detail.as_of_us is None and signed_in:
        if not task.final:
            actions.append(_action(tid, "cancel", "Cancel", f"Cancel task {tid}?", settings))
        if task.status in RESUBMITTABLE:
            actions.append(
                _action(tid, "resubmit", "Resubmit", f"Start a new attempt of {tid}?", settings)
            )
    facts = _detail_rows(
        [
            ("status", _status(task.status)),
            ("attempt", esc(task.attempt)),
            ("queue", esc(task.queue)),
            ("priority", esc(task.priority)),
            ("worker", esc(task.worker_id or "")),
            ("created", _when(task.created_at)),
            ("updated", _when(task.updated_at)),
            ("due", _when(task.due_at)),
            ("tags", " ".join(f"<span class=tag>{esc(t)}</span>" for t in task.tags)),
            ("idempotency key", esc(task.idempotency_key or "")),
            (
                "cancel",
                f"requested: {esc(task.cancel_reason or '')}" if task.cancel_requested else "",
            ),
            ("trace", trace_html),
            *_membership(detail),
        ]
    )
    error = ""
    if task.error_type or task.error_message:
        error = (
            f'<h2>Error</h2><p class="error" id="error">{esc(task.error_type or "")}: '
            f"{esc(task.error_message or '')}</p>"
            + (
                '<details class="traceback"><summary>traceback</summary>'
                f"<pre>{esc(task.traceback)}</pre></details>"
                if task.traceback
                else ""
            )
        )
    as_of_value = "" if detail.as_of_us is None else f"{detail.as_of_us / 1_000_000:.6f}"
    name = task.task_name or "(name unknown)"  # known only from a dead-lettered submit
    body = f"""<h1>{esc(name)} <span class="mono small">{esc(tid)}</span></h1>
{banner}{message}
<div class="actions" id="actions">{"".join(actions)}</div>
<form method="get" action="/tasks/{quote(tid)}" class="asof" id="asof">
<label>as of <input name="as_of" value="{esc(as_of_value)}" size="28"
 placeholder="ISO 8601 or epoch seconds"></label> <button type="submit">Show</button></form>
<table class="facts">{facts}</table>
<h2>Arguments</h2><div class="payload">args <pre id="args">{_pretty(task.args)}</pre>
kwargs <pre id="kwargs">{_pretty(task.kwargs)}</pre></div>
<h2>Result</h2><pre id="result">{_pretty(task.returning)}</pre>
{error}
{_workflow(detail.workflow, tid) if detail.workflow is not None else ""}
<h2>Timeline <small>from the log, {len(document["attempts"])} sections</small></h2>
<div id="timeline">{_timeline(tid, document)}</div>
<p><a href="/api/tasks/{quote(tid)}/history">history as JSON</a></p>"""
    return _page(f"{task.task_name} {tid}", body, settings, app_name, signed_in)


def dead_letters_page(
    rows: list[LetterRow], settings: ConsoleSettings, app_name: str, signed_in: bool
) -> str:
    out = []
    for row in rows:
        d = row.letter
        position = f"{d.partition}:{d.offset}"
        key = (
            f'<a href="/tasks/{quote(d.task_id)}" class="mono">{esc(d.task_id)}</a>'
            if d.task_id is not None
            else ""
        )
        if row.replayed:
            act = "replayed"
        elif signed_in:
            act = (
                f'<input type="checkbox" name="letters" value="{esc(position)}" form="bulk"> '
                f'<form method="post" action="/dead-letters/replay" class="inline" '
                f'data-confirm="Replay dead letter {esc(position)}?">{_csrf(settings)}'
                f'<input type="hidden" name="letters" value="{esc(position)}">'
                f'<button type="submit" class="replay">Replay</button></form>'
            )
        else:
            act = ""
        out.append(
            f'<tr data-letter="{esc(position)}"><td class=mono>{esc(position)}</td>'
            f"<td>{_time_us(d.timestamp_ms * 1000)}</td><td>{key}</td><td>{esc(d.stage)}</td>"
            f"<td class=mono>{esc(d.source)}</td><td>{esc(d.reason)}</td>"
            f"<td>{esc(d.error_type)}</td><td class=num>{len(d.value or b'')}</td>"
            f"<td>{act}</td></tr>"
        )
    bulk = (
        f'<form method="post" action="/dead-letters/replay" id="bulk" '
        f'data-confirm="Replay the chosen dead letters?">{_csrf(settings)}'
        f'<input name="reason" placeholder="reason" size="20"> '
        f'<button type="submit">Replay chosen</button></form>'
        if signed_in
        else ""
    )
    body = f"""<h1>Dead letters <small>{len(rows)}</small></h1>
<p>Records a stage gave up on, newest first. A replay puts one back into its stage, once.</p>
{bulk}
<table class="letters" id="letters"><thead><tr><th>letter</th><th>at</th><th>task</th>
<th>stage</th><th>source</th><th>reason</th><th>error</th><th>bytes</th><th></th></tr></thead>
<tbody>{"".join(out) or '<tr><td colspan="9" class="empty">no dead letters</td></tr>'}</tbody>
</table>"""
    return _page("Dead letters", body, settings, app_name, signed_in)


def replay_page(
    outcomes: list[tuple[str, str | None, str]], settings: ConsoleSettings, app_name: str
) -> str:
    rows = "".join(
        f"<tr><td class=mono>{esc(p)}</td><td>"
        + (f'<a href="/tasks/{quote(t)}" class="mono">{esc(t)}</a>' if t else "")
        + f"</td><td class=outcome>{esc(r)}</td></tr>"
        for p, t, r in outcomes
    )
    body = f"""<h1>Replay</h1><table class="letters" id="outcomes"><thead><tr><th>letter</th>
<th>task</th><th>outcome</th></tr></thead><tbody>{rows}</tbody></table>
<p><a href="/dead-letters">back to the dead letters</a></p>"""
    return _page("Replay", body, settings, app_name, True)


def login_page(next_path: str, failed: bool, settings: ConsoleSettings, app_name: str) -> str:
    warning = '<p class="error">That is not the token.</p>' if failed else ""
    body = f"""<h1>Sign in</h1>{warning}
<p>The console's token is in <code>QTASKS_CONSOLE_TOKEN</code> where it was started.</p>
<form method="post" action="/login" id="login">
<input type="hidden" name="next" value="{esc(next_path)}">
<label>token <input type="password" name="token" id="token" size="40" autofocus></label>
<button type="submit">Sign in</button></form>"""
    return _page("Sign in", body, settings, app_name, False)


def error_page(status: int, message: str, settings: ConsoleSettings, app_name: str) -> str:
    body = f'<h1>{status}</h1><p class="error" id="message">{esc(message)}</p>'
    return _page(str(status), body, settings, app_name, False)
