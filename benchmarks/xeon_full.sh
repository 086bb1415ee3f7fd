#!/usr/bin/env bash
# The side-by-side Xeon run at one shape (7B by default) in resumable phases, made for a lent
# machine that gives 10-minute calls and forgets everything ~30 s after the last one:
#
#   xeon_full.sh build OUT [SHAPE]      llama.cpp, the INT4 checkpoint (random, or TQ_GPTQ=rtn: the
#                                       bf16 shape model, TQ_MERGE=1 its merge for RSS, RTN), IR, GGUF,
#                                       the llama-quantize anchors (Q4_0, Q4_K_M)
#   xeon_full.sh tune OUT [THREADS]     tangquant tune --apply on a copy of the IR (tuned/)
#   xeon_full.sh bench OUT [THREADS [tuned]]  one bench run over every candidate there is
#   xeon_full.sh all OUT [SHAPE]        build, bench 16, tune 16, bench 16 tuned, bench 8
#   xeon_full.sh status OUT             the log's tail and each step's wall time and peak RSS
#
# Start a phase in the background from a copy of the checkout, so that a later call (which
# replaces the checkout) cannot change the code under it, then poll it from later calls:
#   rm -rf /tmp/tq-repo && cp -r . /tmp/tq-repo && (setsid bash /tmp/tq-repo/benchmarks/xeon_full.sh \
#     all /tmp/xo 7b >/dev/null 2>&1 &); for i in $(seq 55); do sleep 10; tar -czf $OUT/xo.tgz -C /tmp/xo .; done
# and from each later call (issued at once: the machine goes back 30 s after a call) the same loop.
# On 2026-12-02 `all` at 7B took 22 minutes to the end of the tuned bench (results/2026-12-02-xeon16-7b-run2/), and
# `build` alone 7.5 minutes once the exports were faster (results/2026-12-02-xeon16-run3-7b-build-0.5b-bench/). A call that comes later
# than ~30 s after the last one finds a fresh machine: that lost the 7B bench of the third session.
# pkill patterns must not match the calling command's own text (it runs as `bash -c COMMAND`).
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
# Random weights, speed only. The INT4 checkpoint stands for the merged fine-tune's (a merge changes
# values, not shapes or bytes): by default random integers in the GPTQ layout (tangquant.poet.shapes
# --gptq, seconds), with TQ_GPTQ=rtn `tangquant quantize --algo rtn` of the bf16 shape model (7 minutes
# at 7B; TQ_MERGE=1 also runs `tangquant merge` once for its peak RSS). Steps run at once where they
# can (16 cores); each one's wall time and peak RSS (os.wait4 of its process) go to OUT/steps.jsonl,
# bench records to OUT/*.jsonl.
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

# llama.cpp 0c1e570 built on the lent Xeon segfaulted loading any GGUF on 2026-12-02 (in print_info):
# its CC/CXX linked libstdc++ statically (incidents/2026-12-02-llama-segfault/; build() now uses the system compilers).
# Probe the build on a tiny file before any 7B work (benchmarks/llama_probe.py logs the libraries it
# binds to), and if it crashes try a build without OpenMP; benchmarks/incidents/2026-12-02-llama-segfault/llama_diag.sh takes it further.
probe_llama() {
  echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
  step llama-probe "$py" "$repo/benchmarks/llama_probe.py" /tmp/llama-probe; local rc=$?
  cp /tmp/llama-probe/probe.json "$out/llama-probe.json" 2>/dev/null; [ $rc = 0 ] && return 0
  stamp "llama.cpp does not run a GGUF here: trying a build without OpenMP"
  CC="$cc" CXX="$cxx" CMAKE_ARGS="$(sh "$repo/.ci/llama-cmake-args") -DGGML_OPENMP=OFF" CMAKE_BUILD_PARALLEL_LEVEL=16 step llama-build-noomp \
    "$py" -m pip install -q --no-deps --no-build-isolation --no-index --target "$llama_site.noomp" \
    /tmp/lcp/llama_cpp_python-0.3.36 || return 1
  mv "$llama_site" "$llama_site.omp" && mv "$llama_site.noomp" "$llama_site"
  step llama-probe-noomp "$py" "$repo/benchmarks/llama_probe.py" /tmp/llama-probe; rc=$?
  cp /tmp/llama-probe/probe.json "$out/llama-probe-noomp.json" 2>/dev/null; return $rc
}

