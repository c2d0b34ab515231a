#!/usr/bin/env bash
# py-spy on the served path of one serve_load run (CPU, the simulator): the LLMServer replica (GIL holders,
# then every thread), its engine process (GIL holders, then every sample, waiting included) and the ingress, for
# SECONDS (default 20) once the served phase's measured window has begun.
#
#   benchmarks/pyspy_served.sh OUTDIR [serve_load.py arguments...]
#
# The processes are found under this run's own serve_load process tree, never by name alone (other Ray
# clusters may run on the same machine). The engine process is the replica's grandchild (the replica ->
# the multiprocessing fork server -> the engine). Summarise with benchmarks/pyspy_summary.py.
set -euo pipefail
cd "$(dirname "$0")/.."
out=$1; shift
mkdir -p "$out"
py=${PYTHON:-.venv/bin/python}
spy=${PYSPY:-.venv/bin/py-spy}
secs=${SECONDS_TO_SAMPLE:-20}
$py benchmarks/serve_load.py "$@" > "$out/serve_load.log" 2>&1 &
bench=$!
trap 'kill "$bench" 2>/dev/null || true' INT TERM
descendants() { local p; for p in $(ps -o pid= --ppid "$1"); do echo "$p"; descendants "$p"; done; }
cmd_of() { tr '\0' ' ' < "/proc/$1/cmdline" 2>/dev/null || true; }
until grep -q "served: .*phase=measured" "$out/serve_load.log" 2>/dev/null; do
  kill -0 "$bench" 2>/dev/null || { echo "serve_load ended before its served phase"; exit 1; }
  sleep 0.5
done
replica= ingress= engine=
for p in $(descendants "$bench"); do
  case "$(cmd_of "$p")" in
    *ServeReplica:swiftserve:LLMServer*) replica=$p ;;
    *ServeReplica:swiftserve:OpenAIIngress*) ingress=$p ;;
  esac
done
for p in $(descendants "$replica"); do  # the fork server's child: the engine process
  if [[ "$(cmd_of "$p")" == *multiprocessing.forkserver* && "$(ps -o ppid= -p "$p" | tr -d ' ')" != "$replica" ]]; then
    engine=$p
  fi
done
echo "serve_load $bench, replica $replica, engine process $engine, ingress $ingress" | tee "$out/pids.txt"
rec() { $spy record --pid "$1" --duration "$secs" --rate "$2" --format raw --threads --nonblocking -o "$out/$3.raw" "${@:4}" \
          > "$out/$3.spy.log" 2>&1 & }
rec "$replica" 100 replica_gil --gil
rec "$replica" 100 replica_all --idle
rec "$engine" 100 engine_all --idle
rec "$engine" 100 engine_gil --gil
rec "$ingress" 50 ingress
wait $(jobs -p | grep -v "^$bench$") 2>/dev/null || true
wait "$bench"
