#!/usr/bin/env bash
# CPU seconds each process of one serve_load run uses (user + system, all its threads, from /proc/PID/stat)
# over SECONDS_TO_SAMPLE (default 20) of the served phase's measured window, then of the engine alone's.
# Run serve_load with --interleave 1 (the app stays up, idle, while the engine alone runs), e.g.
#
#   benchmarks/served_cpu.sh OUTDIR --local benchmarks/serve_sim.yaml --interleave 1 ...
#
# Every process is one of this run's serve_load process tree (other Ray clusters may run on the machine).
set -euo pipefail
cd "$(dirname "$0")/.."
out=$1; shift
mkdir -p "$out"
py=${PYTHON:-.venv/bin/python}
secs=${SECONDS_TO_SAMPLE:-20}
$py benchmarks/serve_load.py "$@" > "$out/serve_load.log" 2>&1 &
bench=$!
trap 'kill "$bench" 2>/dev/null || true' INT TERM
descendants() { local p; for p in $(ps -o pid= --ppid "$1"); do echo "$p"; descendants "$p"; done; }
ticks() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }  # the comm field has no spaces here
name() { tr '\0' ' ' < "/proc/$1/cmdline" 2>/dev/null | cut -c1-90; }
window() {  # $1: the phase's label in serve_load's progress
  until grep -q "$1.*phase=measured" "$out/serve_load.log" 2>/dev/null; do
    kill -0 "$bench" 2>/dev/null || { echo "serve_load ended before '$1'"; exit 1; }
    sleep 0.5
  done
  local pids=("$bench" $(descendants "$bench")) before=() p i total=0
  for p in "${pids[@]}"; do before+=("$(ticks "$p")"); done
  sleep "$secs"
  echo "== $1: CPU seconds over $secs s (load average $(cut -d' ' -f1 /proc/loadavg) at the end)"
  for i in "${!pids[@]}"; do
    p=${pids[$i]}; d=$(( $(ticks "$p") - ${before[$i]} ))
    total=$((total + d))
    [ "$d" -ge 5 ] && printf "%7.2f  %s %s\n" "$(echo "$d / 100" | bc -l)" "$p" "$(name "$p")"
  done
  printf "%7.2f  all of the run's processes\n" "$(echo "$total / 100" | bc -l)"
}
{ window "served: "; window "engine alone: "; } | tee "$out/cpu.txt"
wait "$bench"
