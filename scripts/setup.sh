#!/usr/bin/env bash
# Installs what building, testing and running nbagent needs on a fresh Debian 12 machine.
# Idempotent: does nothing that is already done.
#
#   NBAGENT_VENV  the kernel's Python environment (default /opt/nbagent/venv): ipykernel,
#                 pandas and matplotlib, built from the system's python3 so that the
#                 notebook user (not only root) can run it
#   NBAGENT_USER  the unprivileged notebook user the kernel runs as (default nbuser)
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${NBAGENT_VENV:-/opt/nbagent/venv}"
NB_USER="${NBAGENT_USER:-nbuser}"

need=()
command -v cc >/dev/null || need+=(build-essential)
command -v pkg-config >/dev/null || need+=(pkg-config)
[ -x /usr/bin/python3 ] || need+=(python3)
/usr/bin/python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
if [ ${#need[@]} -gt 0 ]; then
  echo "setup: installing ${need[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need[@]}" >/dev/null
fi
scripts/criu.sh >/dev/null
command -v cargo >/dev/null || { echo "setup: cargo not found: install a Rust toolchain (rustup)" >&2; exit 1; }

# The kernel's Python environment.
stamp="$VENV/.nbagent-requirements"
if ! cmp -s scripts/kernel-requirements.txt "$stamp" 2>/dev/null; then
  echo "setup: creating the kernel environment in $VENV" >&2
  /usr/bin/python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check -r scripts/kernel-requirements.txt
  cp scripts/kernel-requirements.txt "$stamp"
  chmod -R a+rX "$VENV"
fi

# The notebook user (no password, no sudo), and a user with sudo rights that the
# tests use to check that such users are never impersonated.
if ! id "$NB_USER" >/dev/null 2>&1; then
  echo "setup: creating the notebook user $NB_USER" >&2
  useradd --create-home --shell /bin/bash "$NB_USER"
fi
if [ "$(id -u)" -eq 0 ] && ! id nbsudoer >/dev/null 2>&1; then
  getent group sudo >/dev/null || groupadd --system sudo
  useradd --create-home --shell /bin/bash --groups sudo nbsudoer
fi
