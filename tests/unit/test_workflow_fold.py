"""The workflow fold and the canvas, without a log."""

from __future__ import annotations

import pytest

from qtasks_stream.errors import ConfigurationError
from qtasks_stream.eventlog.partitioning import murmur2_partition
from qtasks_stream.events import new_task_id, task_id_ms
from qtasks_stream.workflows.canvas import Signature, chain, chord, dumps, group, parse
from qtasks_stream.workflows.fold import Launch, StepOutcome, advance, is_step_id, step_id


def s(task: str, *args: object) -> Signature:
    return Signature(task, args)


def ready(canvas: object, outcomes: dict[str, StepOutcome]) -> list[str]:
    launches: list[Launch] = []
    advance(canvas, outcomes, launches)  # type: ignore[arg-type]
    return [launch.path for launch in launches]


def ok(path: str, value: object) -> StepOutcome:
    return StepOutcome(f"id-{path}", "succeeded", value)


def bad(path: str) -> StepOutcome:
    return StepOutcome(f"id-{path}", "failed", None, {"task_id": f"id-{path}"})


def test_a_chain_runs_one_step_at_a_time_and_stops_at_a_failure() -> None:
    canvas = chain(s("a", 1), s("b"), s("c"))
    assert ready(canvas, {}) == ["0"]
    launches: list[Launch] = []
    advance(canvas, {"0": ok("0", 5)}, launches)
    assert [(x.path, x.args, x.parents, x.has_input) for x in launches] == [
        ("1", (5,), ("id-0",), True)
    ]
    assert ready(canvas, {"0": ok("0", 5), "1": bad("1")}) == []
    result = advance(canvas, {"0": ok("0", 5), "1": bad("1")}, [])
    assert result.status == "failed" and result.failures == [{"task_id": "id-1"}]


def test_a_chord_waits_for_all_members_and_honours_on_error() -> None:
    stop = chord([s("a", 1), s("b", 2)], s("cb"))
    passing = chord([s("a", 1), s("b", 2)], s("cb"), on_error="pass")
    assert ready(stop, {"0": ok("0", 1)}) == ["1"]
    done = {"0": ok("0", 1), "1": bad("1")}
    assert ready(stop, done) == [] and advance(stop, done, []).status == "failed"
    launches: list[Launch] = []
    advance(passing, done, launches)
    assert [(x.path, x.args) for x in launches] == [("body", ([1, {"task_id": "id-1"}],))]
    assert launches[0].parents == ("id-0", "id-1")
    both = {"0": ok("0", 1), "1": ok("1", 2), "body": ok("body", 3)}
    assert advance(stop, both, []).value == 3


def test_a_group_in_a_chain_gets_the_input_and_collects_in_order() -> None:
    canvas = chain(s("a"), group(s("b"), chain(s("c"), s("d"))), s("e"))
    outcomes = {"0": ok("0", 1)}
    assert ready(canvas, outcomes) == ["1.0", "1.1.0"]
    outcomes |= {"1.0": ok("1.0", 2), "1.1.0": ok("1.1.0", 3)}
    assert ready(canvas, outcomes) == ["1.1.1"]
    outcomes |= {"1.1.1": ok("1.1.1", 4)}
    launches: list[Launch] = []
    advance(canvas, outcomes, launches)
    assert [(x.path, x.args) for x in launches] == [("2", ([2, 4],))]


def test_step_ids_are_deterministic_on_the_workflows_partition() -> None:
    workflow_id = new_task_id()
    for partitions in (1, 4, 12):
        ids = [step_id(workflow_id, str(i), partitions) for i in range(20)]
        assert ids == [step_id(workflow_id, str(i), partitions) for i in range(20)]
        assert len(set(ids)) == 20
        want = murmur2_partition(workflow_id.encode(), partitions)
        assert {murmur2_partition(i.encode(), partitions) for i in ids} == {want}
        assert all(is_step_id(i.encode()) and not is_step_id(workflow_id.encode()) for i in ids)
        assert {task_id_ms(i) for i in ids} == {task_id_ms(workflow_id)}


def test_the_canvas_round_trips_and_refuses_what_is_not_json() -> None:
    canvas = chain(s("a", 1), chord(group(s("b", "x")), s("c", 2.5), on_error="pass"))
    assert parse(dumps(canvas, set())) == canvas
    head = canvas.steps[0]
    assert parse(dumps(canvas, {id(head)})).steps[0] == Signature("a")  # type: ignore[union-attr]
    with pytest.raises(ConfigurationError, match="must be JSON"):
        dumps(chain(s("a"), s("b", object())), set())
    with pytest.raises(ConfigurationError, match="on_error"):
        chord([s("a")], s("b"), on_error="ignore")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="at least one"):
        chain()
    with pytest.raises(ConfigurationError, match="not a workflow canvas"):
        parse('{"chord": {"task": "a"}, "body": {"task": "b"}}')
