"""The console's pages through the ASGI transport: sign-in, what forms need (cookie, CSRF
field, same origin), escaping, the as-of view and the trace link."""

from __future__ import annotations

import asyncio

import pytest

from qtasks_stream.console.server import SESSION_COOKIE
from qtasks_stream.console.settings import ConsoleSettings
from qtasks_stream.errors import ConfigurationError
from tests.console.conftest import BEARER, LIMIT, TOKEN, Console, MakeConsole, log_ends
from tests.e2ehelpers import eventually

SCRIPT = "<script>alert(1)</script>"


async def test_pages_need_sign_in_and_the_cookie_is_strict(console: Console) -> None:
    for path in ["/", "/dead-letters", "/tasks/x"]:
        response = await console.client.get(path)
        assert response.status_code == 303 and response.headers["location"].startswith("/login")
    wrong = await console.client.post("/login", data={"token": "guess", "next": "/"})
    assert wrong.status_code == 401 and "not the token" in wrong.text
    assert SESSION_COOKIE not in wrong.cookies
    asked = await console.client.get("/", params={"status": "error"})
    assert asked.headers["location"] == "/login?next=%2F%3Fstatus%3Derror"
    form = await console.client.get(asked.headers["location"])
    assert 'name="next" value="/?status=error"' in form.text
    right = await console.client.post("/login", data={"token": TOKEN, "next": "/dead-letters"})
    assert right.status_code == 303 and right.headers["location"] == "/dead-letters"
    cookie = right.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie
    # The cookie is not the token itself.
    assert TOKEN not in right.headers["set-cookie"]
    page = await console.client.get("/")
    assert page.status_code == 200 and "<h1>Tasks</h1>" in page.text


@pytest.mark.parametrize("target", ["//evil.example/", "https://evil.example/", "/\\evil"])
async def test_sign_in_never_redirects_away(console: Console, target: str) -> None:
    response = await console.client.post("/login", data={"token": TOKEN, "next": target})
    assert response.headers["location"] == "/"


async def test_public_reads_show_pages_without_actions(make_console: MakeConsole) -> None:
    console = await make_console(public_reads=True)
    task_id = await console.submit("sleepy", 30)
    await console.status(task_id, "process")
    page = await console.client.get(f"/tasks/{task_id}")
    assert page.status_code == 200 and 'id="cancel"' not in page.text
    signed = console.signed_in()
    assert 'id="cancel"' in (await signed.get(f"/tasks/{task_id}")).text


async def test_a_form_needs_the_cookie_the_csrf_field_and_this_origin(console: Console) -> None:
    task_id = await console.submit("sleepy", 30)
    await console.status(task_id, "process")
    signed = console.signed_in()
    csrf = console.settings.csrf_token
    path = f"/tasks/{task_id}/cancel"
    before = await console.settled()
    attempts = [
        (console.client, {"csrf": csrf}, {}, 401),  # no session cookie
        (
            console.client,
            {"csrf": csrf},
            {"authorization": f"Bearer {TOKEN}"},
            401,
        ),  # the bearer token does not sign forms in
        (signed, {}, {}, 403),  # no CSRF field
        (signed, {"csrf": "0" * 64}, {}, 403),  # a wrong one
        (signed, {"csrf": csrf}, {"origin": "https://evil.example"}, 403),
        (signed, {"csrf": csrf}, {"origin": "null"}, 403),
        (signed, {"csrf": csrf}, {"sec-fetch-site": "cross-site"}, 403),
        (signed, {"csrf": csrf}, {"sec-fetch-site": "same-site"}, 403),
    ]
    for client, form, headers, status in attempts:
        response = await client.post(path, data=form, headers=headers)
        assert response.status_code == status, (form, headers, response.text)
    await asyncio.sleep(0.1)
    assert await log_ends(console.app) == before
    assert (await console.app.get(task_id)).cancel_requested is False  # type: ignore[union-attr]
    done = await signed.post(
        path, data={"csrf": csrf, "reason": "operator"}, headers={"origin": "http://console.test"}
    )
    assert done.status_code == 303 and done.headers["location"] == f"/tasks/{task_id}?done=cancel"
    task = await console.ended(task_id)
    assert task.status == "cancel" and task.cancel_reason == "operator"
    page = await signed.get(done.headers["location"])
    assert "Cancel requested" in page.text


async def test_task_strings_are_escaped_everywhere(console: Console) -> None:
    task_id = await console.submit("fails", SCRIPT, tags=[SCRIPT])
    await console.ended(task_id)
    signed = console.signed_in()
    for path in ["/", f"/tasks/{task_id}", f"/?tag={SCRIPT}", "/?name=%3Cu%3E"]:
        response = await signed.get(path)
        assert response.status_code == 200, path
        assert SCRIPT not in response.text, path
        assert "<u>" not in response.text
        policy = response.headers["content-security-policy"]
        assert "script-src 'self'" in policy and "unsafe-inline" not in policy
    page = (await signed.get(f"/tasks/{task_id}")).text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    # The error page escapes what the request said, too.
    missing = await signed.get(f"/tasks/{SCRIPT}")
    assert missing.status_code == 404 and SCRIPT not in missing.text


