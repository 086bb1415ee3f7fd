#!/usr/bin/env bash
# Build the seed-baseline environment: Qwen GPTQ-Int4 + the un-merged peft LoRA, run by
# transformers + gptqmodel on the CPU. It cannot live beside tangquant's own pins (peft 0.21
# needs gptqmodel >= 7, which needs transformers >= 5), so it gets its own venv.
#
#   benchmarks/baseline/setup.sh [VENV_DIR] [PYTHON]
#
# VENV_DIR defaults to benchmarks/baseline/.venv (git-ignored); PYTHON to python3.11.
# `tangquant bench --candidate NAME=torch-gptq+lora:GPTQ_DIR,adapter=ADAPTER_DIR` runs there
# (`--baseline-python` points at another one).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="${1:-$here/.venv}"
python="${2:-python3.11}"

"$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --no-input)
"${pip[@]}" --upgrade "pip==25.3" "setuptools==80.9.0" "wheel==0.45.1"
# The CPU build of torch: set TORCH_INDEX="" where a local wheel or mirror already provides it.
TORCH_INDEX="${TORCH_INDEX-https://download.pytorch.org/whl/cpu}"
"${pip[@]}" "torch==2.13.0" ${TORCH_INDEX:+--extra-index-url "$TORCH_INDEX"}
"${pip[@]}" "transformers==4.57.6" "tokenizers==0.22.2" "safetensors==0.8.0" \
    "accelerate==1.15.0" "optimum==2.1.0" "peft==0.19.1"
# gptqmodel compiles no CUDA kernel on the CPU: its CPU path is torch's own
# aten._weight_int4pack_mm_for_cpu (bf16; fp32 is ~7x slower there).
BUILD_CUDA_EXT=0 "${pip[@]}" --no-build-isolation "gptqmodel==5.6.12"
# gptqmodel's unpinned needs (datasets, kernels) now pull huggingface_hub 2.x, which
# transformers 4.57 refuses: pin the versions of gptqmodel's own time.
"${pip[@]}" "transformers==4.57.6" "peft==0.19.1" "tokenizers==0.22.2" "huggingface_hub==0.36.2" \
    "datasets==4.4.1" "kernels==0.11.7" "optimum==2.1.0" "gptqmodel==5.6.12" "torch==2.13.0"
"$venv/bin/python" -m pip check
"$venv/bin/python" - <<'PY'
import importlib.metadata as m
for name in ("torch", "transformers", "optimum", "gptqmodel", "peft"):
    print(name, m.version(name))
PY
