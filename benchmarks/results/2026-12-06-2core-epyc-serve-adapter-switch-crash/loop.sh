#!/bin/bash
# loop.sh N TANG RS CHOICES MODE : N runs of 200 streams; prints crashes
n=$1; a=$2; b=$3; ch=$4; mode=${5:-schema}; c=0
for s in $(seq 1 $n); do
  out=$(cd ${REPO:-/work/main} && PYTHONPATH=${REPO:-/work/main} timeout 120 /work/main/.venv/bin/python /tmp/crash/repro.py /tmp/crash/ir 200 $s $mode $a $b $ch 2>/dev/null | tail -1)
  echo "$out" | grep -q "^ok" || c=$((c+1))
done
echo "$ch $mode a=$(basename $a) b=$(basename $b): crashes $c / $n"
