#!/usr/bin/env bash
# Runs the whole test suite, installing and starting what it needs (a PostgreSQL
# server for the storage tests). Extra arguments go to the test runner.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
if [ -z "${NBSERVER_TEST_POSTGRES_URL:-}" ]; then
  NBSERVER_TEST_POSTGRES_URL=$(scripts/postgres.sh | tail -n 1)
  export NBSERVER_TEST_POSTGRES_URL
fi
# Everything the tests need is installed above: a test that would skip for want of
# root, FUSE, CRIU, the venv or the users fails instead (set 0 to allow skips).
export NBAGENT_TEST_REQUIRE="${NBAGENT_TEST_REQUIRE:-1}"
echo "test: PostgreSQL at $NBSERVER_TEST_POSTGRES_URL" >&2
# End-to-end tests start the real binaries.
cargo build --workspace --bins
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast "$@"
else
  cargo test --workspace --no-fail-fast "$@"
fi
