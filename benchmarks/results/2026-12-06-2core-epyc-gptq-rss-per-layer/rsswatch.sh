#!/bin/bash
# rsswatch.sh LOG CMD...: run CMD, sample its VmRSS/RssAnon/RssFile every 5 s
log=$1; shift
"$@" > $log.out 2>&1 & pid=$!
while kill -0 $pid 2>/dev/null; do
  c=$(pgrep -P $pid | head -1); p=${c:-$pid}
  echo "$(date -u +%H:%M:%S) $(grep -E 'VmRSS|RssAnon|RssFile' /proc/$p/status 2>/dev/null | awk '{printf "%s %s ", $1, $2}') $(tr '\r' '\n' < $log.out | grep 'layer by layer' | tail -1 | cut -c1-40)" >> $log
  sleep 5
done
