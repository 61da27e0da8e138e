#!/usr/bin/env bash
# benchmarks/gpu_carry.sh: make benchmarks/.gpu-carry/, what benchmarks/gpu.sh needs on a GPU
# machine that reaches no package registry and to which at most 64 MiB can be brought.
#
#   bash benchmarks/gpu_carry.sh        # here: needs .venv (make install), models/base and
#                                       # data/prepared (make demo, or dvc repro prepare base_model)
#
# Writes (the folder is git-ignored; name it in the device tool's carry list):
#   wheels/    Python 3.12 manylinux x86_64 wheels of what the train stage imports and a
#              PyTorch+CUDA image lacks or holds in versions the project does not take, at the
#              versions installed in .venv (the set the tests run). DeepSpeed has only an sdist
#              on PyPI: it is built here as a pure-Python wheel (DS_BUILD_OPS=0, py3-none-any; its
#              CUDA ops would be JIT-built on first use, and ZeRO-2/3 without offload uses none).
#              gpu.sh installs a wheel only where the machine's own package is missing or
#              outside the versions needed (benchmarks/gpu_bench.py requirements).
#   prepared/  train/validation/test.parquet from data/prepared (the validated, prepared splits:
#              validate needs Great Expectations, which a bare GPU image lacks)
#   model/     SmolLM2-135M-Instruct's config, generation config, tokenizer and chat template from
#              models/base, and its source.json as upstream-source.json. NOT the weights: the
#              bundled GGUF (Q4_1) is 94 MiB and the converted safetensors 513 MiB (float32) or
#              257 MiB (bfloat16), none of which fits in 64 MiB beside the wheels; gpu.sh builds
#              random weights of the same shapes there (see its header).
#   MANIFEST.txt  what is in it, versions, sizes, sha256 of the data, the commit.
# Then prints the size of everything that travels (the working tree plus this folder) against
# the 64 MiB limit, and exits non-zero when it is over.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PY=$VENV/bin/python
CARRY=${GPU_CARRY:-benchmarks/.gpu-carry}
LIMIT=$((64 * 1024 * 1024))
# What travels: every package the train stage needs (benchmarks/gpu_bench.py ROOTS and their
# requirements, walked in .venv: `gpu_bench.py closure`), at the versions installed in .venv
# (the set the tests run), except what every PyTorch+CUDA image has and is too big to carry
# (torch and the CUDA libraries it pins, numpy, pandas, pyarrow). The lent H200's image, for
# one, has torch, transformers 5.17 (older than pyproject.toml's >=5.23), peft, accelerate,
# pandas, pyarrow, numpy, pyyaml, safetensors and tokenizers but no pydantic, deepspeed, trl,
# datasets or mlflow; versions in an image are unknown in advance, so the whole rest travels
# and gpu.sh installs only the wheels the machine turns out to need (gpu_bench.py
# requirements). mlflow-skinny, not mlflow: the stage needs only the tracking client, and
# gpu.sh uses MLflow's file store (the sqlite store would add sqlalchemy and alembic).
# DeepSpeed has only an sdist on PyPI: it is built below as a pure-Python wheel.
IMAGE_HAS=(torch numpy pandas pyarrow)

fail() { echo "gpu_carry.sh: $*" >&2; exit 2; }
[[ -x $PY ]] || fail "$PY not found: run \`make install\` first (the versions carried are those installed there)"
[[ -f models/base/config.json && -f models/base/tokenizer.json ]] \
  || fail "models/base has no config.json/tokenizer.json: run \`.venv/bin/llmops base_model\` (or make demo) first"
for split in train validation test; do
  [[ -f data/prepared/$split.parquet ]] \
    || fail "data/prepared/$split.parquet not found: run \`.venv/bin/dvc repro prepare\` (or make demo) first"
done

tmp=$CARRY.tmp
rm -rf "$tmp"
mkdir -p "$tmp/wheels" "$tmp/prepared" "$tmp/model"

closure=$("$PY" benchmarks/gpu_bench.py closure --exclude "${IMAGE_HAS[@]}") \
  || fail "a package the train stage needs is not installed in $VENV (above); run \`make install\`"
