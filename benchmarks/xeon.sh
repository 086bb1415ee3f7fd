#!/usr/bin/env bash
# The Xeon measurement: a bare machine with Python 3.12 and torch but no network.
#
#   benchmarks/xeon.sh OUT_DIR [SHAPE] [THREADS] [REPETITIONS] [SET]
#
# SET is "all" (default) or "ov" (only the OpenVINO candidates and knobs, for a short lease).
#
# 1. installs the carried packages (.carry/xeon-site.tar.xz, made by benchmarks/xeon_pack.sh)
#    into /tmp/tq-site: openvino (CPU plugin only) + genai + tokenizers, transformers 4.57.6,
#    optimum(-intel), nncf, neural-compressor, peft 0.19.1 and the seed's gptqmodel 5.6.12;
# 2. builds the random-weight Qwen1.5 SHAPE model and a random r=8 q/v adapter (tangquant.poet.shapes);
# 3. tangquant merge -> quantize --algo rtn (the same GPTQ INT4 g128 layout as --algo gptq; RTN
#    only because it needs no calibration pass, and speed does not depend on the integers)
#    -> export --format openvino;
# 4. tangquant bench at THREADS over ov (merged INT4), ov+lora, torch-gptq+lora (the seed
#    baseline), torch bf16, then OpenVINO knobs (KV-cache u8, dynamic quantization, pinning).
#
# Random weights, speed only: the merged and un-merged models have identical shapes, so
# ov+lora and the seed baseline reuse the merged INT4 IR / GPTQ checkpoint as their "base"
# (the adapter is applied on top at run time exactly as it would be on the real base).
# Every step logs to OUT_DIR/xeon.log; results go to OUT_DIR/xeon-*.jsonl and xeon-*.png.
# Steps whose output exists in TQ_WORK (default /tmp/tq-work) are skipped, so a second call to a
# still-warm machine resumes. On the lent device (carry [".carry/xeon-site.tar.xz"]), 2026-11-28:
#   mkdir -p /tmp/xo; timeout 445 bash benchmarks/xeon.sh /tmp/xo 1.8b 16 3 ov; cp /tmp/xo/xeon* $OUT/
# At 1.8B the pipeline took ~5 min there (quantize ~100 s, export ~145 s); 7B is 4.3x the weights.
set -uo pipefail
out="$(mkdir -p "$1" && cd "$1" && pwd)"; shape="${2:-1.8b}"; threads="${3:-16}"; reps="${4:-3}"; set_="${5:-all}"
repo="$(cd "$(dirname "$0")/.." && pwd)"; work="${TQ_WORK:-/tmp/tq-work}"; site=/tmp/tq-site
log="$out/xeon.log"
exec > >(tee -a "$log") 2>&1
stamp() { echo "[xeon $(date -u +%H:%M:%S)] $*"; }

stamp "start: shape=$shape threads=$threads reps=$reps repo=$repo work=$work"
# Elsewhere (the 2-core machine) TQ_PYTHON/TQ_BASEPY name existing environments and nothing is unpacked.
if [ -f "$repo/.carry/xeon-site.tar.xz" ] && [ -z "${TQ_PYTHON:-}" ]; then
  [ -d "$site" ] || { mkdir -p "$site" && tar -xJf "$repo/.carry/xeon-site.tar.xz" -C "$site"; } \
    || { stamp "unpack failed"; exit 3; }
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
py="${TQ_PYTHON:-python3}"
tq() { "$py" -m tangquant.cli "$@"; }
{ lscpu | grep -E "Model name|^CPU\(s\)|Thread|Socket|NUMA node|L3"; free -g | head -2; df -h /tmp | tail -1
  "$py" -c "import torch, transformers, openvino, openvino_genai; print('torch', torch.__version__, 'transformers', transformers.__version__, 'openvino', openvino.__version__)"
} || { stamp "environment check failed"; exit 4; }
"$py" - <<'PY' || stamp "WARNING: part of the stack does not import (see above)"
import importlib, importlib.metadata as md
for mod, dist in [("neural_compressor", "neural-compressor-pt"), ("optimum.intel", "optimum-intel"),
                  ("nncf", "nncf"), ("openvino_tokenizers", "openvino-tokenizers"), ("peft", "peft"),
                  ("gptqmodel", "gptqmodel"), ("optimum", "optimum"), ("torchao", "torchao")]:
    try:
        importlib.import_module(mod)
        print("ok", dist, md.version(dist))
    except Exception as exc:
        print("FAILED", mod, type(exc).__name__, str(exc)[:300])
PY

mkdir -p "$work"; cd "$work" || exit 5
run_step() {  # name, command...: skip a step whose output exists (resumable between calls)
  local name="$1"; shift
  if [ -e "$work/$name" ]; then stamp "have $name"; return 0; fi
  stamp "step $name"; local t0=$SECONDS
  "$@" || { stamp "step $name FAILED"; return 1; }
  stamp "done $name in $((SECONDS - t0)) s"
}
run_step base "$py" -m tangquant.poet.shapes --shape "$shape" --output "$work/base" --adapter "$work/lora" || exit 6
run_step merged tq merge --model base --adapter lora --output merged || exit 7
run_step gptq tq quantize --model merged --output gptq --algo rtn --bits 4 --group-size 128 \
    --eval-samples 0 || exit 8
run_step ir tq export --model gptq --output ir --format openvino || exit 9
rm -rf "$work/merged-staging" 2>/dev/null

# The seed baseline's python: on the Xeon the same interpreter, which sees the carried seed stack
# (transformers 4.57.6, optimum 2.1.0, gptqmodel 5.6.12, peft 0.19.1) on its PYTHONPATH.
basepy="${TQ_BASEPY:-$(command -v "$py")}"

b=(tq bench -p 512 -n 128 -r "$reps" -t "$threads" --baseline-python "$basepy")
main=(--candidate merged-int4=ov:ir --candidate ov+lora=ov+lora:ir,adapter=lora)
[ "$set_" = all ] && main+=(--candidate seed-gptq+lora=torch-gptq+lora:gptq,adapter=lora
                            --candidate torch-bf16=torch:base,dtype=bf16)
stamp "bench: main candidates"
"${b[@]}" "${main[@]}" --results "$out/xeon-bench.jsonl" --plot "$out/xeon-bench.png" \
  | tee "$out/xeon-table.md"
stamp "bench: OpenVINO knobs"
"${b[@]}" -r 2 --candidate merged-int4=ov:ir --candidate kv-u8=ov:ir,KV_CACHE_PRECISION=u8 \
    --candidate dq-off=ov:ir,DYNAMIC_QUANTIZATION_GROUP_SIZE=0 \
    --candidate pinned=ov:ir,ENABLE_CPU_PINNING=true \
    --candidate lora-kv-u8=ov+lora:ir,adapter=lora,KV_CACHE_PRECISION=u8 \
    --results "$out/xeon-knobs.jsonl" | tee "$out/xeon-knobs.md"
[ "$set_" = all ] || { stamp "all done"; exit 0; }
stamp "bench: thread sweep"
"${b[@]}" -r 2 -t 8,12 --candidate merged-int4=ov:ir \
    --results "$out/xeon-threads.jsonl" | tee "$out/xeon-threads.md"
stamp "all done"
