#!/usr/bin/env bash
# Speculative decoding on a lent Xeon (issue 28), after `benchmarks/xeon_full.sh setup OUT` made the 7B
# target (ir/, gguf/) in the work folder ($TQ_WORK, default /tmp/tq-work) and unpacked llama-cpp-python's
# source to /tmp/lcp. Same conventions as xeon_full.sh: resumable steps, start in the background from a
# copy of the checkout, poll, copy OUT back on every call. Random weights, speed only, at the 7B/0.5B shapes;
# the demo pair's figures are real (trained weights).
#
#   xeon_draft.sh tools OUT        llama.cpp's own tools from the vendored source of llama-cpp-python 0.3.36
#                                  (llama 0c1e570): llama-speculative-simple, llama-server, llama-bench
#   xeon_draft.sh draft OUT        the 0.5B draft shape (random INT4, shapes --gptq) → draft-ir/, draft-gguf/
#   xeon_draft.sh steps OUT [T]    (b) one target step verifying K+1 tokens and one draft step, both engines
#                                  (benchmarks/draft_step_cost.py → OUT/draft-step-cost-tT.json)
#   xeon_draft.sh peer OUT [T]     llama.cpp's own speculative decoding with the same 0.5B draft at 7B (random
#                                  weights: next to nothing is accepted, this is its cost when drafts fail) and
#                                  plain llama-bench tg, for the record (OUT/peer-7b-tT.log)
#   xeon_draft.sh demo OUT [T]     (d) the demo pair end to end with and without the draft, per K, both engines
#                                  (benchmarks/draft_acceptance.py --timing 3) and llama-speculative-simple on
#                                  the same GGUFs and prompts (OUT/demo-pair-tT/, OUT/demo-peer-tT.log)
#   xeon_draft.sh project OUT [T]  (c) the projection from (a) (benchmarks/results/*-draft-acceptance/) and (b)
#   xeon_draft.sh all OUT [T]      tools, draft, steps, peer, demo, project (T threads, default 16)
#
# llama-server with a draft, as its users run it (the same flags on the CLI; OpenAI API on :8080):
#   /tmp/llama-tools/bin/llama-server -m gguf/*.gguf -md draft-gguf/*.gguf --spec-type draft-simple --spec-draft-n-max 4 -t 16 -c 4096
set -uo pipefail
phase="$1"; out="$(mkdir -p "$2" && cd "$2" && pwd)"; threads="${3:-16}"
repo="$(cd "$(dirname "$0")/.." && pwd)"; work="${TQ_WORK:-/tmp/tq-work}"
tools=/tmp/llama-tools; src="${TQ_LLAMA_SRC:-/tmp/lcp/llama_cpp_python-0.3.36/vendor/llama.cpp}"
exec >>"$out/xeon-draft.log" 2>&1
stamp() { echo "[xeon-draft $(date -u +%H:%M:%S)] $*"; }
if [ -z "${TQ_PYTHON:-}" ]; then export PYTHONPATH="$repo:/tmp/tq-site:/tmp/tq-llama"; else export PYTHONPATH="$repo"; fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
py="${TQ_PYTHON:-python3}"; tq=("$py" -m tangquant.cli)
mkdir -p "$work"; cd "$work" || exit 5
stamp "$phase threads=$threads repo=$repo work=$work"

build_tools() {  # the same llama.cpp as the llama-cpp-python the bench runs, with the same CPU flags
  [ -x "$tools/bin/llama-speculative-simple" ] && [ -x "$tools/bin/llama-server" ] && return 0
  [ -d "$src" ] || { mkdir -p /tmp/lcp && tar -xJf "$repo/.carry/llama-cpp-python-src.tar.xz" -C /tmp/lcp; }
  # The sdist leaves out tools/ui (the server's web page and its asset templates): llama-server then builds
  # against an empty asset table (this stand-in, written here), serving the API without the page.
  [ -e "$src/tools/ui/CMakeLists.txt" ] || { mkdir -p "$src/tools/ui" && cd "$src/tools/ui" && cat > ui.h <<'H'
// A stand-in for llama.cpp's tools/ui, which the llama-cpp-python sdist leaves out: no embedded page.
#pragma once
#include <cstddef>
#include <string>
#include <vector>
struct llama_ui_asset { std::string name; std::string type; std::string etag; const unsigned char * data; size_t size; };
const std::vector<llama_ui_asset> & llama_ui_get_assets();
const llama_ui_asset * llama_ui_find_asset(const std::string & name);
bool llama_ui_use_gzip();
H
    cat > ui.cpp <<'C'
#include "ui.h"
const std::vector<llama_ui_asset> & llama_ui_get_assets() { static const std::vector<llama_ui_asset> none; return none; }
const llama_ui_asset * llama_ui_find_asset(const std::string &) { return nullptr; }
bool llama_ui_use_gzip() { return false; }
C
    printf '%s\n' 'add_library(llama-ui STATIC ui.cpp ui.h)' \
      'target_include_directories(llama-ui PUBLIC ${CMAKE_CURRENT_SOURCE_DIR})' \
      'set_target_properties(llama-ui PROPERTIES POSITION_INDEPENDENT_CODE ON)' \
      'add_custom_target(llama-ui-assets)' > CMakeLists.txt && cd "$work"; }
  # shellcheck disable=SC2046
  cmake -S "$src" -B "$tools" -DCMAKE_BUILD_TYPE=Release -DLLAMA_OPENSSL=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=ON -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON \
    -DCMAKE_C_COMPILER="${TQ_CC:-$(command -v gcc)}" -DCMAKE_CXX_COMPILER="${TQ_CXX:-$(command -v g++)}" \
    $(sh "$repo/.ci/llama-cmake-args" | sed 's/-DLLAVA_BUILD=OFF//') \
    && cmake --build "$tools" -j "$(nproc)" --target llama-speculative-simple llama-server llama-bench \
    && stamp "tools built: $(ls "$tools/bin")"
}

