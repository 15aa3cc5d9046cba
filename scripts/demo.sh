#!/usr/bin/env bash
# The main job: build, then run nbserver's demo: a server with embedded defaults and a
# local nbsupervisor -> nbagent that enrols with a single-use token, connects over
# mutual TLS, mounts the notebook's attached files, runs examples/sample.ipynb in a real
# ipykernel as the notebook user, checkpoints after every cell, re-runs from an edited
# cell by restoring a checkpoint; then print what the server stored.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release --bins -p nbagent -p nbserver -p nbsupervisor
exec target/release/nbserver --data-dir "${NBSERVER_DATA_DIR:-target/demo}" demo "$@"
