"""Units of audit and re-running work: the Resubmitted kind's schema change, the fold's
re-open rules, time parsing and trace ids."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from qtasks_stream.errors import ConfigurationError
from qtasks_stream.events import (
    DLQ_REPLAY,
    DeadLettered,
    Failed,
    Resubmitted,
    Started,
    Submitted,
    Succeeded,
    TaskEvent,
)
from qtasks_stream.ops.audit import as_of_us, parse_time_us, state_as_of
from qtasks_stream.serde.compat import check_compatibility
from qtasks_stream.serde.schemas import load_schema_text
from qtasks_stream.state import TaskState, fold
from qtasks_stream.telemetry.propagation import trace_id_of as trace_id
from tests.unit.test_compat import SUBJECT, FakeRegistry, text
from tests.unit.test_scheduler import TOPOLOGY, Harness, _events, _kinds, _submit, _work

TASK_EVENT: dict[str, Any] = json.loads(load_schema_text("TaskEvent"))


def _without_resubmitted() -> dict[str, Any]:
    """TaskEvent as it was before the Resubmitted kind."""
    schema = copy.deepcopy(TASK_EVENT)
    payload = next(f for f in schema["fields"] if f["name"] == "payload")["type"]
    payload[:] = [b for b in payload if b["name"] != "Resubmitted"]
    return schema


def test_resubmitted_is_the_last_kind_of_the_union() -> None:
    payload = next(f for f in TASK_EVENT["fields"] if f["name"] == "payload")["type"]
    assert payload[-1]["name"] == "Resubmitted"


def test_adding_resubmitted_is_backward_transitive_compatible() -> None:
    previous = _without_resubmitted()
    registry = FakeRegistry({SUBJECT: [text(previous), text(previous)]})
    assert check_compatibility(registry, {SUBJECT: text(TASK_EVENT)}) == []
    # The checker does see the change: old readers cannot read the new kind.
    problems = check_compatibility(registry, {SUBJECT: text(TASK_EVENT)}, "FORWARD")
    assert problems and all("payload" in p.field for p in problems)


def _fields(schema: Any) -> list[tuple[str, dict[str, Any]]]:
    found: list[tuple[str, dict[str, Any]]] = []
    if isinstance(schema, list):
        for branch in schema:
            found += _fields(branch)
    elif isinstance(schema, dict):
        if schema.get("type") == "record":
            for field in schema["fields"]:
                found.append((f"{schema['name']}.{field['name']}", field))
                found += _fields(field["type"])
        elif schema.get("type") == "array":
            found += _fields(schema["items"])
    return found


@pytest.mark.parametrize("name", ["TaskEvent", "TaskSnapshot"])
def test_every_field_has_a_doc(name: str) -> None:
    undocumented = [
        path for path, field in _fields(json.loads(load_schema_text(name))) if not field.get("doc")
    ]
    assert undocumented == []


def event(kind: Any, attempt: int, at_us: int, name: str = "job") -> TaskEvent:
    return TaskEvent("t1", name, attempt, "test", kind, at_us, f"e{at_us}")


def resubmit(attempt: int, at_us: int, mode: str = "resubmit") -> TaskEvent:
    return event(Resubmitted("again", "error", mode, "[1]", "{}", priority=2), attempt, at_us)


FAILED = Failed("ValueError", "bad", "tb", 1.0)


def failed_task() -> TaskState:
    state = fold(None, event(Submitted("[1]", "{}", 0), 0, 1))
    return fold(state, event(FAILED, 2, 2))


def test_resubmitted_reopens_an_ended_task_as_a_retry_due_now() -> None:
    state = fold(failed_task(), resubmit(3, 10))
    assert (state.status, state.attempt, state.due_us, state.priority) == ("retry", 2, 10, 2)
    assert state.error_type == "ValueError", "the last error stays until an attempt succeeds"
    state = fold(state, event(Succeeded("1", 1.0), 3, 11))
    assert (state.status, state.attempt, state.error_type) == ("success", 3, None)


def test_of_two_racing_resubmits_the_first_in_the_log_wins() -> None:
    state = fold(failed_task(), resubmit(3, 10))
    assert fold(state, resubmit(3, 11)).events == state.events  # ignored while open
    state = fold(state, event(FAILED, 3, 12))
    again = fold(state, resubmit(3, 13))
    assert (again.status, again.updated_us) == ("error", 12), "a stale resubmit reopened it"
    assert fold(again, resubmit(4, 14)).status == "retry"


def test_resubmitted_does_not_touch_a_running_task() -> None:
    state = fold(None, event(Submitted("[]", "{}", 0), 0, 1))
    assert fold(state, resubmit(2, 5)).status == "new"


def test_a_dlq_replay_reopens_only_a_dead_lettered_task() -> None:
    assert fold(failed_task(), resubmit(2, 10, DLQ_REPLAY)).status == "error"
    state = fold(None, event(Submitted("[]", "{}", 0), 0, 1))
    state = fold(state, event(DeadLettered("unknown task", "worker", "lane", 0, 3), 0, 2))
    state = fold(state, resubmit(1, 10, DLQ_REPLAY))
    assert (state.status, state.attempt) == ("scheduled", 0)


def test_the_replayed_copy_of_a_dead_lettered_submit_makes_the_task_new() -> None:
    # The submit itself could not be read: the task is known from its DeadLettered event.
    lost = DeadLettered("cannot decode", "scheduler", "events", 0, 3)
    state = fold(None, event(lost, 0, 2, name=""))
    assert (state.status, state.submitted) == ("dead_letter", False)
    state = fold(state, resubmit(0, 10, DLQ_REPLAY))
    state = fold(state, event(Submitted("[7]", "{}", 4), 0, 1, name="job"))
    assert (state.status, state.task_name, state.args, state.priority) == ("new", "job", "[7]", 4)
    assert (state.submitted, state.created_us) == (True, 1)
    # Once one was folded, a repeat is ignored: the first submit wins.
    assert fold(state, event(Submitted("[8]", "{}", 0), 0, 11)).args == "[7]"


def test_a_submit_is_still_ignored_after_a_replayed_work_item() -> None:
    state = fold(None, event(Submitted("[1]", "{}", 0), 0, 1))
    state = fold(state, event(DeadLettered("unknown task", "worker", "lane", 0, 3), 0, 2))
    state = fold(fold(state, resubmit(1, 10, DLQ_REPLAY)), event(Submitted("[2]", "{}", 0), 0, 11))
    assert (state.status, state.args) == ("scheduled", "[1]")


def test_state_as_of_folds_only_what_happened_until_then() -> None:
    events = [event(Submitted("[]", "{}", 0), 0, 100), event(FAILED, 1, 200)]
    assert state_as_of(events, 99) is None
    assert state_as_of(events, 100).status == "new"  # type: ignore[union-attr]
    assert state_as_of(events, 200).status == "error"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("text_", "us"),
    [
        ("1764277200", 1764277200_000_000),
        ("1764277200.5", 1764277200_500_000),
        ("2025-11-27T21:00:00Z", 1764277200_000_000),
        ("2025-11-27T21:00:00", 1764277200_000_000),
        ("2025-11-27T22:00:00+01:00", 1764277200_000_000),
    ],
)
def test_times_are_iso_8601_or_epoch_seconds(text_: str, us: int) -> None:
    assert parse_time_us(text_) == us


def test_a_bad_time_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="ISO 8601"):
        parse_time_us("yesterday")
    from datetime import datetime

    with pytest.raises(ConfigurationError, match="timezone-aware"):
        as_of_us(datetime(2026, 1, 1))


def test_trace_id_is_the_second_part_of_a_traceparent() -> None:
    assert trace_id("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01") == (
        "4bf92f3577b34da6a3ce929d0e0e4736"
    )
    assert trace_id(None) is None and trace_id("garbage") is None


# -- the scheduler and Resubmitted ------------------------------------------------------------


def _worker(task_id: str, attempt: int, payload: Any) -> TaskEvent:
    return TaskEvent.new(task_id, "job", attempt, "worker:w1", payload)


def _resubmitted(task_id: str, attempt: int) -> TaskEvent:
    payload = Resubmitted("fixed", "error", "resubmit", '["b"]', "{}", priority=2, max_time=3.0)
    return TaskEvent.new(task_id, "job", attempt, "client", payload)


async def _failed_task(h: Harness) -> None:
    await h.assign()
    await h.feed(_submit("t1"))
    await h.feed(_worker("t1", 1, Started("worker:w1")), _worker("t1", 1, FAILED))


async def test_the_scheduler_releases_the_resubmitted_attempt_once() -> None:
    h = Harness()
    await _failed_task(h)
    assert await h.feed(_resubmitted("t1", 2)) == []
    _, outputs = await h.tick()
    assert [(e.kind, e.attempt) for e in _events(outputs)] == [("Released", 2)]
    [(topic, item)] = _work(outputs)
    assert topic == TOPOLOGY.lane(2)
    assert (item.attempt, item.args, item.priority, item.max_time) == (2, '["b"]', 2, 3.0)
    # A racing resubmit of the same attempt, and one while the task runs: nothing happens.
    assert await h.feed(_resubmitted("t1", 2)) == []
    assert (await h.tick())[1] == []


async def test_a_restore_releases_a_resubmit_that_had_not_been_released() -> None:
    before = Harness()
    await _failed_task(before)
    before.log.append(_resubmitted("t1", 2))
    after = Harness(before.log)
    await after.assign()
    assert await after.replay() == []
    _, outputs = await after.tick()
    assert [(e.kind, e.attempt) for e in _events(outputs)] == [("Released", 2)]
    assert [item.attempt for _, item in _work(outputs)] == [2]
    again = Harness(after.log)  # Released is in the log now: a restore does nothing
    await again.assign()
    assert await again.replay() == []
    assert (await again.tick())[1] == []


async def test_the_scheduler_schedules_a_replayed_dead_lettered_submit_once() -> None:
    harness = Harness()
    await harness.assign()  # an empty partition: nothing to restore
    lost = TaskEvent.new("t1", "", 0, "deadletter", DeadLettered("x", "scheduler", "e", 0, 0))
    assert await harness.feed(lost) == []
    marker = TaskEvent.new(
        "t1", "", 0, "dlq-replay", Resubmitted("fixed", "dead_letter", DLQ_REPLAY)
    )
    outputs = await harness.feed(marker, _submit("t1"))
    assert _kinds(outputs) == ["Scheduled"]
    assert [(item.task_name, item.args) for _, item in _work(outputs)] == [("job", '["a"]')]
    assert await harness.feed(_submit("t1")) == [], "a repeated submit was scheduled again"


def test_cancelled_tasks_cannot_be_chosen_for_a_resubmit() -> None:
    from qtasks_stream.ops.rerun import ResubmitFilter

    with pytest.raises(ConfigurationError, match="statuses must be among"):
        ResubmitFilter(statuses=frozenset({"error", "cancel"}))
    with pytest.raises(ConfigurationError, match="statuses must be among"):
        ResubmitFilter(statuses=frozenset())