async def test_task_page_shows_attempts_progress_and_the_past(console: Console) -> None:
    failing = await console.submit("fails", "disk full")
    counting = await console.submit("count", 3)
    await console.ended(failing)
    await console.ended(counting)
    signed = console.signed_in()
    page = (await signed.get(f"/tasks/{failing}")).text
    for attempt in (1, 2, 3):
        assert f'data-attempt="{attempt}"' in page
    assert page.count("RuntimeError: disk full") >= 3 and "Traceback" in page
    assert 'id="resubmit"' in page and 'id="cancel"' not in page
    progress = (await signed.get(f"/tasks/{counting}")).text
    assert progress.count('class="ev k-Progress"') == 3
    history = await console.app.history(failing)
    first = history[0].at_us / 1_000_000
    past = (await signed.get(f"/tasks/{failing}", params={"as_of": f"{first:.6f}"})).text
    assert 'id="asof-banner"' in past and "s-new" in past and 'data-attempt="1"' not in past
    assert 'id="resubmit"' not in past  # no actions on the past


async def test_the_list_page_filters_pages_and_counts(console: Console) -> None:
    ids = [await console.submit("add", i, 1) for i in range(3)]
    failed = await console.submit("fails", "x")
    for task_id in [*ids, failed]:
        await console.ended(task_id)
    signed = console.signed_in()
    page = (await signed.get("/", params={"status": "error"})).text
    assert failed in page and not any(i in page for i in ids)
    assert 'data-count="success">3<' in page and 'data-count="error">1<' in page
    first = (await signed.get("/", params={"limit": "2"})).text
    assert ids[0] in first and ids[2] not in first and 'id="next"' in first
    bad = await signed.get("/", params={"status": "finished"})
    assert bad.status_code == 400 and "status must be one of" in bad.text


async def test_the_list_page_filters_by_queue(console: Console) -> None:
    plain = await console.submit("add", 1, 1)
    report = await console.submit("report", "q")
    for task_id in [plain, report]:
        await console.ended(task_id)
    signed = console.signed_in()
    page = (await signed.get("/", params={"queue": "reports"})).text
    assert report in page and plain not in page
    assert '<option value="reports" selected>reports</option>' in page
    assert '<option value="default">default</option>' in page
    # A queue the app no longer declares stays chosen (its old tasks are still listed).
    gone = (await signed.get("/", params={"queue": "retired"})).text
    assert '<option value="retired" selected>retired</option>' in gone


async def test_a_schedule_run_links_to_its_schedules_runs(console: Console) -> None:
    from datetime import timedelta

    from qtasks_stream.views.base import TaskQuery

    await console.app.schedule(
        "minutely-report", task="add", every=timedelta(seconds=1), args=[1, 2]
    )
    runs = await eventually(
        lambda: console.app.query(TaskQuery(tag="schedule:minutely-report")),
        bool,
        what="the schedule ran",
        limit=LIMIT,
    )
    tick = next(t[5:] for t in runs[0].tags if t.startswith("tick:"))
    signed = console.signed_in()
    page = (await signed.get(f"/tasks/{runs[0].uuid}")).text
    assert '<a href="/?tag=schedule%3Aminutely-report" id="schedule">minutely-report</a>' in page
    assert f"run of the tick {tick}" in page
    listed = (await signed.get("/", params={"tag": "schedule:minutely-report"})).text
    assert runs[0].uuid in listed
    # A tag says which schedule: whatever it holds is escaped, in the text and in the link.
    forged = await console.submit("add", 1, 1, tags=[f"schedule:{SCRIPT}", "tick:<b>"])
    await console.ended(forged)
    page = (await signed.get(f"/tasks/{forged}")).text
    assert SCRIPT not in page and "<b>" not in page
    assert 'href="/?tag=schedule%3A%3Cscript%3Ealert%281%29%3C%2Fscript%3E"' in page
    plain = await console.submit("add", 2, 2)
    await console.ended(plain)
    page = (await signed.get(f"/tasks/{plain}")).text
    assert 'id="schedule"' not in page and 'id="workflow"' not in page


async def test_a_workflow_step_shows_its_workflow(console: Console) -> None:
    from qtasks_stream.workflows import Signature, chain, group

    handle = await console.app.run_workflow(
        chain(
            Signature("add", (1, 2)),
            group(Signature("add", (10,)), Signature("add", (20,))),
        )
    )
    assert await handle.result(LIMIT) is not None
    steps = {path: handle.step_id(path) for path in ("0", "1.0", "1.1")}
    signed = console.signed_in()
    page = (await signed.get(f"/tasks/{steps['1.0']}")).text
    assert f'<a href="#workflow" class="mono">{handle.workflow_id}</a>' in page
    assert 'id="workflow"' in page
    for path, task_id in steps.items():
        assert f'data-step="{path}"' in page
        assert f'<a href="/tasks/{task_id}" class="mono">{task_id}</a>' in page
    assert 'class="step current" data-step="1.0"' in page
    assert page.count("<small>group ") == 2  # both members name their group
    assert 'id="workflow"><p><span class="status s-success">succeeded</span>' in page


