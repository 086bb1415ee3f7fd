# A: 7e8952c (worktree) and B: this checkout, bf16, 16x512, one thread each, side by side
CAL=/work/shared/data/chinese-poetry/全唐诗/poet.tang.0.json
ARGS="--json quantize --model /tmp/q7l2 --recipe recipes/int4-gptq-g128-layerwise.yaml --calib $CAL --num-samples 16 --eval-samples 2 --compute-dtype bf16 --force"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
(cd /work/wt/test-main && PYTHONPATH=/work/wt/test-main /work/main/.venv/bin/python -m tangquant $ARGS --output /tmp/cut-old > /tmp/exp/cut-old.json 2> /tmp/exp/cut-old.log) &
(cd /work/main && .venv/bin/python -m tangquant $ARGS --output /tmp/cut-new > /tmp/exp/cut-new.json 2> /tmp/exp/cut-new.log) &
wait
