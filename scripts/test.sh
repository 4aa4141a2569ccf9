#!/usr/bin/env bash
# The whole test suite, real Kafka included: installs the package with its test tools,
# starts the dev broker and schema registry (fetched from Maven Central on first use) and
# PostgreSQL (the machine's own server programs), runs lint, types and pytest, and stops them
# all whatever happens. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

python -m pip install --quiet --disable-pip-version-check -e ".[dev]"
# The console's browser tests drive Debian's chromium through Playwright (never
# `playwright install`); installed only when missing.
if [ ! -x /usr/bin/chromium ]; then
    sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
    $sudo apt-get update -qq && $sudo apt-get install -y -qq chromium
fi

home="${QTASKS_DEV_HOME:-$PWD/.cache/dev}"
mkdir -p "$home"
stop_broker() {
    # Keep the services' logs of this run (a failed run is diagnosed from them), then wipe.
    rm -rf "$PWD/.cache/last-run-logs" && mkdir -p "$PWD/.cache/last-run-logs"
    cp -r "$home/kafka/logs" "$PWD/.cache/last-run-logs/kafka" 2>/dev/null || true
    cp -r "$home/registry/logs" "$PWD/.cache/last-run-logs/registry" 2>/dev/null || true
    cp -r "$home/postgres/logs" "$PWD/.cache/last-run-logs/postgres" 2>/dev/null || true
    python -m qtasks_stream dev down --home "$home" --postgres --wipe || true
}
trap stop_broker EXIT

exports="$(python -m qtasks_stream dev up --home "$home" --postgres)"
eval "$exports"
# Tests choose their event log, registry and view store explicitly; the addresses reach them
# this way.
export QTASKS_TEST_BOOTSTRAP="$QTASKS_BOOTSTRAP_SERVERS"
export QTASKS_TEST_SCHEMA_REGISTRY_URL="$QTASKS_SCHEMA_REGISTRY_URL"
export QTASKS_TEST_POSTGRES_DSN="$QTASKS_POSTGRES_DSN"
unset QTASKS_BOOTSTRAP_SERVERS QTASKS_SCHEMA_REGISTRY_URL QTASKS_POSTGRES_DSN

python -m ruff check qtasks_stream tests bench
python -m mypy
lint-imports  # the layers of docs/architecture.md ([tool.importlinter] in pyproject.toml)
python -m pytest "$@"
