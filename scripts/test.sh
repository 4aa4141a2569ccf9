#!/usr/bin/env bash
# The whole test suite, real Kafka included: installs the package with its test tools,
# starts the dev broker and schema registry (fetched from Maven Central on first use),
# PostgreSQL (the machine's own server programs) and a second, secured broker and registry
# (`dev up --secure`: SASL_SSL and ACLs, a registry that requires basic auth, on their own
# home and ports), runs lint, types and pytest, and stops them all whatever happens. Extra
# arguments go to pytest.
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
secure_home="${QTASKS_DEV_SECURE_HOME:-$PWD/.cache/dev-secure}"
mkdir -p "$home" "$secure_home/kafka" "$secure_home/registry"
stop_broker() {
    # Keep the services' logs of this run (a failed run is diagnosed from them), then wipe.
    rm -rf "$PWD/.cache/last-run-logs" && mkdir -p "$PWD/.cache/last-run-logs"
    cp -r "$home/kafka/logs" "$PWD/.cache/last-run-logs/kafka" 2>/dev/null || true
    cp -r "$home/registry/logs" "$PWD/.cache/last-run-logs/registry" 2>/dev/null || true
    cp -r "$home/postgres/logs" "$PWD/.cache/last-run-logs/postgres" 2>/dev/null || true
    cp -r "$secure_home/kafka/logs" "$PWD/.cache/last-run-logs/kafka-secure" 2>/dev/null || true
    cp -r "$secure_home/registry/logs" "$PWD/.cache/last-run-logs/registry-secure" 2>/dev/null || true
    python -m qtasks_stream dev down --home "$secure_home" --wipe || true
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

# The secured broker and registry reuse the jars and the application the first ones fetched
# (hard links where possible).
for fetched in "$home"/kafka/libs-* "$home"/registry/apicurio-*; do
    target="$secure_home/$(basename "$(dirname "$fetched")")/$(basename "$fetched")"
    [ -e "$target" ] || cp -al "$fetched" "$target" 2>/dev/null || cp -a "$fetched" "$target"
done
secure_exports="$(python -m qtasks_stream dev up --secure --home "$secure_home" \
    --port "${QTASKS_DEV_SECURE_PORT:-29094}" \
    --controller-port "${QTASKS_DEV_SECURE_CONTROLLER_PORT:-29095}" \
    --registry-port "${QTASKS_DEV_SECURE_REGISTRY_PORT:-29081}")"
eval "$(printf '%s\n' "$secure_exports" | sed 's/^export QTASKS_/export QTASKS_SECURE_/')"
export QTASKS_TEST_SECURE_BOOTSTRAP="$QTASKS_SECURE_BOOTSTRAP_SERVERS"
export QTASKS_TEST_SECURE_CAFILE="$QTASKS_SECURE_SSL_CAFILE"
# The registry's users (admin, app, reader) have their user:password files beside the CA.
export QTASKS_TEST_SECURE_SCHEMA_REGISTRY_URL="$QTASKS_SECURE_SCHEMA_REGISTRY_URL"
# The super user's password sits beside the app's (docs/security.md).
export QTASKS_TEST_SECURE_ADMIN_PASSWORD_FILE="$(dirname "$QTASKS_SECURE_SASL_PASSWORD_FILE")/admin.password"
export QTASKS_TEST_SECURE_HOME="$secure_home"

python -m ruff check qtasks_stream tests bench
python -m mypy
lint-imports  # the layers of docs/architecture.md ([tool.importlinter] in pyproject.toml)
python -m pytest "$@"
