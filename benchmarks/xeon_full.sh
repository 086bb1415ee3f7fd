#!/usr/bin/env bash
# The side-by-side Xeon run at one shape (7B by default) in two resumable phases, made for a lent
# machine that gives 10-minute calls and forgets everything ~30 s after the last one:
#
#   xeon_full.sh build OUT [SHAPE]      llama.cpp, the shape model, its merge (for RSS), INT4, IR, GGUF
#   xeon_full.sh anchors OUT            f16 GGUF of the shape model -> llama-quantize Q4_0, Q4_K_M
#   xeon_full.sh tune OUT [THREADS]     tangquant tune --apply on a copy of the IR (tuned/)
#   xeon_full.sh bench OUT [THREADS]    one bench run over every candidate there is
#   xeon_full.sh status OUT             the log's tail and each step's wall time and peak RSS
#
# Start a phase in the background from a copy of the checkout, so that a later call (which
# replaces the checkout) cannot change the code under it, then poll it from later calls:
#   rm -rf /tmp/tq-repo && cp -r . /tmp/tq-repo && (setsid bash /tmp/tq-repo/benchmarks/xeon_full.sh \
#     build /tmp/xo 7b >/dev/null 2>&1 &); sleep 500; bash benchmarks/xeon_full.sh status /tmp/xo
# Every call must copy OUT's files to $OUT *before* anything that can overrun it, and start long
# work only in the background: on 2026-12-02 a call that waited in the foreground for the 7B
# anchors ran past its limit and brought nothing back, and the device time was gone.
#
# Carried (git-ignored, made by benchmarks/xeon_pack.sh): .carry/xeon-site.tar.xz (OpenVINO,
# transformers 4.57.6, optimum-intel, nncf, INC, gguf, the seed's gptqmodel stack) and
# .carry/llama-cpp-python-src.tar.xz (llama-cpp-python 0.3.36, its vendored llama.cpp 0c1e570),
# compiled there with the machine's own instructions but AMX (.ci/llama-cmake-args), as .ci/run does.
# Elsewhere TQ_PYTHON names a ready environment and nothing is unpacked or built.
#
# Random weights, speed only. The speed rows use the shape model itself as "merged" (a merge
# changes values, not shapes or bytes); `tangquant merge` runs once for its peak RSS. RTN INT4 has
# the GPTQ layout and bytes. Steps run at once where they can (16 cores); each one's wall time and
# peak RSS (os.wait4 of its process) go to OUT/steps.jsonl, bench records to OUT/*.jsonl.
set -uo pipefail
phase="$1"; out="$(mkdir -p "$2" && cd "$2" && pwd)"
if [ "$phase" = status ]; then tail -n 30 "$out/xeon.log"; cat "$out/steps.jsonl" 2>/dev/null; exit 0; fi
repo="$(cd "$(dirname "$0")/.." && pwd)"; work="${TQ_WORK:-/tmp/tq-work}"
site=/tmp/tq-site; llama_site=/tmp/tq-llama
exec >>"$out/xeon.log" 2>&1
stamp() { echo "[xeon $(date -u +%H:%M:%S)] $*"; }
stamp "$phase: ${*:3} repo=$repo work=$work"
if [ -z "${TQ_PYTHON:-}" ]; then
  [ -d "$site" ] || { mkdir -p "$site.tmp" && tar -xJf "$repo/.carry/xeon-site.tar.xz" -C "$site.tmp" \
    && mv "$site.tmp" "$site"; } || { stamp "unpack failed"; exit 3; }
  export PYTHONPATH="$repo:$site:$llama_site"
else
  export PYTHONPATH="$repo"
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
py="${TQ_PYTHON:-python3}"; tq=("$py" -m tangquant.cli)
mkdir -p "$work"; cd "$work" || exit 5

