"""The command line: the demo on the embedded default, and configuration from the environment."""

from __future__ import annotations

import io
import os
import re
import sys
from contextlib import redirect_stdout

import pytest

from qtasks_stream import QueueTasks
from qtasks_stream.cli.main import load_app, main
from qtasks_stream.errors import ConfigurationError
from qtasks_stream.eventlog.kafka_aio import AioKafkaEventLog
from qtasks_stream.eventlog.kafka_confluent import ConfluentEventLog
from qtasks_stream.eventlog.memory import InMemoryEventLog
from qtasks_stream.settings import Settings


def test_demo_runs_every_path_and_prints_a_summary_and_a_history() -> None:
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["demo", "--tasks", "30"]) == 0
    text = out.getvalue()
    assert "event log InMemoryEventLog" in text
    assert "tasks/s end to end" in text and "p50" in text and "p99" in text
    for line in (
        "retried then succeeded",
        "failed",
        "delayed 0.5s",
        "cancelled while running",
    ):
        assert line in text
    assert "status=success  attempt=2" in text  # the retried one
    assert "status=error" in text and "status=cancel" in text
    beats = re.search(r"schedule 'heartbeat' \(every 1s\): (\d+) runs so far", text)
    assert beats is not None and int(beats.group(1)) >= 1, text
    assert "bulk tasks not successful: 0" in text
    # 2 * (1 + 2 + 3 + 4): every parcel weighed, the callback summed them once.
    assert "chord: 4 parcels weighed in parallel, then summed: status=success total=20" in text
    assert (
        "trigger 'demo.shop-orders': 3 records written, 3 ship tasks succeeded; "
        "shipped order 1; shipped order 2; shipped order 3"
    ) in text
    history = text.split("as `history` prints it):")[1]
    assert "attempt 2  on worker:" in history and "→ Succeeded" in history
    kinds = [
        re.search(r"ms\s+\S+\s+(\w+)", line).group(1)  # type: ignore[union-attr]
        for line in history.strip().splitlines()
        if line.startswith("  +")
    ]
    assert kinds == [
        "Submitted",
        "Scheduled",
        "Started",
        "RetryScheduled",
        "Released",
        "Started",
        "Succeeded",
    ]


def test_demo_refuses_too_few_tasks() -> None:
    with pytest.raises(ValueError, match="at least 5 tasks"):
        main(["demo", "--tasks", "2"])


def test_worker_refuses_a_snapshot_period_that_is_not_positive(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["worker", "-A", "tests.apps.view_app:app", "--snapshot-every", "0"]) == 2
    assert "--snapshot-every must be > 0 seconds, not 0" in capsys.readouterr().err


def test_configure_without_kafka_keeps_the_embedded_default() -> None:
    app = QueueTasks("envless").configure(Settings.from_env({}))
    assert isinstance(app.event_log, InMemoryEventLog)
    assert app.topology.events == "qtasks.envless.events"


@pytest.mark.parametrize(
    ("kind", "cls"), [("aiokafka", AioKafkaEventLog), ("confluent", ConfluentEventLog)]
)
def test_configure_moves_an_app_onto_kafka_from_the_environment(kind: str, cls: type) -> None:
    settings = Settings.from_env(
        {
            "QTASKS_BOOTSTRAP_SERVERS": "127.0.0.1:1",
            "QTASKS_EVENT_LOG": kind,
            "QTASKS_TOPIC_PREFIX": "team-a.",
            "QTASKS_INSTANCE_ID": "w7",
        }
    )
    for app in (QueueTasks("shop").configure(settings), QueueTasks("shop", settings=settings)):
        assert isinstance(app.event_log, cls)  # built lazily: nothing connects here
        assert app.topology.events == "team-a.shop.events"
        assert app.instance_id == "w7"


def test_configure_names_a_bad_event_log_choice() -> None:
    with pytest.raises(ConfigurationError, match=r"memory, aiokafka or confluent.*'kafka-python'"):
        Settings.from_env(
            {"QTASKS_BOOTSTRAP_SERVERS": "127.0.0.1:1", "QTASKS_EVENT_LOG": "kafka-python"}
        )


@pytest.mark.parametrize(
    "argv",
    [
        ["worker", "-A", "tests.apps.eos_app:app"],
        ["history", "0190f7a0-0000-7000-8000-000000000000", "-A", "tests.apps.eos_app:app"],
        ["replay", "-A", "tests.apps.eos_app:app", "--into", "memory://"],
        ["resubmit", "-A", "tests.apps.eos_app:app", "--dry-run"],
        ["dlq", "list", "-A", "tests.apps.eos_app:app"],
        ["snapshot", "-A", "tests.apps.eos_app:app"],
    ],
)
def test_commands_of_a_deployment_refuse_the_embedded_log(
    argv: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in list(os.environ):
        if name.startswith("QTASKS_"):
            monkeypatch.delenv(name)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"`{argv[0]}` needs the deployment's Kafka event log" in err
    assert "set QTASKS_BOOTSTRAP_SERVERS" in err


def test_load_app_explains_what_is_wrong(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConfigurationError, match="module:app"):
        load_app("no_colon_here")
    with pytest.raises(ConfigurationError, match="cannot import"):
        load_app("tests.apps.does_not_exist:app")
    with pytest.raises(ConfigurationError, match="not an app factory"):
        load_app("tests.apps.cpu:square")
    with pytest.raises(ConfigurationError, match="not a QueueTasks app"):
        load_app("tests.apps.eos_app:os")
    assert load_app("tests.apps.eos_app:app").name == "eos"
    assert load_app("tests.apps.eos_app:build").name == "eos"
    # Errors reach the user as one line on stderr and exit code 2, not a traceback.
    assert main(["worker", "-A", "nope"]) == 2
    assert "-A wants module:app" in capsys.readouterr().err
    assert sys.modules.get("tests.apps.eos_app") is not None


def test_worker_refuses_a_queue_its_app_does_not_have(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["worker", "-A", "tests.apps.view_app:app", "--queues", "default,gpu"]) == 2
    assert "unknown queue 'gpu' of app 'projkill': its queues are default" in (
        capsys.readouterr().err
    )
