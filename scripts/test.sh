#!/usr/bin/env bash
# The whole test suite, real Kafka included: installs the package with its test tools,
# starts the dev broker (fetching its jars from Maven Central on first use), runs lint,
# types and pytest, and stops the broker whatever happens. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

python -m pip install --quiet --disable-pip-version-check -e ".[dev]"

home="${QTASKS_DEV_HOME:-$PWD/.cache/devkafka}"
mkdir -p "$home"
stop_broker() { python -m qtasks_stream dev down --home "$home" --wipe || true; }
trap stop_broker EXIT

exports="$(python -m qtasks_stream dev up --home "$home")"
eval "$exports"
# Tests choose their event log explicitly; the broker address reaches them only this way.
export QTASKS_TEST_BOOTSTRAP="$QTASKS_BOOTSTRAP_SERVERS"
unset QTASKS_BOOTSTRAP_SERVERS

python -m ruff check qtasks_stream tests bench
python -m mypy
python -m pytest "$@"
