#!/usr/bin/env bash
# The side-by-side run on a lent Xeon, every peer at its best, in one background chain that
# survives the 10-minute calls of a machine given back ~30 s after the last one:
#
#   xeon_full.sh all OUT        setup, then the benches: the main one (-p 512 -n 128, every candidate), the
#                               short-in/long-out one (-p 32 -n 256), the main one again while the lease
#                               lasts, llama.cpp's own llama-bench; the speculative step costs with TQ_DRAFT=1
#   xeon_full.sh setup OUT      builds and models: llama-cpp-python (native, AMX where the compiler and
#                               the run-time probe allow it), llama.cpp's own tools (llama-bench,
#                               llama-speculative-simple), ik_llama.cpp (native), ONNX Runtime GenAI;
#                               the random 7B GPTQ checkpoint and a q/v LoRA of its shape (shapes), its IR,
#                               its GGUF with the export's default q5_0 head and with a q4_0 head,
#                               llama-quantize Q4_0 and Q4_K_M of that GGUF, its ONNX Runtime GenAI
#                               export; with TQ_DRAFT=1 the 0.5B draft's IR and GGUF
#   xeon_full.sh bench OUT      the benches of `all`, each one `tangquant bench` run over every candidate
#                               whose model exists; TQ_DEADLINE (epoch seconds: the lease's end) drops a
#                               bench that would not end by then (TQ_RUN_S seconds a candidate, ~50 at 7B)
#   xeon_full.sh steps OUT      speculative decoding's step costs at 7B target / 0.5B draft
#                               (benchmarks/draft_step_cost.py; needs TQ_DRAFT=1's setup)
#   xeon_full.sh gptq OUT       the pipeline's own steps at full size: a random 7B bf16 model and q/v LoRA
#                               (shapes), `tangquant merge` of them and, beside it, `tangquant quantize`
#                               of the model with the layer-wise GPTQ recipe and its calibration (128 x
#                               512 tokens of the Tang calibration split that `tangquant data` writes,
#                               carried as .carry/calib/tang_calib.json or named by TQ_CALIB; more quantize
#                               flags in TQ_GPTQ_ARGS, e.g. "--compute-dtype bf16")
#   xeon_full.sh gptqprof OUT   one 7B-width GPTQ layer (a 1-layer cut, the recipe's 128 x 512 calibration
#                               tokens, --compute-dtype bf16) under torch's profiler: each phase's top operators
#                               (benchmarks/gptq_profile.py; OUT/gptq-profile/profile.{json,txt}), a few minutes
#   xeon_full.sh status OUT     the log's tail and each step's wall time and peak RSS (the GPTQ's RSS every
#                               10 s in OUT/rss.log: a lease can end it first)
#
# Start it from a copy of the checkout (a later call replaces the checkout), in its own session,
# and copy OUT back from every call before anything can overrun it:
#   rm -rf /tmp/tq-repo && cp -r . /tmp/tq-repo && (setsid bash /tmp/tq-repo/benchmarks/xeon_full.sh all \
#     /tmp/xo >/dev/null 2>&1 &); for i in $(seq 54); do sleep 10; tar -czf $OUT/xo.tgz -C /tmp/xo .; done
# Later calls (issued at once: the machine goes back ~30 s after a call) run the same loop. The ORT export
# waits for /tmp/tq-ort.ready (a later call installs the newest onnxruntime there) up to TQ_ORT_WAIT s;
# TQ_NO_ORT=1 leaves ONNX Runtime GenAI out (its export is the longest step: a short lease); TQ_LEAN=1
# also ik_llama.cpp, Q4_K_M and ov+lora (tangquant's IR and GGUFs against llama.cpp Q4_0 only); TQ_GGUF_ONLY=1
# also the IR (its export is the setup's longest step): the GGUFs against llama.cpp Q4_0.
#
# Carried (git-ignored; benchmarks/xeon_pack.sh makes them): .carry/xeon-site.tar.xz (OpenVINO,
# transformers, optimum-intel, nncf, INC, gguf, the seed's gptqmodel stack), .carry/llama-cpp-python-src.tar.xz
# (llama.cpp 0c1e570), .carry/ik-llama-cpp-python-src.tar.xz, the onnxruntime-genai wheels; compiled with the
# distribution's gcc/g++ (the environment's /opt/gcc links libstdc++ statically: llama.cpp then segfaults in
# Python). Elsewhere TQ_PYTHON names a ready environment and nothing is unpacked or built (a rehearsal:
# TQ_SHAPE=smoke builds a 2-layer model of the 0.5B width instead of 7B).
#
# Random weights, speed only. Every step's wall time and peak RSS (os.wait4 of its process) go to
# OUT/steps.jsonl, bench records to OUT/bench-*.jsonl, tables to OUT/bench-*.md.
set -uo pipefail
phase="$1"; out="$(mkdir -p "$2" && cd "$2" && pwd)"
if [ "$phase" = status ]; then tail -n 40 "$out/xeon.log"; cat "$out/steps.jsonl" 2>/dev/null; exit 0; fi
repo="$(cd "$(dirname "$0")/.." && pwd)"; work="${TQ_WORK:-/tmp/tq-work}"
site=/tmp/tq-site; llama_site=/tmp/tq-llama; ik_site=/tmp/tq-ik; ort_site=/tmp/tq-ort; tools=/tmp/llama-tools
threads="${TQ_THREADS:-16}"; shape="${TQ_SHAPE:-7b}"
exec >>"$out/xeon.log" 2>&1
stamp() { echo "[xeon $(date -u +%H:%M:%S)] $*"; }
stamp "$phase repo=$repo work=$work shape=$shape threads=$threads"
if [ -z "${TQ_PYTHON:-}" ]; then
  [ -d "$site" ] || { mkdir -p "$site.tmp" && tar -xJf "$repo/.carry/xeon-site.tar.xz" -C "$site.tmp" \
    && mv "$site.tmp" "$site"; } || { stamp "unpack failed"; exit 3; }
  export PYTHONPATH="$repo:$ort_site.new:$ort_site:$site:$llama_site" TANGQUANT_IKLCPP_PATH="$ik_site"