async def test_the_trace_link_follows_the_template() -> None:
    settings = ConsoleSettings(TOKEN, trace_url="https://jaeger.example/trace/{trace_id}")
    assert settings.trace_link("abc/def") == "https://jaeger.example/trace/abc%2Fdef"
    assert settings.trace_link(None) is None
    assert ConsoleSettings(TOKEN).trace_link("abc") is None
    for bad in ["javascript:alert(1)//{trace_id}", "https://jaeger.example/"]:
        with pytest.raises(ConfigurationError, match="trace URL"):
            ConsoleSettings(TOKEN, trace_url=bad)
    with pytest.raises(ConfigurationError, match="16 characters"):
        ConsoleSettings("short")


async def test_a_traced_task_links_to_its_trace(make_console: MakeConsole) -> None:
    from opentelemetry.sdk.trace import TracerProvider

    from qtasks_stream.telemetry.tracing import TracingInterceptor

    console = await make_console(start=False, trace_url="https://jaeger.example/t/{trace_id}")
    console.app.add_interceptor(TracingInterceptor(TracerProvider()))
    await console.app.start()
    task_id = await console.submit("add", 1, 2)
    await console.ended(task_id)
    page = (await console.signed_in().get(f"/tasks/{task_id}")).text
    history = (
        await console.client.get(
            f"/api/tasks/{task_id}/history", headers={"authorization": f"Bearer {TOKEN}"}
        )
    ).json()
    assert history["trace_id"]
    assert f'href="https://jaeger.example/t/{history["trace_id"]}"' in page


async def test_dead_letters_page_lists_and_replays(make_console: MakeConsole) -> None:
    from tests.apps import console_app as tasks

    console = await make_console(unreadable_submits=True)
    # countdown=0: through the scheduler, which dead-letters the unreadable submit (a
    # task due now would go from the client straight to its lane and run).
    tasks.BROKEN.add("later")
    task_id = await console.submit("later", countdown=0)
    assert (await console.ended(task_id)).status == "dead_letter"
    await console.settled()
    signed = console.signed_in()
    page = (await signed.get("/dead-letters")).text
    assert "cannot read submits" in page and task_id in page
    tasks.BROKEN.clear()
    letters = [
        f"{d.partition}:{d.offset}"
        for d in await __import__("qtasks_stream.ops.dlq", fromlist=["x"]).list_dead_letters(
            console.app.event_log, console.app.topology
        )
    ]
    replayed = await signed.post(
        "/dead-letters/replay",
        data={"csrf": console.settings.csrf_token, "letters": letters},
    )
    assert replayed.status_code == 200 and "replayed" in replayed.text
    assert (await console.status(task_id, "success")).returning == "late"


async def test_only_the_allowed_host_names_are_answered(make_console: MakeConsole) -> None:
    console = await make_console(allowed_hosts=("console.test",))
    assert (await console.client.get("/api/counts", headers=BEARER)).status_code == 200
    rebound = await console.client.get(
        "/api/counts", headers={**BEARER, "host": "attacker.example"}
    )
    assert rebound.status_code == 400


async def test_resubmit_through_the_form(console: Console) -> None:
    task_id = await console.submit("fails", "once")
    await console.ended(task_id)
    signed = console.signed_in()
    done = await signed.post(
        f"/tasks/{task_id}/resubmit", data={"csrf": console.settings.csrf_token, "reason": "r"}
    )
    assert done.status_code == 303 and done.headers["location"].endswith("?done=resubmit")
    await eventually_attempt(console, task_id, 4)
    again = await signed.post(
        f"/tasks/{task_id}/resubmit", data={"csrf": console.settings.csrf_token}
    )
    assert again.status_code == 303  # ended again: a fifth attempt
    await eventually_attempt(console, task_id, 5)
    done_ok = await console.submit("add", 1, 2)
    await console.ended(done_ok)
    refused = await signed.post(
        f"/tasks/{done_ok}/resubmit", data={"csrf": console.settings.csrf_token}
    )
    assert refused.status_code == 409 and "not resubmitted" in refused.text
    unknown = await signed.post("/tasks/nope/resubmit", data={"csrf": console.settings.csrf_token})
    assert unknown.status_code == 404 and "no events in the log" in unknown.text


async def eventually_attempt(console: Console, task_id: str, attempt: int) -> None:
    from tests.e2ehelpers import eventually

    await eventually(
        lambda: console.app.get(task_id),
        lambda t: t is not None and t.final and t.attempt == attempt,
        what=f"attempt {attempt} of {task_id} ended",
        limit=10.0,
    )
