"""The dev environment: DevKafka and docker/compose.yaml describe the same broker; homes,
ports and process tracking behave like a tool's.

None of these tests starts a broker: the session's broker is started by the test command.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from qtasks_stream.cli import main
from qtasks_stream.devenv.environment import default_home, home_from, ports_from
from qtasks_stream.devenv.kafka import KAFKA_VERSION, DevEnvError, DevKafka
from qtasks_stream.devenv.process import ManagedProcess

COMPOSE = Path(__file__).resolve().parents[2] / "docker" / "compose.yaml"

# Settings that legitimately differ between the two: listener hosts (a container must listen on
# all of its interfaces), quorum style (the image formats storage without --standalone) and paths.
_DIFFERENT_BY_DESIGN = {
    "listeners",
    "controller.quorum.bootstrap.servers",
    "log.dirs",
}


def _kafka_service() -> dict[str, Any]:
    compose = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    service: dict[str, Any] = compose["services"]["kafka"]
    return service


def _listener_ports(listeners: str) -> dict[str, int]:
    """Map ``NAME://host:port,...`` to ``{NAME: port}``."""
    ports = {}
    for listener in listeners.split(","):
        name, _, address = listener.partition("://")
        ports[name] = int(address.rpartition(":")[2])
    return ports


@pytest.mark.kafka
def test_compose_kafka_matches_devkafka(tmp_path: Path) -> None:
    dev = DevKafka(home=tmp_path)
    service = _kafka_service()
    env = {key: str(value) for key, value in service["environment"].items()}

    assert service["image"] == f"apache/kafka:{KAFKA_VERSION}"
    assert dev.version == KAFKA_VERSION
    assert service["ports"] == [f"127.0.0.1:{dev.port}:{dev.port}"]
    assert env["KAFKA_ADVERTISED_LISTENERS"] == f"PLAINTEXT://{dev.bootstrap}"
    assert _listener_ports(env["KAFKA_LISTENERS"]) == {
        "PLAINTEXT": dev.port,
        "CONTROLLER": dev.controller_port,
    }
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"].endswith(f":{dev.controller_port}")

    for key, value in dev.server_properties().items():
        if key in _DIFFERENT_BY_DESIGN:
            continue
        env_key = "KAFKA_" + key.upper().replace(".", "_")
        assert env.get(env_key) == value, f"{env_key} in {COMPOSE} should be {value!r}"


@pytest.mark.kafka
def test_compose_schema_registry_is_pinned_apicurio_3() -> None:
    compose = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    registry = compose["services"]["schema-registry"]
    image, _, tag = registry["image"].partition(":")
    assert image == "apicurio/apicurio-registry"
    assert tag.startswith("3.") and tag.count(".") == 2, "pin an exact 3.x.y release"
    assert registry["ports"] == ["127.0.0.1:8080:8080"]


def test_devkafka_listens_on_loopback_only(tmp_path: Path) -> None:
    props = DevKafka(home=tmp_path, port=29092, controller_port=29093).server_properties()
    assert props["listeners"] == "PLAINTEXT://127.0.0.1:29092,CONTROLLER://127.0.0.1:29093"
    assert props["advertised.listeners"] == "PLAINTEXT://127.0.0.1:29092"
    assert props["controller.quorum.bootstrap.servers"] == "127.0.0.1:29093"
    assert props["log.dirs"] == str(tmp_path / "data")


def test_up_without_java_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    home = tmp_path / "home"

    with pytest.raises(DevEnvError, match="java not found") as caught:
        DevKafka(home=home).up(timeout=5)

    assert "Java 17" in str(caught.value)
    assert "openjdk-17" in str(caught.value)
    assert not (home / "kafka.pid").exists()


def _two_free_ports() -> tuple[int, int]:
    # Both sockets are bound at once, so the kernel cannot hand out the same port twice.
    with socket.socket() as first, socket.socket() as second:
        first.bind(("127.0.0.1", 0))
        second.bind(("127.0.0.1", 0))
        return first.getsockname()[1], second.getsockname()[1]


def test_up_without_maven_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    java = shutil.which("java")
    if java is None:
        pytest.skip("needs java on PATH to get as far as the Maven check")
    only_java = tmp_path / "bin"
    only_java.mkdir()
    (only_java / "java").symlink_to(java)
    monkeypatch.setenv("PATH", str(only_java))
    home = tmp_path / "home"

    # Free ports of its own, so the session broker on 19092 does not trip the port check first.
    port, controller_port = _two_free_ports()
    dev = DevKafka(home=home, port=port, controller_port=controller_port)
    with pytest.raises(DevEnvError, match="mvn not found"):
        dev.up(timeout=5)

    assert not (home / "kafka.pid").exists()
    assert not (home / f"libs-{KAFKA_VERSION}").exists()


