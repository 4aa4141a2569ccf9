"""What the workflow stage asks the runner to decode: only what a workflow can use."""

from __future__ import annotations

from qtasks_stream.events import KIND_HEADER
from qtasks_stream.records import Record, TopicPartition
from qtasks_stream.serde.payloads import TaskPayloads
from qtasks_stream.topology import Topology
from qtasks_stream.workflows.fold import step_id
from qtasks_stream.workflows.stage import WorkflowStage

TOPOLOGY = Topology("wf", partitions=4)


def _record(key: str, kind: str) -> Record:
    tp = TopicPartition(TOPOLOGY.events, 0)
    return Record(tp.topic, tp.partition, 0, key.encode(), b"", ((KIND_HEADER, kind.encode()),))


def test_only_workflow_records_are_decoded() -> None:
    stage = WorkflowStage(TOPOLOGY, TaskPayloads.__new__(TaskPayloads), {})
    plain = "0190f0f0-aaaa-7bbb-8ccc-123456789abc"
    step = step_id(plain, "0", TOPOLOGY.partitions)
    # A plain task's events, its Submitted included, are skipped undecoded.
    for kind in ("Submitted", "Scheduled", "Started", "Succeeded", "Failed"):
        assert not stage.wants_value(_record(plain, kind)), kind
    # A step's Submitted and its ends are decoded; a cancel always (a workflow's id is no
    # step's).
    for kind in ("Submitted", "Succeeded", "Failed", "Resubmitted", "CancelRequested"):
        assert stage.wants_value(_record(step, kind)), kind
    assert stage.wants_value(_record(plain, "CancelRequested"))
    assert not stage.wants_value(_record(step, "Started"))