else
  export PYTHONPATH="$repo"
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
py="${TQ_PYTHON:-python3}"; tq=("$py" -m tangquant.cli)
cc="${TQ_CC:-/usr/bin/gcc}"; cxx="${TQ_CXX:-/usr/bin/g++}"
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

host_record() {
  { lscpu; grep -m1 flags /proc/cpuinfo; free -g; df -h /tmp; "$cc" --version | head -1
    printf '#include <immintrin.h>\n' | "$cxx" -mamx-tile -x c++ -E - 2>/dev/null | tr '\n' ' ' \
      | grep -o '_tile_loadconfig *([^{]*{[^}]*}' | head -1
    "$py" -c "import torch, transformers, openvino; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'openvino', openvino.__version__)"; } > "$out/host.txt" 2>&1
}

# llama-cpp-python as its users build it: native, AMX included. The compiler check of
# .ci/llama-cmake-args would drop AMX for an old GCC header; here the bench's own run-time probe
# (tangquant/gguf/amx.py) guards every row, so such a build is forced native and the log says so.
build_llama() {
  [ -n "${TQ_PYTHON:-}" ] || [ -d "$llama_site" ] && return 0
  rm -rf /tmp/lcp "$llama_site.tmp" && mkdir -p /tmp/lcp && tar -xJf "$repo/.carry/llama-cpp-python-src.tar.xz" -C /tmp/lcp
  local args; args="$(CXX="$cxx" sh "$repo/.ci/llama-cmake-args" 2>"$out/llama-cmake-args.txt")"
  if grep -q "WITHOUT AMX" "$out/llama-cmake-args.txt"; then
    args="$(LLAMA_AMX=force sh "$repo/.ci/llama-cmake-args" 2>>"$out/llama-cmake-args.txt")"
  fi
  echo "$args" >> "$out/llama-cmake-args.txt"
  CC="$cc" CXX="$cxx" CMAKE_ARGS="$args" CMAKE_BUILD_PARALLEL_LEVEL=16 step llama-build "$py" -m pip install -q \
    --no-deps --no-build-isolation --no-index --target "$llama_site.tmp" /tmp/lcp/llama_cpp_python-0.3.36 \
    && mv "$llama_site.tmp" "$llama_site"
}

# llama.cpp's own tools from the same vendored source and flags: llama-bench (its users' speed
# figure) and llama-speculative-simple (its users' drafted decoding).
build_tools() {
  [ -n "${TQ_PYTHON:-}" ] || [ -x "$tools/bin/llama-speculative-simple" ] && return 0
  local src=/tmp/lcp/llama_cpp_python-0.3.36/vendor/llama.cpp
  # shellcheck disable=SC2046
  step llama-tools bash -c "cmake -S $src -B $tools -DCMAKE_BUILD_TYPE=Release -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=ON -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=OFF \
    -DCMAKE_C_COMPILER=$cc -DCMAKE_CXX_COMPILER=$cxx $(tail -n1 "$out/llama-cmake-args.txt" | sed 's/-DLLAVA_BUILD=OFF//') \
    >/dev/null && cmake --build $tools -j 16 --target llama-bench llama-speculative-simple >/dev/null"
}