# step NAME COMMAND...: skip when NAME exists in the work folder; record wall time and peak RSS.
step() {
  local name="$1"; shift
  if [ -e "$work/$name" ]; then stamp "have $name"; return 0; fi
  stamp "step $name: $*"
  "$py" - "$out/steps.jsonl" "$name" "$@" <<'PY'
import json, os, subprocess, sys, time
log, name, cmd = sys.argv[1], sys.argv[2], sys.argv[3:]
t0 = time.time(); p = subprocess.Popen(cmd); _, status, ru = os.wait4(p.pid, 0)
rc = os.waitstatus_to_exitcode(status)
rec = {"step": name, "rc": rc, "wall_s": round(time.time() - t0, 1),
       "peak_rss_gb": round(ru.ru_maxrss / 2**20, 2), "cmd": " ".join(cmd),
       "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
open(log, "a").write(json.dumps(rec) + "\n"); sys.exit(rc)
PY
  local rc=$?; [ $rc = 0 ] || { stamp "step $name FAILED rc=$rc"; return $rc; }
  stamp "done $name"
}

build() {
  local shape="${1:-7b}"
  { lscpu | grep -E "Model name|^CPU\(s\)|Thread|Socket|NUMA node|L3"; free -g | head -2; df -h /tmp | tail -1
    "$py" -c "import torch, transformers, openvino; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'openvino', openvino.__version__)"; } || { stamp "stack broken"; exit 4; }
  if [ -z "${TQ_PYTHON:-}" ] && [ ! -d "$llama_site" ]; then
    ( rm -rf /tmp/lcp "$llama_site.tmp" && mkdir -p /tmp/lcp && tar -xJf "$repo/.carry/llama-cpp-python-src.tar.xz" -C /tmp/lcp \
      && CMAKE_ARGS="$(sh "$repo/.ci/llama-cmake-args")" CMAKE_BUILD_PARALLEL_LEVEL=16 step llama-build "$py" -m pip install -q \
         --no-deps --no-build-isolation --no-index --target "$llama_site.tmp" /tmp/lcp/llama_cpp_python-0.3.36 \
      && mv "$llama_site.tmp" "$llama_site" ) &
  fi
  step base "$py" "$repo/benchmarks/shapes.py" --shape "$shape" --output base --adapter lora || exit 6
  step merged "${tq[@]}" merge --model base --adapter lora --output merged & local merge_pid=$!
  step gptq "${tq[@]}" quantize --model base --output gptq --algo rtn --bits 4 --group-size 128 --sym \
    --layer-wise --eval-samples 0 || exit 8
  wait "$merge_pid"; rm -f merged/*.safetensors  # only its peak RSS was wanted; disk is finite
  step gguf "${tq[@]}" export --model gptq --output gguf --format gguf &
  step ir "${tq[@]}" export --model gptq --output ir --format openvino
  wait
  [ -d "$llama_site" ] || [ -n "${TQ_PYTHON:-}" ] || stamp "no llama.cpp build: no llama.cpp rows"
  du -sh "$work"/* 2>/dev/null; df -h "$work" | tail -1
  stamp "build done"
}

# What a llama.cpp user makes of the same model (f16 GGUF -> llama-quantize); the f16 file is
# removed once quantized (a 7B one is 15 GB of a 64 GB disk).
anchors() {
  [ -d base ] || { stamp "no base model: no anchors"; return 1; }
  step anchors "$py" "$repo/benchmarks/llamacpp_anchor.py" --model base --output anchors --types q4_0,q4_k_m \
    && rm -f anchors/*-F16.gguf
}

bench() {
  local threads="${1:-16}"
  local b=("${tq[@]}" bench ${TQ_BENCH_ARGS:--p 512 -n 128 -r 3} -t "$threads"
           --baseline-python "${TQ_BASEPY:-$(command -v "$py")}" --force)
  local c=(--candidate tq-ir=ov:ir)
  [ -d tuned ] && c+=(--candidate tq-ir-tuned=ov:tuned)
  [ -d gguf ] && c+=(--candidate tq-gguf=llamacpp:gguf)
  for t in Q4_0 Q4_K_M; do
    for f in anchors/*-"$t".gguf; do [ -e "$f" ] && c+=(--candidate "llama-$t=llamacpp:$f"); done
  done
  # llama.cpp's default repacking segfaulted on the AMX Xeon (2026-12-02) when built with AMX; it is
  # built without AMX now (.ci/llama-cmake-args), and the plain path stays beside it for the record.
  for f in anchors/*-Q4_0.gguf; do [ -e "$f" ] && c+=(--candidate "llama-Q4_0-repack0=llamacpp:$f,repack=0"); done
  c+=(--candidate ov+lora=ov+lora:ir,adapter=lora --candidate seed-gptq+lora=torch-gptq+lora:gptq,adapter=lora)
  stamp "bench: ${c[*]}"
  "${b[@]}" "${c[@]}" --results "$out/bench-t$threads.jsonl" > "$out/bench-t$threads.md"
  stamp "bench rc=$?"
}

tune() {
  local threads="${1:-16}"
  [ -d tuned ] || cp -r ir tuned
  step tune.done bash -c "$(printf '%q ' "${tq[@]}") tune --model tuned -t $threads --budget ${TQ_TUNE_BUDGET:-4m} \
    --apply --results $out/tune.jsonl > $out/tune.md && touch tune.done"
}

case "$phase" in
  build) build "${3:-7b}" ;;
  anchors) anchors ;;
  bench) bench "${3:-16}" ;;
  tune) tune "${3:-16}" ;;
  *) echo "usage: xeon_full.sh build|anchors|tune|bench|status OUT [SHAPE|THREADS]" >&2; exit 2 ;;
esac
