"""The console's HTTP API on the embedded default: every endpoint, and every refusal, which
must leave the log as it was."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from qtasks_stream.console.server import Console as Routes
from tests.apps import console_app as tasks
from tests.console.conftest import BEARER, LIMIT, Console, MakeConsole, log_ends, serving
from tests.e2ehelpers import eventually


async def refused(
    console: Console, method: str, path: str, status: int, **request: Any
) -> dict[str, Any]:
    """Send a request that must be refused with ``status`` and a JSON message, and check
    that the log did not move."""
    before = await console.settled()
    response = await console.client.request(method, path, **request)
    assert response.status_code == status, response.text
    body = response.json()
    assert body["status"] == status and body["error"], body
    await asyncio.sleep(0.1)
    assert await log_ends(console.app) == before, f"{method} {path} wrote to the log"
    return body


async def test_openapi_describes_every_api_route(console: Console) -> None:
    response = await console.client.get("/api/openapi.json", headers=BEARER)
    assert response.status_code == 200
    document = response.json()
    assert document["openapi"].startswith("3.")
    routes = Routes(console.app, console.settings).routes()
    served = {
        (r.path, m.lower()) for r in routes if r.path.startswith("/api/") for m in r.methods or ()
    }
    described = {(p, m) for p, ops in document["paths"].items() for m in ops}
    # HEAD is Starlette's free companion of GET; the document itself is not an operation.
    served = {(p, m) for p, m in served if m != "head" and p != "/api/openapi.json"}
    assert served == described
    names = document["paths"]["/api/tasks/{name}"]["post"]["parameters"][0]["schema"]["enum"]
    assert names == sorted(console.app.definitions)


async def test_submit_get_and_history(console: Console) -> None:
    response = await console.client.post(
        "/api/tasks/add",
        json={"args": [2], "kwargs": {"b": 3}, "tags": ["api"], "queue": "default"},
        headers=BEARER,
    )
    assert response.status_code == 202, response.text
    submitted = response.json()
    assert submitted["status"] == "new"
    task = await console.ended(submitted["id"])
    assert task.returning == 5 and task.tags == ["api"]
    got = (await console.client.get(f"/api/tasks/{task.uuid}", headers=BEARER)).json()
    assert got["status"] == "success" and got["result"] == 5 and got["queue"] == "default"
    assert (
        (got["args"], got["kwargs"])
        == (task.args, task.kwargs)
        == (submitted["args"], submitted["kwargs"])
    )
    history = (await console.client.get(f"/api/tasks/{task.uuid}/history", headers=BEARER)).json()
    assert history["status"] == "success"
    kinds = [e["kind"] for a in history["attempts"] for e in a["events"]]
    assert kinds == ["Submitted", "Scheduled", "Started", "Succeeded"]
    # As of the moment it was submitted: new, from the log.
    at = history["attempts"][0]["events"][0]["at_us"] / 1_000_000
    then = await console.client.get(f"/api/tasks/{task.uuid}?as_of={at}", headers=BEARER)
    assert then.json()["status"] == "new"
    early = await console.client.get(
        f"/api/tasks/{task.uuid}/history", params={"as_of": str(at)}, headers=BEARER
    )
    assert early.json()["status"] == "new"


async def test_typed_arguments_and_results_travel_as_json(console: Console) -> None:
    response = await console.client.post(
        "/api/tasks/receipt", json={"args": [{"id": 1, "note": "paid"}]}, headers=BEARER
    )
    assert response.status_code == 202, response.text
    task = await console.ended(response.json()["id"])
    assert task.status == "success"
    got = (await console.client.get(f"/api/tasks/{task.uuid}", headers=BEARER)).json()
    assert got["args"] == [{"id": 1, "note": "paid"}]
    assert got["result"] == {"id": 2, "note": "PAID"}
    history = (await console.client.get(f"/api/tasks/{task.uuid}/history", headers=BEARER)).json()
    submitted = history["attempts"][0]["events"][0]["payload"]
    assert submitted["arguments_avro"] == {"order": {"id": 1, "note": "paid"}}
    body = await refused(
        console,
        "POST",
        "/api/tasks/receipt",
        400,
        json={"args": [{"id": "one", "note": "x"}]},
        headers=BEARER,
    )
    assert "expected an int" in body["error"]


async def test_an_idempotency_key_submits_once(console: Console) -> None:
    headers = {**BEARER, "Idempotency-Key": "order-7"}
    first = await console.client.post("/api/tasks/add", json={"args": [1, 1]}, headers=headers)
    await console.ended(first.json()["id"])
    again = await console.client.post("/api/tasks/add", json={"args": [1, 1]}, headers=headers)
    assert again.status_code == 202
    assert again.json()["id"] == first.json()["id"] and again.json()["status"] == "success"
    history = (
        await console.client.get(f"/api/tasks/{first.json()['id']}/history", headers=BEARER)
    ).json()
    kinds = [e["kind"] for a in history["attempts"] for e in a["events"]]
    assert kinds.count("Started") == 1


@pytest.mark.parametrize(
    ("path", "content", "status", "says"),
    [
        ("/api/tasks/nosuch", b'{"args": []}', 404, "no task named 'nosuch'"),
        ("/api/tasks/add", b'{"args": [1,', 400, "not JSON"),
        ("/api/tasks/add", b"[1, 2]", 400, "JSON object"),
        ("/api/tasks/add", b'{"args": {"a": 1}}', 400, "args must be a JSON array"),
        ("/api/tasks/add", b'{"kwargs": [1]}', 400, "kwargs must be a JSON object"),
        ("/api/tasks/add", b'{"args": [1, 2], "when": 3}', 400, "unknown fields ['when']"),
        ("/api/tasks/add", b'{"args": [1, 2], "tags": [1]}', 400, "tags"),
        ("/api/tasks/add", b'{"args": [1, 2], "priority": "high"}', 400, "priority"),
        ("/api/tasks/add", b'{"args": [1, 2], "countdown": -1}', 400, "countdown"),
        ("/api/tasks/add", b'{"args": [1], "kwargs": {"timeout": 1}}', 400, "'timeout'"),
        ("/api/tasks/add", b'{"args": [1, 2], "queue": "gpu"}', 400, "gpu"),
        ("/api/tasks/add", b'{"args": [1, 2], "queue": 7}', 400, "queue must be a string"),
        ("/api/tasks/add", b'{"args": [1], "kwargs": {"tags": ["a"]}}', 400, "'tags'"),
    ],
)
async def test_a_refused_submission_writes_nothing(
    console: Console, path: str, content: bytes, status: int, says: str
) -> None:
    body = await refused(console, "POST", path, status, content=content, headers=BEARER)
    assert says in body["error"]


async def test_an_oversized_body_is_refused_before_it_is_read(make_console: MakeConsole) -> None:
    console = await make_console(max_body=100)
    big = b'{"args": ["' + b"x" * 200 + b'"]}'
    body = await refused(console, "POST", "/api/tasks/add", 413, content=big, headers=BEARER)
    assert "at most 100" in body["error"]

    async def chunks() -> Any:  # no Content-Length: refused while streaming
        for _ in range(10):
            yield b"x" * 30

    body = await refused(console, "POST", "/api/tasks/add", 413, content=chunks(), headers=BEARER)
    assert "over 100 bytes" in body["error"]


async def test_an_empty_idempotency_key_is_refused(console: Console) -> None:
    await refused(
        console,
        "POST",
        "/api/tasks/add",
        400,
        json={"args": [1, 2]},
        headers={**BEARER, "Idempotency-Key": " "},
    )


async def test_writes_need_the_bearer_token(make_console: MakeConsole) -> None:
    console = await make_console(public_reads=True)
    task_id = await console.submit("sleepy", 30)
    wrong = {"authorization": "Bearer not-the-token-at-all"}
    for path, body in [
        ("/api/tasks/add", {"args": [1, 2]}),
        (f"/api/tasks/{task_id}/cancel", {}),
        (f"/api/tasks/{task_id}/resubmit", {}),
        ("/api/dead-letters/replay", {"letters": ["0:0"]}),
    ]:
        for headers in ({}, wrong):
            answer = await refused(console, "POST", path, 401, json=body, headers=headers)
            assert "bearer token" in answer["error"]
    # The session cookie of the pages is no API credential for writes: a cross-site form
    # would carry it.
    cookie = console.signed_in()
    response = await cookie.post("/api/tasks/add", json={"args": [1, 2]})
    assert response.status_code == 401
    # Reads are public here.
    assert (await console.client.get("/api/counts")).status_code == 200


async def test_reads_need_the_token_unless_public(console: Console) -> None:
    task_id = await console.submit("add", 1, 2)
    for path in [
        "/api/tasks",
        f"/api/tasks/{task_id}",
        f"/api/tasks/{task_id}/history",
        "/api/counts",
        "/api/dead-letters",
        "/api/openapi.json",
        "/api/live",
    ]:
        response = await console.client.get(path)
        assert response.status_code == 401, path
        assert response.headers["www-authenticate"].startswith("Bearer")
        wrong = await console.client.get(path, headers={"authorization": f"Basic {BEARER}"})
        assert wrong.status_code == 401, path


async def test_get_and_history_of_an_unknown_task_are_404(console: Console) -> None:
    for path in ["/api/tasks/nope", "/api/tasks/nope/history"]:
        response = await console.client.get(path, headers=BEARER)
        assert response.status_code == 404 and "nope" in response.json()["error"]
    task_id = await console.submit("add", 1, 2)
    await console.ended(task_id)
    before = await console.client.get(f"/api/tasks/{task_id}?as_of=1000", headers=BEARER)
    assert before.status_code == 404
    bad = await console.client.get(f"/api/tasks/{task_id}/history?as_of=soon", headers=BEARER)
    assert bad.status_code == 400 and "ISO 8601" in bad.json()["error"]


async def test_history_shows_every_attempt_with_its_error(console: Console) -> None:
    task_id = await console.submit("fails", "disk full")
    await console.ended(task_id)
    history = (await console.client.get(f"/api/tasks/{task_id}/history", headers=BEARER)).json()
    attempts = [a for a in history["attempts"] if a["attempt"] > 0]
    assert [a["attempt"] for a in attempts] == [1, 2, 3]
    assert all(a["error"] == {"type": "RuntimeError", "message": "disk full"} for a in attempts)
    assert [a["outcome"] for a in attempts] == ["RetryScheduled", "RetryScheduled", "Failed"]


async def test_cancel_a_running_task(console: Console) -> None:
    task_id = await console.submit("sleepy", 30)
    await console.status(task_id, "process")
    response = await console.client.post(
        f"/api/tasks/{task_id}/cancel", json={"reason": "no longer needed"}, headers=BEARER
    )
    assert response.status_code == 202, response.text
    task = await console.ended(task_id)
    assert task.status == "cancel" and task.cancel_reason == "no longer needed"
    body = await refused(console, "POST", f"/api/tasks/{task_id}/cancel", 409, headers=BEARER)
    assert "has ended" in body["error"]
    await refused(console, "POST", "/api/tasks/nope/cancel", 404, headers=BEARER)
    await refused(
        console, "POST", f"/api/tasks/{task_id}/cancel", 400, json={"reason": 1}, headers=BEARER
    )


async def test_resubmit_an_ended_task(console: Console) -> None:
    task_id = await console.submit("fails", "once")
    await console.ended(task_id)
    response = await console.client.post(
        f"/api/tasks/{task_id}/resubmit", json={"reason": "try again"}, headers=BEARER
    )
    assert response.status_code == 202, response.text
    assert response.json()["attempt"] == 4
    await eventually(
        lambda: console.app.get(task_id),
        lambda t: t is not None and t.final and t.attempt == 4,
        what="the resubmitted task ran its new attempts",
        limit=LIMIT,
    )
    done = await console.submit("add", 1, 2)
    await console.ended(done)
    body = await refused(console, "POST", f"/api/tasks/{done}/resubmit", 409, headers=BEARER)
    assert "not resubmitted" in body["error"]
    await refused(console, "POST", "/api/tasks/nope/resubmit", 404, headers=BEARER)


async def test_list_filters_and_pages(console: Console) -> None:
    ids = [
        await console.submit("add", i, i, tags=["even" if i % 2 == 0 else "odd"]) for i in range(5)
    ]
    failed = await console.submit("fails", "x")
    for task_id in [*ids, failed]:
        await console.ended(task_id)

    async def listed(**params: str) -> dict[str, Any]:
        response = await console.client.get("/api/tasks", params=params, headers=BEARER)
        assert response.status_code == 200, response.text
        return response.json()  # type: ignore[no-any-return]

    assert [t["id"] for t in (await listed())["tasks"]] == [*ids, failed]
    assert [t["id"] for t in (await listed(status="error"))["tasks"]] == [failed]
    assert [t["id"] for t in (await listed(name="add", tag="even"))["tasks"]] == ids[::2]
    created = [(await console.app.get(i)).created_at.timestamp() for i in ids]  # type: ignore[union-attr]
    window = await listed(since=f"{created[1]:.6f}", until=f"{created[3]:.6f}")
    assert [t["id"] for t in window["tasks"]] == ids[1:3]
    pages, after = [], ""
    while True:
        page = await listed(limit="2", **({"after": after} if after else {}))
        pages.append([t["id"] for t in page["tasks"]])
        if page["next_cursor"] is None:
            break
        after = page["next_cursor"]
    # A full page has a cursor, even when nothing follows it.
    assert pages == [ids[0:2], ids[2:4], [ids[4], failed], []]
    counts = (await console.client.get("/api/counts", headers=BEARER)).json()
    assert counts["success"] == 5 and counts["error"] == 1 and counts["new"] == 0
    for params, says in [
        ({"status": "finished"}, "status must be one of"),
        ({"limit": "many"}, "limit"),
        ({"limit": "0"}, "limit"),
        ({"after": "nonsense"}, "cursor"),
        ({"since": "yesterday"}, "since"),
    ]:
        response = await console.client.get("/api/tasks", params=params, headers=BEARER)
        assert response.status_code == 400 and says in response.json()["error"], params


async def test_list_filters_by_queue(console: Console) -> None:
    plain = await console.submit("add", 1, 2)
    reports = [await console.submit("report", "q1"), await console.submit("report", "q2")]
    moved = await console.submit("add", 3, 4, queue="reports", tags=["moved"])
    for task_id in [plain, *reports, moved]:
        await console.ended(task_id)

    async def listed(**params: str) -> list[str]:
        response = await console.client.get("/api/tasks", params=params, headers=BEARER)
        assert response.status_code == 200, response.text
        return [t["id"] for t in response.json()["tasks"]]

    assert await listed(queue="reports") == [*reports, moved]
    assert await listed(queue="default") == [plain]
    assert await listed(queue="reports", name="add") == [moved]
    assert await listed(queue="elsewhere") == []  # a queue no longer declared: nothing, no error
    bad = await console.client.get("/api/tasks", params={"queue": "a b"}, headers=BEARER)
    assert bad.status_code == 400 and "queue" in bad.json()["error"]
    document = (await console.client.get("/api/openapi.json", headers=BEARER)).json()
    parameters = document["paths"]["/api/tasks"]["get"]["parameters"]
    assert "queue" in [p["name"] for p in parameters]


async def test_dead_letters_are_listed_and_replayed_once(make_console: MakeConsole) -> None:
    console = await make_console(unreadable_submits=True)
    # countdown=0: through the scheduler, which dead-letters the unreadable submit (a
    # task due now would go from the client straight to its lane and run).
    tasks.BROKEN.add("later")
    task_id = await console.submit("later", countdown=0)
    assert (await console.ended(task_id)).status == "dead_letter"
    listed = await eventually(
        lambda: console.client.get("/api/dead-letters", headers=BEARER),
        lambda r: len(r.json()["letters"]) >= 1,
        what="the dead letters are in the topic",
        limit=LIMIT,
    )
    letters = listed.json()["letters"]
    assert {d["key"] for d in letters} == {task_id}
    assert all("cannot read submits" in d["reason"] and not d["replayed"] for d in letters)
    assert all(d["value_bytes"] > 0 and d["stage"] and d["source"] for d in letters)
    only = await console.client.get(
        "/api/dead-letters", params={"stage": letters[0]["stage"]}, headers=BEARER
    )
    assert {d["stage"] for d in only.json()["letters"]} == {letters[0]["stage"]}

    tasks.BROKEN.clear()  # the cause is fixed
    ids = [d["id"] for d in letters]
    await console.settled()
    response = await console.client.post(
        "/api/dead-letters/replay", json={"letters": ids, "reason": "fixed"}, headers=BEARER
    )
    assert response.status_code == 200, response.text
    results = sorted(o["result"] for o in response.json()["outcomes"])
    assert "replayed" in results and all(r in ("replayed", "already replayed") for r in results)
    task = await console.status(task_id, "success")
    assert task.returning == "late"
    again = await console.client.post(
        "/api/dead-letters/replay", json={"letters": ids}, headers=BEARER
    )
    assert {o["result"] for o in again.json()["outcomes"]} == {"already replayed"}
    after = (await console.client.get("/api/dead-letters", headers=BEARER)).json()["letters"]
    assert all(d["replayed"] for d in after)

    for body, status in [
        ({"letters": "0:1"}, 400),
        ({"letters": ["zero"]}, 400),
        ({"letters": []}, 400),
        ({"letters": ["0:1"], "reason": 5}, 400),
        ({"letters": ["0:999999"]}, 404),
    ]:
        await refused(
            console, "POST", "/api/dead-letters/replay", status, json=body, headers=BEARER
        )


async def test_unknown_paths_and_methods_answer_json(console: Console) -> None:
    missing = await console.client.get("/api/nothing", headers=BEARER)
    assert missing.status_code == 404 and missing.json()["status"] == 404
    method = await console.client.delete("/api/counts", headers=BEARER)
    assert method.status_code == 405 and method.json()["status"] == 405


async def test_live_updates_stream_a_change(console: Console) -> None:
    """Through a real socket: the ASGI transport buffers whole responses."""
    async with (
        serving(console) as url,
        httpx.AsyncClient(base_url=url) as client,
        client.stream("GET", "/api/live", headers=BEARER) as response,
    ):
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = response.aiter_lines()
        assert await anext(lines) == "retry: 2000"
        await console.submit("add", 1, 2)
        async with asyncio.timeout(LIMIT):
            async for line in lines:
                if line == "event: changed":
                    break


async def test_a_task_the_view_does_not_know_yet_is_read_from_the_log(
    make_console: MakeConsole,
) -> None:
    console = await make_console(start=False)
    # No projector: the view never learns of the task, as right after a submit.
    await console.app.start(["scheduler", "worker", "deadletter"])
    submitted = await console.client.post("/api/tasks/sleepy", json={"args": [60]}, headers=BEARER)
    task_id = submitted.json()["id"]
    assert await console.app.view.state(task_id) is None
    got = await console.client.get(f"/api/tasks/{task_id}", headers=BEARER)
    assert got.status_code == 200 and got.json()["name"] == "sleepy", got.text
    cancel = await console.client.post(f"/api/tasks/{task_id}/cancel", headers=BEARER)
    assert cancel.status_code == 202, cancel.text
    events = await eventually(
        lambda: console.app.history(task_id),
        lambda evs: any(e.kind == "Cancelled" for e in evs),
        what="the cancel reached the task",
        limit=LIMIT,
    )
    assert events[0].kind == "Submitted"


async def test_the_list_without_a_view_says_why(make_console: MakeConsole) -> None:
    console = await make_console(start=False)
    await console.app.start(["scheduler", "worker"])  # nothing feeds the in-memory view
    for path in ["/api/counts", "/api/tasks", "/api/live"]:
        response = await console.client.get(path, headers=BEARER)
        assert response.status_code == 503, (path, response.text)
        assert "needs a shared view" in response.json()["error"]
    page = await console.signed_in().get("/")
    assert page.status_code == 503 and "QTASKS_VIEW_URL" in page.text
