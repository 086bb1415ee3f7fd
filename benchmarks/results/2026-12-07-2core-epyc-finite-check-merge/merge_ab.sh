# merge of the 1.8B shape, the code before (131feab, worktree) and after (d5c3d8b) the finite-check change, alternating
for r in 1 2; do
 for v in old new; do
  if [ $v = old ]; then src=/work/wt/test-main; else src=/work/main; fi
  rm -rf /tmp/s18-m
  s=$(date +%s.%N)
  (cd /tmp && PYTHONPATH=$src OMP_NUM_THREADS=2 /work/main/.venv/bin/python -m tangquant --json merge --model /tmp/s18 --adapter /tmp/s18-lora --output /tmp/s18-m > /tmp/exp/merge-$v-$r.json 2>/dev/null)
  e=$(date +%s.%N)
  echo "{\"code\": \"$v\", \"round\": $r, \"wall_s\": $(echo "$e - $s" | bc)}"
 done
done
