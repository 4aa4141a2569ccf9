"""Stream triggers: a task started once per record of a Kafka topic another team writes."""

from qtasks_stream.triggers.base import Topic, TriggerRecord, trigger_task_id

__all__ = ["Topic", "TriggerRecord", "trigger_task_id"]