build() {
  local shape="${1:-7b}"
  { lscpu | grep -E "Model name|^CPU\(s\)|Thread|Socket|NUMA node|L3"; free -g | head -2; df -h /tmp | tail -1
    "$py" -c "import torch, transformers, openvino; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'openvino', openvino.__version__)"; } || { stamp "stack broken"; exit 4; }
  local llama_pid=
  # The lent Xeon's CC/CXX (/opt/gcc) link libstdc++ statically into libggml.so: llama.cpp's tools
  # run, but from Python every GGUF load segfaulted in print_info (2026-12-02, incidents/2026-12-02-llama-segfault/). The
  # distribution's compilers on PATH link it dynamically, as a Python extension needs.
  local cc cxx; cc="${TQ_CC:-$(command -v gcc)}"; cxx="${TQ_CXX:-$(command -v g++)}"; echo "llama.cpp compilers: $cc $cxx"
  if [ -z "${TQ_PYTHON:-}" ] && [ ! -d "$llama_site" ]; then
    ( rm -rf /tmp/lcp "$llama_site.tmp" && mkdir -p /tmp/lcp && tar -xJf "$repo/.carry/llama-cpp-python-src.tar.xz" -C /tmp/lcp \
      && CC="$cc" CXX="$cxx" CMAKE_ARGS="$(sh "$repo/.ci/llama-cmake-args")" CMAKE_BUILD_PARALLEL_LEVEL=16 step llama-build "$py" -m pip install -q \
         --no-deps --no-build-isolation --no-index --target "$llama_site.tmp" /tmp/lcp/llama_cpp_python-0.3.36 \
      && mv "$llama_site.tmp" "$llama_site" && probe_llama ) & llama_pid=$!
  fi
  step lora "$py" -m tangquant.poet.shapes --shape "$shape" --adapter lora || exit 6
  if [ "${TQ_GPTQ:-random}" = rtn ]; then  # the bf16 shape model, then tangquant quantize --algo rtn
    step base "$py" -m tangquant.poet.shapes --shape "$shape" --output base || exit 6
    [ -z "${TQ_MERGE:-}" ] || step merged "${tq[@]}" merge --model base --adapter lora --output merged
    rm -f merged/*.safetensors  # only its peak RSS was wanted; disk is finite
    step gptq "${tq[@]}" quantize --model base --output gptq --algo rtn --bits 4 --group-size 128 --sym \
      --layer-wise --eval-samples 0 || exit 8
  else  # random INT4 in the same layout and bytes (shapes.build_gptq): minutes fewer at 7B
    step gptq "$py" -m tangquant.poet.shapes --shape "$shape" --gptq gptq || exit 8
  fi
  # (the llama.cpp build and probe are the parent's child: a subshell cannot wait for it, so it polls)
  ( while [ -n "$llama_pid" ] && kill -0 "$llama_pid" 2>/dev/null; do sleep 2; done
    # a crash of llama.cpp's load check still leaves a file to bench: its rows then fail, on record
    { step gguf "${tq[@]}" export --model gptq --output gguf --format gguf \
      || step gguf "${tq[@]}" export --model gptq --output gguf --format gguf --no-llama-check; } && anchors ) &
  step ir "${tq[@]}" export --model gptq --output ir --format openvino
  wait
  [ -d "$llama_site" ] || [ -n "${TQ_PYTHON:-}" ] || stamp "no llama.cpp build: no llama.cpp rows"
  du -sh "$work"/* 2>/dev/null; df -h "$work" | tail -1
  stamp "build done"
}

# What a llama.cpp user makes of the same model with llama-quantize. From the bf16 shape model
# when there is one (its f16 GGUF, removed once quantized); otherwise requantized from tangquant's
# GGUF: the tensor types and bytes an f16 source gives (speed only), without the 15 GB f16 file
# that does not fit the disk beside a 7B export.
anchors() {
  if [ -d base ]; then
    step anchors "$py" -m tangquant.measure.anchor --model base --output anchors --types q4_0,q4_k_m \
      && rm -f anchors/*-F16.gguf
  else
    local src=(gguf/*.gguf)
    [ -e "${src[0]}" ] || { stamp "no base model or GGUF: no anchors"; return 1; }
    step anchors "$py" -m tangquant.measure.anchor --from-gguf "${src[0]}" --output anchors --types q4_0,q4_k_m
  fi
}

# bench THREADS [LABEL]: every candidate there is; LABEL "tuned" benches only the IR before and
# after tangquant tune beside tangquant's GGUF and llama.cpp Q4_0 (a shorter second run).
bench() {
  local threads="${1:-16}" label="${2:-all}"
  local b=("${tq[@]}" bench ${TQ_BENCH_ARGS:--p 512 -n 128 -r 1 --rounds 3} -t "$threads"
           --baseline-python "${TQ_BASEPY:-$(command -v "$py")}" --force)
  local c=(--candidate tq-ir=ov:ir)
  [ -d tuned ] && [ -e tune.done ] && c+=(--candidate tq-ir-tuned=ov:tuned)
  [ -d gguf ] && c+=(--candidate tq-gguf=llamacpp:gguf)
  for t in Q4_0 Q4_K_M; do
    [ "$label" = tuned ] && [ "$t" = Q4_K_M ] && continue
    for f in anchors/*-"$t".gguf; do [ -e "$f" ] && c+=(--candidate "llama-$t=llamacpp:$f"); done
  done
  if [ "$label" != tuned ]; then
    # llama.cpp's default repacking segfaulted on the AMX Xeon (2026-12-02) when built with AMX; it
    # is built without AMX now (.ci/llama-cmake-args); TQ_REPACK0=1 adds the plain path for the record.
    [ -z "${TQ_REPACK0:-}" ] || for f in anchors/*-Q4_0.gguf; do
      [ -e "$f" ] && c+=(--candidate "llama-Q4_0-repack0=llamacpp:$f,repack=0"); done
    c+=(--candidate ov+lora=ov+lora:ir,adapter=lora --candidate seed-gptq+lora=torch-gptq+lora:gptq,adapter=lora)
  fi
  stamp "bench $label: ${c[*]}"
  "${b[@]}" "${c[@]}" --results "$out/bench-$label-t$threads.jsonl" > "$out/bench-$label-t$threads.md"
  stamp "bench $label rc=$?"
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
  bench) bench "${3:-16}" "${4:-all}" ;;
  tune) tune "${3:-16}" ;;
  # everything in one background run, the headline first: build, the full bench at 16 threads,
  # tune, the tuned bench, the full bench at 8 threads
  all) build "${3:-7b}" && bench 16 && tune 16 && bench 16 tuned && bench 8; stamp "all done" ;;
  *) echo "usage: xeon_full.sh build|anchors|tune|bench|all|status OUT [SHAPE|THREADS [LABEL]]" >&2; exit 2 ;;
esac
