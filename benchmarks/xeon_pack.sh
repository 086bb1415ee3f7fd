#!/usr/bin/env bash
# Pack what benchmarks/xeon.sh needs on a bare Xeon (Python 3.12, torch 2.11, no network) into
# .carry/xeon-site.tar.xz (git-ignored, ~39 MB), small enough to travel with the checkout.
#
#   benchmarks/xeon_pack.sh [PYTHON3.12] [BASELINE_PYTHON]
#
# Wheels are downloaded for cp312/manylinux; the sdists of the seed's stack are built: gptqmodel,
# tokenicer, device-smi and logbar as pure-Python wheels with the baseline venv's python (it has
# torch, which gptqmodel's setup.py imports), pypcre (C) with Python 3.12; everything is installed
# into one site folder with --no-deps, and the parts of OpenVINO a CPU run never loads (GPU/NPU
# plugins, their kernel cache, the TF/ONNX/Paddle/JAX/GGUF frontends) and torchao's CUDA-only
# kernels are removed. gptqmodel's hf_transfer need is left out: it is only used for downloads.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
py312="${1:-/root/.pyenv/versions/3.12.1/bin/python}"
basepy="${2:-$repo/benchmarks/baseline/.venv/bin/python}"
tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/wheels" "$tmp/site" "$repo/.carry"

# Pure-Python or cp312 wheels. The Xeon image already has torch, numpy, safetensors, accelerate,
# scipy, scikit-learn, networkx, pandas, pyarrow, rich, tabulate, tqdm, pyyaml, regex, requests,
# httpx, fsspec, xxhash, psutil, py-cpuinfo, threadpoolctl, onnx, matplotlib, and what building
# llama-cpp-python needs (cmake, ninja, scikit-build-core, pathspec, jinja2): gguf and diskcache travel.
wheels=(
  openvino==2026.4.1 openvino-tokenizers==2026.4.1.0 openvino-genai==2026.4.1.0
  openvino-telemetry==2025.2.0 nncf==3.4.0 pydot==4.0.1 optimum==2.1.0 optimum-intel==1.27.0
  optimum-onnx==0.1.0 transformers==4.57.6 tokenizers==0.22.2 huggingface_hub==0.36.2
  neural-compressor-pt==3.10 prettytable==3.17.0 wcwidth==0.2.14 pydantic==2.12.5
  pydantic-core==2.41.5 annotated-types==0.7.0 typing-inspection==0.4.2 torchao==0.14.1
  peft==0.19.1 datasets==4.4.1 kernels==0.11.7 dill==0.4.0 multiprocess==0.70.18
  gguf==0.19.0 diskcache==5.6.3
)
"$py312" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux_2_34_x86_64 -d "$tmp/wheels" "${wheels[@]}"
BUILD_CUDA_EXT=0 "$basepy" -m pip wheel -q --no-deps --no-build-isolation -w "$tmp/wheels" \
  gptqmodel==5.6.12 tokenicer==0.0.14 device-smi==0.5.7 logbar==0.4.15
"$py312" -m pip wheel -q --no-deps -w "$tmp/wheels" pypcre==0.6.4
"$py312" -m pip install -q --no-deps --no-compile --target "$tmp/site" "$tmp/wheels"/*.whl
ov="$tmp/site/openvino/libs"
rm -f "$ov"/cache.json "$ov"/libopenvino_intel_gpu_plugin.so "$ov"/libopenvino_intel_npu_plugin.so \
  "$ov"/libopenvino_{tensorflow,tensorflow_lite,onnx,paddle,jax,gguf}_frontend.so* \
  "$tmp/site"/torchao/_C_cutlass_*
find "$tmp/site" -name "__pycache__" -prune -exec rm -rf {} +
rm -rf "$tmp/site"/bin
tar -cf - -C "$tmp/site" . | xz -6 -T2 > "$repo/.carry/xeon-site.tar.xz"  # ~39 MB
ls -la "$repo/.carry/xeon-site.tar.xz"
# llama-cpp-python's source distribution (76.6 MB) without what the build never reads: its git objects,
# the vendored llama.cpp's models/, docs/, media/, benches/, tests/, web UI and non-CPU backends (~4 MB).
"$py312" -m pip download -q --no-deps --no-binary :all: -d "$tmp" llama-cpp-python==0.3.36
tar -xzf "$tmp"/llama_cpp_python-0.3.36.tar.gz -C "$tmp"
src="$tmp/llama_cpp_python-0.3.36"; v="$src/vendor/llama.cpp"
rm -rf "$src/.git" "$src/examples" "$v"/{models,docs,media,benches,tests} "$v/tools/ui" "$v"/tools/mtmd/test-*.mp4 \
  "$v"/ggml/src/ggml-{et,metal,hexagon,sycl,vulkan,cuda,opencl,cann,musa,webgpu,zdnn,rpc,blas,openvino,virtgpu,zendnn}
tar -cf - -C "$tmp" llama_cpp_python-0.3.36 | xz -6 -T2 > "$repo/.carry/llama-cpp-python-src.tar.xz"
ls -la "$repo/.carry/llama-cpp-python-src.tar.xz"
