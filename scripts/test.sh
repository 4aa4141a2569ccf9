#!/usr/bin/env bash
# The whole test suite, real Kafka included: installs the package with its test tools,
# starts the dev broker and schema registry (fetched from Maven Central on first use), runs
# lint, types and pytest, and stops both whatever happens. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

python -m pip install --quiet --disable-pip-version-check -e ".[dev]"

home="${QTASKS_DEV_HOME:-$PWD/.cache/dev}"
mkdir -p "$home"
stop_broker() {
    # Keep the services' logs of this run (a failed run is diagnosed from them), then wipe.
    rm -rf "$PWD/.cache/last-run-logs" && mkdir -p "$PWD/.cache/last-run-logs"
    cp -r "$home/kafka/logs" "$PWD/.cache/last-run-logs/kafka" 2>/dev/null || true
    cp -r "$home/registry/logs" "$PWD/.cache/last-run-logs/registry" 2>/dev/null || true
    python -m qtasks_stream dev down --home "$home" --wipe || true
}
trap stop_broker EXIT

exports="$(python -m qtasks_stream dev up --home "$home")"
eval "$exports"
# Tests choose their event log and registry explicitly; the addresses reach them this way.
export QTASKS_TEST_BOOTSTRAP="$QTASKS_BOOTSTRAP_SERVERS"
export QTASKS_TEST_SCHEMA_REGISTRY_URL="$QTASKS_SCHEMA_REGISTRY_URL"
unset QTASKS_BOOTSTRAP_SERVERS QTASKS_SCHEMA_REGISTRY_URL

python -m ruff check qtasks_stream tests bench
python -m mypy
python -m pytest "$@"
