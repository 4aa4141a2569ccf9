"""DevKafka (the Docker-free dev broker) and docker/compose.yaml must describe the same broker.

None of these tests starts a broker: the session's broker is started by the test command.
"""

from __future__ import annotations

import shutil
import socket
from pathlib import Path
from typing import Any

import pytest
import yaml

from qtasks_stream.devenv.kafka import KAFKA_VERSION, DevEnvError, DevKafka

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