build_ik() {
  [ -n "${TQ_PYTHON:-}" ] || [ -d "$ik_site" ] && return 0
  rm -rf /tmp/ikx && mkdir -p /tmp/ikx && tar -xJf "$repo/.carry/ik-llama-cpp-python-src.tar.xz" -C /tmp/ikx
  CC="$cc" CXX="$cxx" CMAKE_ARGS="$(sh "$repo/.ci/iklcpp-cmake-args")" CMAKE_BUILD_PARALLEL_LEVEL=16 step ik-build \
    "$py" -m pip install -q --no-deps --no-build-isolation --no-index --target "$ik_site.tmp" \
    /tmp/ikx/ik_llama_cpp_python-0.1.5 && mv "$ik_site.tmp" "$ik_site"
}

install_ort() {
  [ -n "${TQ_PYTHON:-}" ] || [ -d "$ort_site" ] && return 0
  "$py" -m pip install -q --no-deps --no-index --target "$ort_site" "$repo"/.carry/onnxruntime_genai-*.whl \
    "$repo"/.carry/onnx_ir-*.whl "$repo"/.carry/flatbuffers-*.whl && stamp "onnxruntime-genai installed"
}

model_shape() {  # the GPTQ checkpoint of the shape (random integers, GPTQ layout) and a q/v LoRA of it
  if [ "$shape" = smoke ] || [ "$2" = smoke ]; then
    step "$1" "$py" -c "import sys; from tangquant.poet import shapes; c = shapes.qwen_config('0.5b');
c.update(num_hidden_layers=2, max_window_layers=2, tie_word_embeddings=False); shapes.build_gptq(c, sys.argv[1])
shapes.build_adapter(sys.argv[1], sys.argv[2])" "$1" "$1-lora"
  else
    step "$1" "$py" -m tangquant.poet.shapes --shape "$2" --gptq "$1" --adapter "$1-lora"
  fi
}

wait_ort() {  # a later call installs the pinned onnxruntime to $ort_site.new and touches /tmp/tq-ort.ready
  [ -n "${TQ_NO_ORT:-}" ] && return 1
  local wait_s="${TQ_ORT_WAIT:-240}"
  while [ ! -e /tmp/tq-ort.ready ] && [ "$wait_s" -gt 0 ] && [ -z "${TQ_PYTHON:-}" ]; do sleep 5; wait_s=$((wait_s - 5)); done
}

disk_log() { while :; do echo "$(date -u +%H:%M:%S) $(df -BG --output=used,avail "$work" | tail -1)" >> "$out/disk.log"; sleep 20; done; }
# rss_log PATTERN: the resident memory (KiB) of the processes whose command line has PATTERN, every 10 s
# (a lease can end a run before its step's peak RSS is recorded).
rss_log() { while :; do ps -eo rss=,etimes=,args= | grep -F -- "$1" | grep -v grep \
  | grep -v steps.jsonl | awk -v t="$(date -u +%H:%M:%S)" '{print t, $1, $2}' >> "$out/rss.log"; sleep 10; done; }

