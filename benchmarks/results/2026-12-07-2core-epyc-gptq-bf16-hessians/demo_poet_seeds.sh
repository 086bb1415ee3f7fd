cd /work/main
for seed in 42 1 2 3; do
 for mode in fp32 bf16 amx; do
  extra=""; dt=$mode; [ $mode = amx ] && { extra=--amx-emulation; dt=bf16; }
  out=$(.venv/bin/python /tmp/exp/emul.py $extra --json quantize --model /tmp/dm --output /tmp/q-e --recipe tangquant/assets/demo/int4-gptq-g128.yaml --calib tangquant/assets/demo/calib.json --layer-wise --true-sequential --eval-samples 8 --compute-dtype $dt --seed $seed --force 2>/dev/null)
  echo "{\"seed\": $seed, \"mode\": \"$mode\", \"out\": $out}" 
 done
done