mapfile -t pins < <(grep -v '^deepspeed==' <<<"$closure")
echo "downloading ${#pins[@]} wheels for CPython 3.12 manylinux x86_64 into $CARRY/wheels"
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$tmp/wheels" "${pins[@]}"

ds=$("$PY" -c 'import importlib.metadata as m; print(m.version("deepspeed"))')
echo "building deepspeed $ds as a pure-Python wheel (DS_BUILD_OPS=0, DS_ACCELERATOR=cuda)"
DS_BUILD_OPS=0 DS_ACCELERATOR=cuda "$PY" -m pip wheel --quiet --no-deps --no-build-isolation --no-cache-dir \
  -w "$tmp/wheels" "deepspeed==$ds"
tag=$("$PY" - "$tmp/wheels/deepspeed-$ds-py3-none-any.whl" <<'EOF'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    name = next(n for n in z.namelist() if n.endswith(".dist-info/WHEEL"))
    print(" ".join(l.split(":", 1)[1].strip() for l in z.read(name).decode().splitlines() if l.startswith("Tag:")))
EOF
) || fail "the deepspeed build did not give deepspeed-$ds-py3-none-any.whl"
[[ $tag == "py3-none-any" ]] || fail "the deepspeed wheel is tagged '$tag', not py3-none-any"

cp data/prepared/{train,validation,test}.parquet "$tmp/prepared/"
for file in config.json generation_config.json tokenizer.json tokenizer_config.json chat_template.jinja; do
  [[ -f models/base/$file ]] && cp "models/base/$file" "$tmp/model/"
done
[[ -f models/base/source.json ]] && cp models/base/source.json "$tmp/model/upstream-source.json"

{
  echo "benchmarks/gpu_carry.sh, $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo none)$(git diff --quiet HEAD 2>/dev/null || echo ' (work tree differs from it)')"
  echo
  echo "wheels (CPython 3.12, manylinux x86_64; versions as in $VENV):"
  (cd "$tmp/wheels" && ls -1 ./*.whl | sed 's#^\./#  #')
  echo
  echo "prepared splits (from data/prepared; sha256):"
  (cd "$tmp/prepared" && sha256sum ./*.parquet | sed 's#  \./#  #; s#^#  #')
  echo
  echo "model: config and tokenizer of models/base (no weights); its source.json:"
  "$PY" -c 'import json,sys; r=json.load(open(sys.argv[1])); print("  source", r.get("source"), "upstream", r.get("upstream"), "gguf", r.get("gguf_file"), "sha256", (r.get("source_sha256") or "")[:16], "parameters", r.get("parameters"))' "$tmp/model/upstream-source.json" 2>/dev/null || echo "  (no source.json)"
} > "$tmp/MANIFEST.txt"

rm -rf "$CARRY"
mv "$tmp" "$CARRY"

size() { du -sb "$@" | awk '{s += $1} END {print s + 0}'; }
wheels=$(size "$CARRY/wheels")
data=$(size "$CARRY/prepared")
model=$(size "$CARRY/model")
carry=$(size "$CARRY")
# what else travels: tracked files and untracked files git does not ignore
tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 -r stat -c %s -- 2>/dev/null \
       | awk '{s += $1} END {print s + 0}')
total=$((carry + tree))
mib() { awk -v b="$1" 'BEGIN {printf "%.1f MiB", b / 1048576}'; }
echo
echo "$CARRY: wheels $(mib "$wheels") ($(ls "$CARRY/wheels" | wc -l) files), prepared $(mib "$data"), model files $(mib "$model"): $(mib "$carry")"
echo "working tree that travels: $(mib "$tree"); all together: $(mib "$total") of 64.0 MiB"
echo "(biggest wheels: $(cd "$CARRY/wheels" && ls -S | head -4 | tr '\n' ' '))"
if (( total > LIMIT )); then
  echo "gpu_carry.sh: over the 64 MiB a device call carries" >&2
  exit 1
fi
echo "device call: carry [\"$CARRY\"], command: bash benchmarks/gpu.sh 2>&1 | tee \$OUT/gpu.log"
