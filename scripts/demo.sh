#!/usr/bin/env bash
# The main job: build, then run nbserver's demo: a server with embedded defaults, a
# local nbagent that enrols with a single-use token, connects over mutual TLS and
# streams a workload of outputs and blobs; then print what the server stored.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release --bins -p nbagent -p nbserver -p nbsupervisor
exec target/release/nbserver --data-dir "${NBSERVER_DATA_DIR:-target/demo}" demo "$@"
