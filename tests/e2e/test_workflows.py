"""Workflows (chain, group, chord) on the embedded default: the workflow stage folds the
steps' ends from the log and submits what follows. A chain's stop on failure and resume on
resubmit runs on every backend (the contract suite's, on the dev broker too)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import pytest
from confluent_kafka.schema_registry import SchemaRegistryClient

from qtasks_stream import QueueTasks
from qtasks_stream.errors import TaskNotFoundError
from qtasks_stream.eventlog.memory import InMemoryEventLog
from qtasks_stream.events import TERMINAL_KINDS, Submitted, now_us
from qtasks_stream.ops.rerun import ResubmitFilter
from qtasks_stream.workflows import chain, chord, group
from tests.contract.test_lifecycle import BACKENDS, Backend, backend_of
from tests.e2ehelpers import eventually

LIMIT = 10.0


@dataclass
class Point:
    x: int
    y: int


def _tasks(
    app: QueueTasks, gate: asyncio.Event | None = None, started: asyncio.Event | None = None
) -> dict[str, object]:
    running: list[int] = []

    @app.task
    def add(a: int, b: int) -> int:
        return a + b

    @app.task
    def double(a: int) -> int:
        return a * 2

    @app.task
    def total(values: list[int]) -> int:
        return sum(values)

    @app.task
    def boom(a: int) -> int:
        raise ValueError(f"boom {a}")

    @app.task
    def describe(values: list) -> list:  # type: ignore[type-arg]
        return [v if isinstance(v, int) else v["error_type"] for v in values]

    @app.task
    def move(p: Point, dx: int) -> Point:
        return Point(p.x + dx, p.y)

    @app.task
    def norm(p: Point) -> int:
        assert isinstance(p, Point)  # typed between steps, not a dict
        return p.x + p.y

    @app.task
    async def slow(a: int) -> int:
        assert gate is not None and started is not None
        running.append(a)
        if len(running) == 2:
            started.set()
        await gate.wait()
        return a

    return {
        "add": add,
        "double": double,
        "total": total,
        "boom": boom,
        "describe": describe,
        "move": move,
        "norm": norm,
        "slow": slow,
    }


async def test_chain_passes_each_result_on(make_app: Callable[..., QueueTasks]) -> None:
    app = make_app("wf-chain")
    t = _tasks(app)
    async with app:
        handle = await app.run_workflow(chain(t["add"].s(1, 2), t["double"].s(), t["add"].s(10)))  # type: ignore[attr-defined]
        result = await handle.result(LIMIT)
        assert result is not None and result.status == "success"
        assert result.value == (1 + 2) * 2 + 10
        history = await app.history(handle.step_id("2"))
        submitted = history[0].payload
        assert isinstance(submitted, Submitted)
        assert submitted.workflow_id == handle.workflow_id
        assert submitted.workflow_step == "2"
        assert submitted.workflow_parents == (handle.step_id("1"),)


async def test_group_and_chord_collect_in_order(make_app: Callable[..., QueueTasks]) -> None:
    app = make_app("wf-chord")
    t = _tasks(app)
    async with app:
        g = await app.run_workflow(group(*(t["double"].s(i) for i in range(5))))  # type: ignore[attr-defined]
        c = await app.run_workflow(
            chord([t["double"].s(i) for i in range(5)], t["total"].s())  # type: ignore[attr-defined]
        )
        gr, cr = await g.result(LIMIT), await c.result(LIMIT)
        assert gr is not None and gr.value == [0, 2, 4, 6, 8]
        assert cr is not None and cr.value == 20
        body = (await app.history(c.step_id("body")))[0].payload
        assert isinstance(body, Submitted)
        assert set(body.workflow_parents) == {c.step_id(str(i)) for i in range(5)}
        member = (await app.history(c.step_id("3")))[0].payload
        assert isinstance(member, Submitted) and member.group_id is not None


async def test_nesting(make_app: Callable[..., QueueTasks]) -> None:
    app = make_app("wf-nest")
    t = _tasks(app)
    async with app:
        canvas = chain(
            t["add"].s(1, 1),  # type: ignore[attr-defined]
            chord(group(t["double"].s(), chain(t["add"].s(1), t["double"].s())), t["total"].s()),  # type: ignore[attr-defined]
            t["add"].s(100),  # type: ignore[attr-defined]
        )
        handle = await canvas.apply(app)
        result = await handle.result(LIMIT)
        # 2 → [4, (2+1)*2=6] → 10 → 110
        assert result is not None and result.value == 110


async def test_typed_values_between_steps(make_app: Callable[..., QueueTasks]) -> None:
    app = make_app("wf-typed")
    t = _tasks(app)
    async with app:
        handle = await app.run_workflow(
            chain(t["move"].s(Point(1, 2), 3), t["move"].s(1), t["norm"].s())
        )  # type: ignore[attr-defined]
        result = await handle.result(LIMIT)
        assert result is not None and result.status == "success" and result.value == 7


@pytest.fixture(params=BACKENDS)
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    async with backend_of(request) as built:
        yield built


async def test_chain_stops_at_failure_and_resumes_on_resubmit(backend: Backend) -> None:
    app = backend.app("wf-resume")
    t = _tasks(app)
    fail = {"on": True}

    @app.task
    def flaky(a: int) -> int:
        if fail["on"]:
            raise RuntimeError("not yet")
        return a + 1

    await backend.start(app)
    handle = await app.run_workflow(chain(t["add"].s(1, 1), flaky.s(), t["double"].s()))  # type: ignore[attr-defined]
    result = await handle.result(backend.limit)
    assert result is not None and result.status == "error"
    assert [f["error_type"] for f in result.failures] == ["RuntimeError"]
    assert result.failures[0]["task_id"] == handle.step_id("1")
    assert await app.history(handle.step_id("2")) == []  # the chain stopped
    fail["on"] = False
    found = await app.resubmit(ResubmitFilter(task_ids=frozenset({handle.step_id("1")})))
    assert [r.task_id for r in found if r.event is not None] == [handle.step_id("1")]
    result = await handle.result(backend.limit)
    assert result is not None and result.status == "success" and result.value == 6
    # Every step ended once with its final outcome: the failed one twice (it was resubmitted).
    ends = Counter(e.task_id for e in await backend.events(app) if e.kind in TERMINAL_KINDS)
    assert ends == {handle.step_id("0"): 1, handle.step_id("1"): 2, handle.step_id("2"): 1}


async def test_chord_callback_waits_for_success_or_takes_failures(
    make_app: Callable[..., QueueTasks],
) -> None:
    app = make_app("wf-onerror")
    t = _tasks(app)
    async with app:
        stop = await app.run_workflow(chord([t["double"].s(1), t["boom"].s(2)], t["describe"].s()))  # type: ignore[attr-defined]
        passed = await app.run_workflow(
            chord([t["double"].s(1), t["boom"].s(2)], t["describe"].s(), on_error="pass")  # type: ignore[attr-defined]
        )
        stopped, ran = await stop.result(LIMIT), await passed.result(LIMIT)
        assert stopped is not None and stopped.status == "error"
        assert await app.history(stop.step_id("body")) == []
        assert ran is not None and ran.status == "success"
        assert ran.value == [2, "ValueError"]


async def test_cancel_cancels_running_steps_and_starts_no_more(
    make_app: Callable[..., QueueTasks],
) -> None:
    gate, started = asyncio.Event(), asyncio.Event()
    app = make_app("wf-cancel")
    t = _tasks(app, gate, started)
    async with app:
        handle = await app.run_workflow(
            chain(group(t["slow"].s(1), t["slow"].s(2)), t["total"].s())  # type: ignore[attr-defined]
        )
        async with asyncio.timeout(LIMIT):
            await started.wait()
        await handle.cancel("enough")
        result = await handle.result(LIMIT)
        assert result is not None and result.status == "error"
        assert {f["status"] for f in result.failures} == {"cancel"}
        assert await app.history(handle.step_id("1")) == []


async def test_a_workflow_stage_started_late_restores_and_continues(
    make_app: Callable[..., QueueTasks],
) -> None:
    """The stage's restore reads each step's Submitted and its end in one batch (as after a
    SIGKILL, when another instance takes the partition over) and submits what follows."""
    app = make_app("wf-late")
    t = _tasks(app)
    await app.start(["projector", "scheduler", "worker"])
    handle = await app.run_workflow(chord([t["double"].s(i) for i in range(4)], t["total"].s()))  # type: ignore[attr-defined]
    for i in range(4):
        member = await app.wait(handle.step_id(str(i)), LIMIT)
        assert member is not None and member.status == "success"
    assert await app.history(handle.step_id("body")) == []
    await app.start(["workflow"])
    result = await handle.result(LIMIT)
    assert result is not None and result.value == 12
    submits = [e for e in await app.history(handle.step_id("body")) if e.kind == "Submitted"]
    assert len(submits) == 1


async def test_history_tree_shows_steps_attempts_and_outcomes(
    make_app: Callable[..., QueueTasks], capsys: pytest.CaptureFixture[str]
) -> None:
    from qtasks_stream.cli.audit import history as history_command

    log = InMemoryEventLog()
    registry = SchemaRegistryClient.new_client({"url": f"mock://tree-{uuid.uuid4().hex}"})
    app = make_app("wf-tree", event_log=log, schema_registry=registry)
    t = _tasks(app)
    async with app:
        handle = await app.run_workflow(
            chain(t["add"].s(1, 1), chord([t["double"].s(), t["boom"].s()], t["total"].s()))  # type: ignore[attr-defined]
        )
        result = await handle.result(LIMIT)
        assert result is not None and result.status == "error"
        tool = make_app("wf-tree", event_log=log, schema_registry=registry)
        _tasks(tool)
        # By a step's id as well as by the workflow's.
        assert await history_command(tool, handle.step_id("1.0"), True, None, tree=True) == 0
        document = json.loads(capsys.readouterr().out)
        assert (document["workflow_id"], document["status"]) == (handle.workflow_id, "failed")
        chord_node = document["tree"]["children"][1]
        members = [m["step"] for m in chord_node["header"]["children"]]
        assert [(m["task_name"], m["status"]) for m in members] == [
            ("double", "success"),
            ("boom", "error"),
        ]
        assert members[1]["attempts"][0]["error"]["type"] == "ValueError"
        assert members[0]["parents"] == [handle.step_id("0")]
        assert chord_node["body"]["step"] == {"path": "1.body"}

        tool = make_app("wf-tree", event_log=log, schema_registry=registry)
        _tasks(tool)
        assert await history_command(tool, handle.workflow_id, False, None, tree=True) == 0
        text = capsys.readouterr().out.splitlines()
        assert text[0] == f"workflow {handle.workflow_id}: failed"
        assert any(line.strip() == "1.body total: not submitted" for line in text)
        assert any("→ Failed" in line and "ValueError: boom 2" in line for line in text)


async def test_ended_workflows_are_forgotten_after_the_retention(
    make_app: Callable[..., QueueTasks],
) -> None:
    from qtasks_stream.workflows.stage import WorkflowStage

    app = make_app("wf-prune")
    t = _tasks(app)
    async with app:
        handle = await app.run_workflow(chain(t["add"].s(1, 2), t["double"].s()))  # type: ignore[attr-defined]
        result = await handle.result(LIMIT)
        assert result is not None and result.status == "success"
        stage = app.runners["workflow"].stage
        assert isinstance(stage, WorkflowStage)
        assert stage.held() == {"workflows": 1, "steps": 2}
        # The client may see the last end before the stage has folded it.
        wf = stage._workflows[handle.workflow_id]
        await eventually(lambda: wf.ended_ms, what="the stage folds the end", limit=LIMIT)
        now_ms = now_us() // 1000
        stage._prune(now_ms)  # within the retention: kept (a resubmit could reopen it)
        assert stage.held() == {"workflows": 1, "steps": 2}
        stage._prune(now_ms + app.topology.retention_ms + 1)
        assert stage.held() == {"workflows": 0, "steps": 0}


async def test_another_client_attaches_to_a_workflow_by_its_id(
    make_app: Callable[..., QueueTasks],
) -> None:
    log = InMemoryEventLog()
    registry = SchemaRegistryClient.new_client({"url": f"mock://attach-{uuid.uuid4().hex}"})
    app = make_app("wf-attach", event_log=log, schema_registry=registry)
    t = _tasks(app)
    async with app:
        canvas = chord([chain(t["add"].s(1, 2), t["double"].s()), t["double"].s(4)], t["total"].s())  # type: ignore[attr-defined]
        handle = await app.run_workflow(canvas)
        other = make_app("wf-attach", event_log=log, schema_registry=registry)
        _tasks(other)
        attached = await other.workflow(handle.workflow_id)
        assert attached.step_id("body") == handle.step_id("body")
        result = await attached.result(LIMIT)
        assert result is not None and result.value == 6 + 8
        with pytest.raises(TaskNotFoundError):
            await other.workflow(str(uuid.uuid4()))


async def test_a_cancel_the_stage_did_not_act_on_is_carried_out_after_its_restore(
    make_app: Callable[..., QueueTasks],
) -> None:
    """The workflow's cancel is in the log, its steps' cancels are not (the stage died before
    committing them): the partition's next owner sends them once restored."""
    gate, started = asyncio.Event(), asyncio.Event()
    app = make_app("wf-cancel-late")
    t = _tasks(app, gate, started)
    await app.start(["projector", "scheduler", "worker"])
    handle = await app.run_workflow(chain(group(t["slow"].s(1), t["slow"].s(2)), t["total"].s()))  # type: ignore[attr-defined]
    async with asyncio.timeout(LIMIT):
        await started.wait()
    await handle.cancel("enough")
    await app.start(["workflow"])
    result = await handle.result(LIMIT)
    assert result is not None and result.status == "error"
    assert {f["status"] for f in result.failures} == {"cancel"}
    assert await app.history(handle.step_id("1")) == []


async def test_steps_go_to_their_tasks_queues(make_app: Callable[..., QueueTasks]) -> None:
    app = make_app("wf-queues")
    t = _tasks(app)

    @app.task(queue="gpu")
    def render(a: int) -> int:
        return a * 10

    async with app:
        handle = await app.run_workflow(chain(render.s(1), t["double"].s(), render.s()))  # type: ignore[attr-defined]
        result = await handle.result(LIMIT)
        assert result is not None and result.value == 200
        queues = []
        for path in ("0", "1", "2"):
            submitted = (await app.history(handle.step_id(path)))[0].payload
            assert isinstance(submitted, Submitted)
            queues.append(submitted.queue)
        assert queues == ["gpu", None, "gpu"]