setup() {
  host_record
  disk_log & local disk_pid=$!
  install_ort
  ( build_llama; build_tools ) > "$out/build-llama.log" 2>&1 & local llama_pid=$!
  local ik_pid=""
  if [ -z "${TQ_LEAN:-}" ]; then build_ik > "$out/build-ik.log" 2>&1 & ik_pid=$!; fi
  model_shape gptq "$shape" || exit 8
  [ -n "${TQ_DRAFT:-}" ] && model_shape draft-gptq 0.5b
  # Four branches at once (16 cores, 128 GB; one IR export peaks near 31 GB of disk with its fp16
  # staging copy and trace, the rest together under 30 GB: `disk.log` records it): the GGUF, then
  # (once llama.cpp is built) the llama-quantize files of the same integers; the GGUF with a 4-bit
  # head; the IR; the ONNX Runtime GenAI export once its onnxruntime is installed. The GGUF exports
  # do not wait for llama.cpp: their llama.cpp load check is skipped (and says so) while it builds,
  # the bench loads every file anyway.
  local types=q4_0,q4_k_m; [ -n "${TQ_LEAN:-}" ] && types=q4_0
  ( step gguf "${tq[@]}" export --model gptq --output gguf --format gguf
    while kill -0 "$llama_pid" 2>/dev/null; do sleep 2; done
    step anchors "$py" -m tangquant.measure.anchor --from-gguf "$(ls gguf/*.gguf)" --output anchors --types "$types"
    [ -n "${TQ_DRAFT:-}" ] && step draft-gguf "${tq[@]}" export --model draft-gptq --output draft-gguf --format gguf ) &
  local gguf_pid=$!
  ( step gguf-q4h "${tq[@]}" export --model gptq --output gguf-q4h --format gguf --gguf-head q4_0 ) &
  local q4h_pid=$!
  ( wait_ort && step ort "${tq[@]}" export --model gptq --output ort --format ortgenai ) &
  local ort_pid=$!
  [ -n "${TQ_GGUF_ONLY:-}" ] || step ir "${tq[@]}" export --model gptq --output ir --format openvino
  [ -n "${TQ_DRAFT:-}" ] && step draft-ir "${tq[@]}" export --model draft-gptq --output draft-ir --format openvino
  wait "$gguf_pid" "$q4h_pid" "$ort_pid" $ik_pid
  du -sh "$work"/* 2>/dev/null; df -h "$work" | tail -1
  kill "$disk_pid" 2>/dev/null
  stamp "setup done"; touch "$out/setup.done"
}

first() { local f; for f in "$@"; do [ -e "$f" ] && { echo "$f"; return; }; done; }

# bench LABEL P N ROUNDS NAME=KIND:PATH...: one tangquant bench run over the candidates whose model exists.
# With TQ_DEADLINE (epoch seconds: when the lease ends) a bench that would not end by then (TQ_RUN_S
# seconds a candidate a round, ~50 at 7B on 16 cores) is not started, and the log says so; the main
# bench always runs, its candidates in order of importance (a lease's end keeps the records so far).
run_bench() {
  local label="$1" p="$2" n="$3" rounds="$4"; shift 4
  local c=() cand path
  for cand in "$@"; do
    path="${cand#*:}"; path="${path%%,*}"
    [ -e "$path" ] && c+=(--candidate "$cand") || stamp "bench $label: no $path, $cand left out"
  done
  if [ "${TQ_DEADLINE:-0}" -gt 0 ] && [ "$label" != main ] \
      && [ $(( $(date +%s) + ${#c[@]} / 2 * rounds * ${TQ_RUN_S:-50} )) -gt "$TQ_DEADLINE" ]; then
    stamp "bench $label: would end after the lease, not run"; return 0
  fi
  stamp "bench $label: ${c[*]}"
  "${tq[@]}" bench -p "$p" -n "$n" -r 1 --rounds "$rounds" -t "$threads" --force "${c[@]}" \
    --results "$out/bench-$label.jsonl" > "$out/bench-$label.md"
  stamp "bench $label rc=$?"
}

# The candidates a Xeon user would pick (llama.cpp's two common quantizations, ik_llama.cpp with its
# recommended -rtr, ONNX Runtime GenAI) and tangquant's IR (merged; base + run-time LoRA) and GGUFs
# (q5_0 head, the default; q4_0 head). The IR's DYNAMIC_QUANTIZATION_GROUP_SIZE=0 lost at 7B on both
# Xeons measured on 2026-12-06, so the IR runs with its defaults.
candidates() {
  local gg q4h q40 qkm
  gg="$(first gguf/*.gguf)"; q4h="$(first gguf-q4h/*.gguf)"
  q40="$(first anchors/*-Q4_0.gguf)"; qkm="$(first anchors/*-Q4_K_M.gguf)"
  echo "llama-Q4_0=llamacpp:$q40" "tq-gguf=llamacpp:$gg" tq-ir=ov:ir ort=ortgenai:ort "tq-gguf-q4h=llamacpp:$q4h"
  [ "${1:-}" = short ] || [ -n "${TQ_LEAN:-}" ] || echo "ik-Q4_0-rtr=iklcpp:$q40,rtr=1" "llama-Q4_K_M=llamacpp:$qkm" \
    tq-ir+lora=ov+lora:ir,adapter=gptq-lora
}

bench() {
  wait_ort
  # shellcheck disable=SC2046
  run_bench main 512 128 "${TQ_ROUNDS:-1}" $(candidates)
  # shellcheck disable=SC2046
  run_bench short 32 256 "${TQ_ROUNDS:-1}" $(candidates short)
  # shellcheck disable=SC2046
  run_bench main2 512 128 1 $(candidates)
  local gg q40; gg="$(first gguf/*.gguf)"; q40="$(first anchors/*-Q4_0.gguf)"
  [ -x "$tools/bin/llama-bench" ] && "$tools/bin/llama-bench" -m "$q40" -m "$gg" -t "$threads" -p 512 -n 128 \
    -r 2 -o md >> "$out/llama-bench.md" 2>&1
  stamp "bench done"
}

steps() {
  step draft-steps.json "$py" "$repo/benchmarks/draft_step_cost.py" --target-ir ir --draft-ir draft-ir \
    --target-gguf gguf --draft-gguf draft-gguf -t "$threads" -p 512 --ks "${TQ_KS:-2,4}" --out "$out/draft-step-cost.json"
  [ -x "$tools/bin/llama-speculative-simple" ] && for k in 2 4; do
    "$tools/bin/llama-speculative-simple" -m "$(first gguf/*.gguf)" -md "$(first draft-gguf/*.gguf)" -p "写一首唐诗" \
      -n 128 --temp 0 --top-k 1 --spec-type draft-simple --spec-draft-n-max "$k" -t "$threads" -td "$threads" \
      -c 1024 > "$out/llama-speculative-k$k.log" 2>&1; done
  stamp "steps done"
}

# Which oneDNN kernels run --compute-dtype bf16's Hessian update (calibration.add_samples: an fp32 matmul
# in bf16 fpmath mode) and a bf16 linear of the calibration forwards: on AMX they name amx, elsewhere
# oneDNN keeps fp32 for the first.
fpmath_probe() {
  ONEDNN_VERBOSE=1 "$py" -c 'import types, torch; from tangquant.quant.calibration import add_samples
g = types.SimpleNamespace(H=torch.zeros(1024, 1024), nsamples=0)
add_samples(g, [torch.randn(1, 4096, 1024)], {})
with torch.autocast("cpu", dtype=torch.bfloat16): torch.nn.Linear(1024, 2048)(torch.randn(512, 1024))
print("torch threads", torch.get_num_threads())' 2>&1 | grep -E "exec|isa|threads" > "$out/onednn-fpmath.txt"
}

gptq7() {
  host_record
  fpmath_probe
  disk_log & local disk_pid=$!
  rss_log "tangquant.cli quantize" & local rss_pid=$!
  step base7 "$py" -m tangquant.poet.shapes --shape "$shape" --output base7 --adapter lora7 || exit 8
  # The merge beside the GPTQ (a lease is short): the GPTQ reads the base, whose shapes are the merged
  # model's; the merge's peak RSS is its own, its wall time and the GPTQ's first layer share the machine.
  local merge_pid=""  # TQ_NO_MERGE=1: the GPTQ alone (its first layer's time not shared)
  [ -n "${TQ_NO_MERGE:-}" ] || { step merged7 "${tq[@]}" merge --model base7 --adapter lora7 --output merged7 & merge_pid=$!; }
  step gptq7 "${tq[@]}" quantize --model base7 --output gptq7 \
    --recipe "$repo/recipes/int4-gptq-g128-layerwise.yaml" --calib "${TQ_CALIB:-$repo/.carry/calib/tang_calib.json}" \
    ${TQ_GPTQ_ARGS:-}
  [ -z "$merge_pid" ] || wait "$merge_pid"
  kill "$disk_pid" "$rss_pid" 2>/dev/null
  stamp "gptq done"; touch "$out/gptq.done"
}

gptqprof() {
  host_record
  fpmath_probe
  step gptq-profile "$py" "$repo/benchmarks/gptq_profile.py" --out "$work/gptq-profile" --shape "$shape" --layers 1 \
    --num-samples 128 --compute-dtype bf16 --calib "${TQ_CALIB:-$repo/.carry/calib/tang_calib.json}"
  mkdir -p "$out/gptq-profile" && cp "$work"/gptq-profile/profile.* "$out/gptq-profile/"
  stamp "gptqprof done"
}

case "$phase" in
  setup) setup ;;
  gptq) gptq7 ;;
  gptqprof) gptqprof ;;
  bench) bench ;;
  steps) steps ;;
  # what the headline needs first: a lease can end before the last phase
  all) setup; bench; [ -n "${TQ_DRAFT:-}" ] && steps; stamp "all done"; touch "$out/all.done" ;;
  *) echo "usage: xeon_full.sh all|setup|bench|steps|gptq|gptqprof|status OUT" >&2; exit 2 ;;
esac