draft_shape() {  # the draft at the 0.5B shape: random INT4 in the GPTQ layout, IR and GGUF
  [ -d draft-gptq ] || "$py" -m tangquant.poet.shapes --shape 0.5b --gptq draft-gptq || return 1
  [ -d draft-ir ] || "${tq[@]}" export --model draft-gptq --output draft-ir --format openvino || return 1
  [ -d draft-gguf ] || "${tq[@]}" export --model draft-gptq --output draft-gguf --format gguf || return 1
  "$py" -c "from tangquant import draft; draft.check('ir', 'draft-ir'); draft.check('gguf', 'draft-gguf'); print('draft check ok')"
}

steps() {  # (b)
  "$py" "$repo/benchmarks/draft_step_cost.py" --target-ir ir --draft-ir draft-ir --target-gguf gguf \
    --draft-gguf draft-gguf -t "$threads" -p 512 --ks 1,2,3,4,5,6,7,8 --out "$out/draft-step-cost-t$threads.json"
}

peer_7b() {  # llama.cpp's own tool at the 7B/0.5B shapes (random weights: acceptance ~0) and its plain tg
  local t=(gguf/*.gguf) d=(draft-gguf/*.gguf) prompt
  prompt="$("$py" -c "import random; r=random.Random(0); print(' '.join(str(r.randrange(10)) for _ in range(200)))")"
  { for k in 1 2 4 8; do
      echo "== llama-speculative-simple K=$k"
      "$tools/bin/llama-speculative-simple" -m "${t[0]}" -md "${d[0]}" -p "$prompt" -n 128 --temp 0 --top-k 1 --spec-type draft-simple \
        --spec-draft-n-max "$k" -t "$threads" -td "$threads" -c 2048 2>&1 | grep -E "decoded|n_draft|n_drafted|n_accept|accept "
    done
    echo "== llama-bench (plain tg128)"
    "$tools/bin/llama-bench" -m "${t[0]}" -p 0 -n 128 -t "$threads" -r 3
  } > "$out/peer-7b-t$threads.log" 2>&1
}

demo_pair() {  # (d) the demo pair, real weights, end to end, both engines, and llama.cpp's own tool on it
  "$py" "$repo/benchmarks/draft_acceptance.py" --workdir /tmp/draft-pair --out "$out/demo-pair-t$threads" \
    --threads "$threads" --timing 3 --engines ov,llamacpp || return 1
  "$py" - "$threads" "$tools/bin/llama-speculative-simple" > "$out/demo-peer-t$threads.log" 2>&1 <<'PY'
import json, re, subprocess, sys
from pathlib import Path
from transformers import AutoTokenizer
from tangquant.measure import poems
from tangquant.poet import ASSETS
threads, tool = sys.argv[1], sys.argv[2]
tok = AutoTokenizer.from_pretrained(str(ASSETS / "base"))
target, draft = next(Path("/tmp/draft-pair/target-gguf").glob("*.gguf")), next(Path("/tmp/draft-pair/draft-gguf").glob("*.gguf"))
prompts = [p["prompt"] for p in poems.load_prompts(ASSETS / "prompts.json")]
for k in (1, 2, 3, 4, 6, 8):
    tot = {"tokens": 0, "seconds": 0.0, "drafted": 0, "accepted": 0}
    for p in prompts:
        text = tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        run = subprocess.run([tool, "-m", str(target), "-md", str(draft), "-p", text, "-n", "100", "--temp", "0",
                              "--top-k", "1", "--spec-type", "draft-simple", "--spec-draft-n-max", str(k), "-t", threads, "-td", threads, "-c", "512"],
                             capture_output=True, text=True)
        log = run.stdout + run.stderr
        m = re.search(r"decoded\s+(\d+) tokens in\s+([\d.]+) seconds", log)
        d, a = re.search(r"n_drafted\s+= (\d+)", log), re.search(r"n_accept\s+= (\d+)", log)
        if run.returncode or not (m and d and a):
            print(json.dumps({"k": k, "prompt": p, "failed": run.returncode, "log": log[-400:]}), flush=True)
            continue
        tot["tokens"] += int(m.group(1)); tot["seconds"] += float(m.group(2))
        tot["drafted"] += int(d.group(1)); tot["accepted"] += int(a.group(1))
    print(json.dumps({"k": k, **tot, "tps": tot["tokens"] / tot["seconds"],
                      "acceptance": tot["accepted"] / max(1, tot["drafted"])}), flush=True)
PY
}

project() {  # (c)
  local acc; acc="$(ls -d "$repo"/benchmarks/results/*-draft-acceptance 2>/dev/null | tail -1)/acceptance.json"
  "$py" "$repo/benchmarks/draft_projection.py" --acceptance "$acc" --costs "$out/draft-step-cost-t$threads.json" \
    --out "$out/draft-projection-t$threads.md"
}

case "$phase" in
  tools) build_tools ;;
  draft) draft_shape ;;
  steps) steps ;;
  peer) peer_7b ;;
  demo) demo_pair ;;
  project) project ;;
  all) build_tools; draft_shape && steps && project; peer_7b; demo_pair; stamp "all done" ;;
  *) echo "usage: xeon_draft.sh tools|draft|steps|peer|demo|project|all OUT [THREADS]" >&2; exit 2 ;;
esac
stamp "$phase rc=$?"
