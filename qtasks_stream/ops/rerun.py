"""Re-running work: new attempts of tasks that ended in error, timeout or a dead letter.

Candidates are chosen from the log, not from a view (a view may lag or be partial): one read
of the events topic folds every task, and the filters pick among them. Each chosen task gets
a ``Resubmitted`` event carrying the arguments of its first submit and the number of the
attempt that follows its last one; the scheduler releases that attempt into its lane as it
would a retry that came due, and the task then lives its normal lifecycle. Two resubmits of
the same task racing each other cannot both run: the fold accepts a ``Resubmitted`` only for
an ended task and a higher attempt number, so the second one in the log is ignored.

Cancelled tasks are not resubmitted: a worker remembers the ids it was told to cancel and
would cancel the new attempt again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from qtasks_stream.errors import ConfigurationError
from qtasks_stream.eventlog.base import EventLog
from qtasks_stream.events import RESUBMIT, Resubmitted, Submitted, TaskEvent, as_record
from qtasks_stream.ops.replay import read_events
from qtasks_stream.records import OutRecord
from qtasks_stream.serde.base import Serde
from qtasks_stream.state import TaskState, fold
from qtasks_stream.topology import Topology
from qtasks_stream.views.base import Applied

__all__ = [
    "RESUBMITTABLE",
    "Resubmission",
    "ResubmitFilter",
    "find_resubmissions",
    "records_of",
]

#: Statuses a task can be resubmitted from.
RESUBMITTABLE = frozenset({"error", "timeout", "dead_letter"})


@dataclass(frozen=True, slots=True)
class ResubmitFilter:
    """Which ended tasks to resubmit; every filter given must match."""

    task_name: str | None = None
    #: Subset of :data:`RESUBMITTABLE`.
    statuses: frozenset[str] = RESUBMITTABLE
    #: Created at or after / before, µs since the epoch.
    since_us: int | None = None
    until_us: int | None = None
    #: Explicit ids (None: any).
    task_ids: frozenset[str] | None = None

    def __post_init__(self) -> None:
        if not self.statuses or not self.statuses <= RESUBMITTABLE:
            raise ConfigurationError(
                f"statuses must be among {sorted(RESUBMITTABLE)}, not {sorted(self.statuses)}"
            )

    def matches(self, state: TaskState) -> bool:
        return (
            state.status in self.statuses
            and (self.task_name is None or state.task_name == self.task_name)
            and (self.since_us is None or state.created_us >= self.since_us)
            and (self.until_us is None or state.created_us < self.until_us)
            and (self.task_ids is None or state.task_id in self.task_ids)
        )


@dataclass(frozen=True, slots=True)
class Resubmission:
    """One task chosen (or refused, with ``refused`` saying why)."""

    task_id: str
    task_name: str
    status: str
    last_attempt: int
    event: TaskEvent | None = None
    refused: str | None = None

    @property
    def next_attempt(self) -> int:
        return self.last_attempt + 1


async def find_resubmissions(
    event_log: EventLog,
    serde: Serde,
    topology: Topology,
    what: ResubmitFilter,
    reason: str,
) -> list[Resubmission]:
    """The resubmissions ``what`` selects, each with its ``Resubmitted`` event, plus a refused
    entry for every explicit id that cannot be resubmitted."""
    states: dict[str, TaskState] = {}
    submits: dict[str, Submitted] = {}
    last_attempt: dict[str, int] = {}
    ids = what.task_ids

    async def take(batch: list[Applied]) -> None:
        for item in batch:
            event = item.event
            if ids is not None and event.task_id not in ids:
                continue
            states[event.task_id] = fold(states.get(event.task_id), event)
            last_attempt[event.task_id] = max(last_attempt.get(event.task_id, 0), event.attempt)
            if isinstance(event.payload, Submitted) and event.task_id not in submits:
                submits[event.task_id] = event.payload

    await read_events(event_log, serde, topology.events, topology.partitions, take)
    out: list[Resubmission] = []
    for task_id in sorted(ids or ()):
        if task_id not in states:
            out.append(Resubmission(task_id, "", "unknown", 0, refused="no events in the log"))
    for task_id, state in sorted(states.items(), key=lambda kv: (kv[1].created_us, kv[0])):
        attempt = max(last_attempt[task_id], state.attempt)
        if not what.matches(state):
            if ids is not None:
                why = (
                    f"status {state.status} is not one of {sorted(what.statuses)}"
                    if state.status not in what.statuses
                    else "does not match the filters"
                )
                out.append(Resubmission(task_id, state.task_name, state.status, attempt, None, why))
            continue
        submitted = submits.get(task_id)
        if submitted is None:
            out.append(
                Resubmission(
                    task_id,
                    state.task_name,
                    state.status,
                    attempt,
                    None,
                    "its Submitted event is not readable (replay its dead letter instead)",
                )
            )
            continue
        payload = Resubmitted(
            reason=reason,
            previous_status=state.status,
            mode=RESUBMIT,
            args=submitted.args,
            kwargs=submitted.kwargs,
            content_type=submitted.content_type,
            priority=state.priority,
            max_time=submitted.max_time,
            arguments_avro=submitted.arguments_avro,
        )
        event = TaskEvent.new(task_id, state.task_name, attempt + 1, "client", payload)
        out.append(Resubmission(task_id, state.task_name, state.status, attempt, event))
    return out


def records_of(serde: Serde, topology: Topology, chosen: Sequence[Resubmission]) -> list[OutRecord]:
    """The records of the ``Resubmitted`` events of ``chosen`` (refused ones are skipped)."""
    return [
        as_record(serde, topology.events, r.task_id, r.event) for r in chosen if r.event is not None
    ]
