#!/usr/bin/env bash
# Issue #7, GPU part: our simulation against bitsandbytes' CUDA kernels, and the exported MiniLM's speed.
#
# One short run (about 2-4 minutes on one H100/H200, capped at 7.5 by GPU_CHECK_TIMEOUT): prints the GPU,
# torch, transformers and bitsandbytes versions, then benchmarks/gpu_check.py (PASS/FAIL per bit-exactness
# case with the max abs diff, logits of the exported nf4 / llm_int8 on CUDA against the CPU simulation,
# tokens/s and peak memory of fp32 / fp16 / bf16 / our nf4 and int8 exports / transformers' own bnb nf4 and
# int8). Writes gpu_check.json, gpu_check.md and gpu_check.log under ${OUT:-benchmarks/results/gpu}.
#
# Here, once: bash benchmarks/gpu_wheels.sh          (fills .whl/: slim bitsandbytes, fp16 MiniLM)
# There, from the repo root with .whl/ carried:
#   bash benchmarks/gpu_check.sh                    # installs .whl/*.whl into /tmp/site if bitsandbytes is missing
#   bash benchmarks/gpu_check.sh --iters 100        # extra arguments go to gpu_check.py
# Without a GPU it stops with a message; `.venv/bin/python benchmarks/gpu_check.py --cpu-dry-run` exercises it.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/gpu}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

if ! "$PY" -c "import bitsandbytes" >/dev/null 2>&1; then
    if ! compgen -G ".whl/*.whl" >/dev/null; then
        echo "bitsandbytes is not installed and .whl/ has no wheels: run benchmarks/gpu_wheels.sh and carry .whl" >&2
        exit 2
    fi
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 2
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"

{
    echo "== nvidia-smi"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 || echo "(no nvidia-smi)"
    echo "== versions"
    "$PY" - <<'PY' 2>&1
import platform, torch, transformers, bitsandbytes
print(f"python {platform.python_version()}  torch {torch.__version__} (cuda {torch.version.cuda})  "
      f"transformers {transformers.__version__}  bitsandbytes {bitsandbytes.__version__}  "
      f"cuda available {torch.cuda.is_available()}")
PY
    echo "== gpu_check.py"
    timeout "${GPU_CHECK_TIMEOUT:-450}" "$PY" benchmarks/gpu_check.py --out "$OUT" "$@" 2>&1
    rc=$?
    [ "$rc" = 124 ] && echo "gpu_check.py stopped after ${GPU_CHECK_TIMEOUT:-450} s"
    exit "$rc"
} | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