def _process(home: Path, name: str, marker: str) -> ManagedProcess:
    return ManagedProcess(
        home,
        name,
        what=f"a {name}",
        markers=(marker,),
        expectation=name,
        data_dir=home,
        log=lambda _: None,
    )


def test_a_service_is_alive_while_it_execs_its_program(tmp_path: Path) -> None:
    # The registry starts as sh exec'ing the JVM; while a process execs, /proc shows an empty
    # command line for a moment, which made `dev up` report "exited during startup" with an
    # empty log about one start in eight.
    process = _process(tmp_path, "sleeper", "/bin/sleep")
    dead_at = []
    for attempt in range(60):
        pid = process.spawn(["/bin/sh", "-c", 'exec "$@"', "sh", "/bin/sleep", "30"])
        try:
            while not Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"/bin/sleep"):
                if not process.alive(pid):
                    dead_at.append(attempt)
                    break
        finally:
            process.stop(pid, 5)
    assert dead_at == []


def test_each_start_keeps_its_own_log(tmp_path: Path) -> None:
    process = _process(tmp_path, "echo", "/bin/sh")
    for run in range(3):
        pid = process.spawn(["/bin/sh", "-c", f"echo run {run}"])
        os.waitpid(pid, 0)

    logs = tmp_path / "logs"
    assert (logs / "echo.out").read_text() == "run 2\n"
    assert (logs / "echo.out.1").read_text() == "run 1\n"
    assert (logs / "echo.out.2").read_text() == "run 0\n"


def test_the_dev_home_is_in_the_users_cache_not_the_working_folder(tmp_path: Path) -> None:
    assert default_home({"XDG_CACHE_HOME": "/xdg", "HOME": "/h"}) == Path("/xdg/qtasks-stream/dev")
    assert default_home({"HOME": "/h"}) == Path("/h/.cache/qtasks-stream/dev")
    # A relative XDG_CACHE_HOME is invalid by the spec, and ignored.
    assert default_home({"XDG_CACHE_HOME": "rel", "HOME": "/h"}) == Path(
        "/h/.cache/qtasks-stream/dev"
    )
    env = {"HOME": "/h", "QTASKS_DEV_HOME": str(tmp_path / "env")}
    assert home_from(None, env) == tmp_path / "env"
    assert home_from(str(tmp_path / "opt"), env) == tmp_path / "opt"


def test_ports_come_from_options_then_the_environment() -> None:
    env = {"QTASKS_DEV_PORT": "29092", "QTASKS_DEV_REGISTRY_PORT": "28081"}
    assert ports_from({"kafka": 39092, "controller": None}, env) == {
        "kafka": 39092,
        "registry": 28081,
    }
    with pytest.raises(DevEnvError, match="QTASKS_DEV_POSTGRES_PORT must be a port number"):
        ports_from({}, {"QTASKS_DEV_POSTGRES_PORT": "x"})


def test_status_from_another_folder_finds_the_home_and_ports_up_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # No java: up fails at once, after recording what it was asked to start and where.
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("QTASKS_DEV_HOME", raising=False)
    port, controller_port = _two_free_ports()
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    monkeypatch.chdir(first)
    up = ["dev", "up", "--no-registry", "--port", str(port), "--controller-port"]
    assert main([*up, str(controller_port)]) == 2
    assert "java not found" in capsys.readouterr().err

    monkeypatch.chdir(second)
    assert main(["dev", "status"]) == 1
    err = capsys.readouterr().err
    assert f"bootstrap='127.0.0.1:{port}'" in err
    assert f"home={tmp_path / 'cache' / 'qtasks-stream' / 'dev' / 'kafka'!r}" in err
    assert "DevRegistryStatus" not in err  # up started no registry
    # Nothing runs (up failed): other ports may be chosen, as after a reboot.
    assert main(["dev", "status", "--port", "1", "--controller-port", "2"]) == 1
    assert "bootstrap='127.0.0.1:1'" in capsys.readouterr().err
    # A broker of the home runs (a stand-in carrying its command line): other ports are
    # refused, naming the ones it has, until down stops it.
    kafka_home = tmp_path / "cache" / "qtasks-stream" / "dev" / "kafka"
    props = kafka_home / "config" / "server.properties"
    stand_in = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)", "kafka.Kafka", str(props)]
    )
    try:
        (kafka_home / "kafka.pid").write_text(f"{stand_in.pid}\n")
        assert main(["dev", "status", "--port", "1"]) == 2
        assert f"runs on ports {{'kafka': {port}" in capsys.readouterr().err
        assert main(["dev", "down"]) == 0
        stand_in.wait(timeout=10)  # down stopped it (and reaped it: no status left here)
        assert not (kafka_home / "kafka.pid").exists()
    finally:
        stand_in.kill()
        stand_in.wait()
    assert main(["dev", "status", "--port", "1", "--controller-port", "2"]) == 1
    assert "bootstrap='127.0.0.1:1'" in capsys.readouterr().err
    assert not list(first.iterdir()) and not list(second.iterdir())
