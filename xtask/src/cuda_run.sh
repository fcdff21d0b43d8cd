#!/usr/bin/env bash
# The hybrid face over CUDA, on the lent GPU machine (made by `cargo xtask cuda-bundle`; see
# docs/architecture.md). Builds llama.cpp with GGML_CUDA=ON, generates random Qwen3 models and writes
# $OUT/report.md and $OUT/report.json.
#
# One device call may run 10 minutes, and the build alone can take most of that, so the script is
# resumable: each step leaves a marker under $WORK when it is done, stops starting steps once
# DEADLINE seconds (default 540) have passed, and the next call (on the same, still warm machine)
# carries on where it stopped. Every call's report holds all steps done so far.
set -uo pipefail
B=$(cd "$(dirname "$0")" && pwd)
OUT=${OUT:-$B/out}
W=${WORK:-/tmp/ggml-coreml-cuda}
DEADLINE=${DEADLINE:-540}
mkdir -p "$OUT" "$W/rep"
# REDO="21-small-always 80-conformance": run those steps again (a new library on a warm machine);
# ONLY="...": run just those steps (see begin). MODES="split-low split": the policy-always step runs
# only those modes (default: always split split-low split-auto).
for s in ${REDO:-}; do rm -f "$W/rep/$s.done"; done
exec > >(tee -a "$OUT/log.txt") 2>&1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
T0=$(date +%s)
elapsed() { echo $(( $(date +%s) - T0 )); }
# cap N: N, or the seconds left before the deadline if fewer.
cap() { local left=$(( DEADLINE - $(elapsed) )); (( left < $1 )) && echo "$left" || echo "$1"; }
STEP=none
note() { echo "- $*" | tee -a "$W/rep/$STEP.md"; }
kv() { echo "  \"$1\": $2," >> "$W/rep/$STEP.json"; }
# begin NAME NEED: false (skip) when the step is done, or when fewer than NEED seconds are left.
begin() {
  STEP=$1
  [ -f "$W/rep/$1.done" ] && return 1
  # ONLY="21-small-always 31-wide-always": just those steps (and the build and models they need).
  if [ -n "${ONLY:-}" ] && [[ " 00-build 10-models $ONLY " != *" $1 "* ]]; then return 1; fi
  if (( DEADLINE - $(elapsed) < $2 )); then
    echo "step $1 needs ~$2 s; stopping here: call run.sh again on the same machine to go on"
    finish; exit 3
  fi
  rm -f "$W/rep/$1.md" "$W/rep/$1.json"; echo "== step $1 at $(elapsed) s"; return 0
}
done_step() { touch "$W/rep/$STEP.done"; }
finish() {
  { echo "# Hybrid face over CUDA ($(date -u +%FT%TZ))"; cat "$W"/rep/*.md 2>/dev/null; } > "$OUT/report.md"
  { echo "{"; cat "$W"/rep/*.json 2>/dev/null; echo "  \"complete\": $([ -f "$W/rep/90-two-models.done" ] && echo true || echo false)"; echo "}"; } > "$OUT/report.json"
  cp "$W"/*.stats.json "$OUT/" 2>/dev/null || true
}

nvidia-smi -L || true
NJ=$(nproc)
[ -d "$W/site" ] || python3 -m pip install -q --no-index --no-deps --target "$W/site" "$B"/whl/*.whl
export PYTHONPATH="$W/site"
BIN=$W/build/bin

# 1. llama.cpp with CUDA for sm_90 only, flash-attention kernels left out (both sides run -fa off: the
#    same graph for stock and ours). Ninja resumes a build cut off by the deadline.
if begin 00-build 60; then
  [ -d "$W/llama.cpp" ] || tar xzf "$B/llama.cpp.tgz" -C "$W"
  [ -f "$W/build/build.ninja" ] || cmake -S "$W/llama.cpp" -B "$W/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DGGML_CUDA=ON -DGGML_CUDA_FA=OFF -DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=OFF -DBUILD_SHARED_LIBS=ON \
    -DGGML_NATIVE=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_SERVER=OFF -DCMAKE_CUDA_ARCHITECTURES=90 >/dev/null
  timeout "$(cap 600)" cmake --build "$W/build" -j"$NJ" --target llama-completion llama-perplexity llama-bench \
    test-backend-ops llama-quantize > "$W/build.log" 2>&1
  if [ -x "$BIN/test-backend-ops" ] && [ -x "$BIN/llama-bench" ] && [ -x "$BIN/llama-quantize" ]; then
    note "llama.cpp built with CUDA (sm_90, -DGGML_CUDA_FA=OFF) on $NJ cores"; done_step
  else
    tail -5 "$W/build.log"; echo "build not finished at $(elapsed) s"; finish; exit 3
  fi
fi
LIB=$B/libggml-coreml.so
# `$OURS VAR=value... command`: runs command with our backend loaded and the hybrid face over CUDA0.
OURS="env GGML_BACKEND_PATH=$LIB GGML_COREML_HYBRID=CUDA0"
export TWO_MODELS_BACKEND_DIR=$BIN

# 2. Models: qwen3-tiny-shaped (small, small-b) and a wider one, all Q8_0.
gen() { # name args...
  local n=$1; shift
  [ -f "$W/$n-Q8_0.gguf" ] && return
  python3 "$B/gen_qwen3_tiny.py" --vocab "$W/llama.cpp/models/ggml-vocab-qwen2.gguf" --out "$W/$n-F16.gguf" "$@" \
    && "$BIN/llama-quantize" "$W/$n-F16.gguf" "$W/$n-Q8_0.gguf" Q8_0 >/dev/null 2>&1
}
if begin 10-models 60; then
  gen small --seed 0
  gen wide --seed 1 --layers 4 --hidden 1024 --ff 3072 --heads 8 --kv-heads 4 --head-dim 128
  gen small-b --seed 2
  if [ -f "$W/small-Q8_0.gguf" ] && [ -f "$W/wide-Q8_0.gguf" ] && [ -f "$W/small-b-Q8_0.gguf" ]; then
    note "models generated"; done_step; else note "model generation FAILED"; fi
fi
PROMPT="The quick brown fox jumps over the lazy dog because"

i=20
for M in small wide; do
  MODEL=$W/$M-Q8_0.gguf
  # 3. Policy off: bit-identical to stock CUDA.
  if begin "$i-$M-off" 60; then
    timeout "$(cap 120)" "$BIN/llama-completion" -m "$MODEL" -p "$PROMPT" -n 32 --temp 0 -no-cnv -ngl 99 -fa off \
      2>/dev/null > "$W/$M.stock.txt"
    timeout "$(cap 120)" $OURS GGML_COREML_POLICY=off "$BIN/llama-completion" -m "$MODEL" -p "$PROMPT" -n 32 \
      --temp 0 -no-cnv -ngl 99 -fa off --device CoreML-CUDA0 2>/dev/null > "$W/$M.off.txt"
    # CUDA graphs: does the wrapper leave ggml-cuda's graph reuse as stock has it?
    timeout "$(cap 60)" "$BIN/llama-completion" -m "$MODEL" -p "$PROMPT" -n 64 --temp 0 -no-cnv -ngl 99 -fa off \
      -v > /dev/null 2> "$W/$M.stock.err"
    timeout "$(cap 60)" $OURS "$BIN/llama-completion" -m "$MODEL" -p "$PROMPT" -n 64 --temp 0 -no-cnv -ngl 99 \
      -fa off -v --device CoreML-CUDA0 > /dev/null 2> "$W/$M.default.err"
    note "$M: ggml-cuda log lines with 'graph' (stock / ours, 64 tokens): $(grep -ci "cuda graph" "$W/$M.stock.err") / $(grep -ci "cuda graph" "$W/$M.default.err")"
    if [ -s "$W/$M.stock.txt" ] && cmp -s "$W/$M.stock.txt" "$W/$M.off.txt"; then
      note "$M: policy off bit-identical to stock CUDA (32 greedy tokens)"; kv "${M}_off_identical" true
    else note "$M: policy off DIFFERS from stock (or did not run)"; kv "${M}_off_identical" false; fi
    done_step
  fi
  # 4. Policy always: KLD against stock CUDA, and the copies per offloaded node; then the ANE+GPU split.
  if begin "$((i + 1))-$M-always" 150; then
    timeout "$(cap 200)" "$BIN/llama-perplexity" -m "$MODEL" -f "$B/text.txt" -c 128 --chunks 8 -ngl 99 -fa off \
      --kl-divergence-base "$W/$M.kld" >/dev/null 2>&1
    # split-low: the executor takes the fewest rows (32), so that its part (the reference executor on
    # the CPU) is about as long as the GPU's: the one setting where overlap shows on this machine.
    for mode in ${MODES:-always split split-low split-auto}; do
      case $mode in
        always) extra=() ;;
        split) extra=(GGML_COREML_SPLIT=0.5 GGML_COREML_SPLIT_PROFILE=1) ;;
        split-low) extra=(GGML_COREML_SPLIT=0.01 GGML_COREML_SPLIT_PROFILE=1) ;;
        split-auto) extra=(GGML_COREML_SPLIT=auto GGML_COREML_SPLIT_PROFILE=1) ;;
      esac
      timeout "$(cap 300)" env GGML_COREML_POLICY=always "${extra[@]}" GGML_COREML_STATS_FILE="$W/$M.$mode.stats.json" \
        GGML_BACKEND_PATH=$LIB GGML_COREML_HYBRID=CUDA0 "$BIN/llama-perplexity" -m "$MODEL" -c 128 --chunks 8 -ngl 99 \
        -fa off --device CoreML-CUDA0 --kl-divergence-base "$W/$M.kld" --kl-divergence > "$W/$M.$mode.txt" 2>&1
      KLD=$(grep -E "^Mean +KLD:" "$W/$M.$mode.txt" | awk '{print $3}')
      TOP=$(grep -E "^Same top p:" "$W/$M.$mode.txt" | awk '{print $4, $5, $6}')
      note "$M: policy $mode: mean KLD ${KLD:-n/a}, same top-1 ${TOP:-n/a}; stats $(python3 -c '
import json, sys
try:
    s = json.load(open(sys.argv[1]))
    print(json.dumps({k: s[k] for k in ("ane_ops", "ane_ms", "host_ops", "faults", "split_nodes", "transfers", "split_profile", "split_share") if k in s})[:700])
except Exception as e:
    print("n/a", e)' "$W/$M.$mode.stats.json")"
      kv "${M}_${mode}_kld" "\"${KLD:-n/a}\""
    done
    done_step
  fi
  # 5. Default policy: pp512 / tg128, stock vs ours (and ours handing every graph on unexamined,
  #    which separates the wrapper's cost from the router's walk), alternating, best of 4 rounds.
  if begin "$((i + 2))-$M-bench" 150; then
    for r in 1 2 3 4; do
      timeout "$(cap 100)" "$BIN/llama-bench" -m "$MODEL" -p 512 -n 128 -ngl 99 -fa 0 -r 5 -o json \
        > "$W/$M.bench.stock.$r.json" 2>/dev/null
      timeout "$(cap 100)" $OURS GGML_COREML_STATS_FILE="$W/$M.default.stats.json" "$BIN/llama-bench" -m "$MODEL" \
        -p 512 -n 128 -ngl 99 -fa 0 -r 5 -dev CoreML-CUDA0 -o json > "$W/$M.bench.ours.$r.json" 2>/dev/null
      timeout "$(cap 100)" $OURS GGML_COREML_HYBRID_PASSTHROUGH=1 "$BIN/llama-bench" -m "$MODEL" \
        -p 512 -n 128 -ngl 99 -fa 0 -r 5 -dev CoreML-CUDA0 -o json > "$W/$M.bench.pass.$r.json" 2>/dev/null
    done
    python3 - "$W" "$M" <<'PY' | tee -a "$W/rep/$STEP.md"
import json, sys, glob
w, m = sys.argv[1], sys.argv[2]
def best(side, n_prompt):
    v = []
    for f in glob.glob(f"{w}/{m}.bench.{side}.*.json"):
        try:
            v += [r["avg_ts"] for r in json.load(open(f)) if r["n_prompt"] == n_prompt and (r["n_gen"] == 0) == (n_prompt > 0)]
        except Exception:
            pass
    return max(v) if v else float("nan")
try:
    router = json.load(open(f"{w}/{m}.default.stats.json")).get("router")
except Exception as e:
    router = f"n/a ({e})"
for label, p in (("pp512", 512), ("tg128", 0)):
    s, o, h = best("stock", p), best("ours", p), best("pass", p)
    print(f"- {m}: default policy {label}: stock {s:.1f} t/s, ours {o:.1f} t/s (ratio {o / s:.3f}), "
          f"ours handing graphs on unexamined {h:.1f} t/s (ratio {h / s:.3f}); "
          f"per token: ours {1e6 / o - 1e6 / s:+.1f} us, unexamined {1e6 / h - 1e6 / s:+.1f} us")
print(f"- {m}: router walk (default policy): {router}")
PY
    done_step
  fi
  i=$((i + 10))
done

# 6. Hybrid conformance on CoreML-CUDA0, every test buffer marked WEIGHTS (freed and reused between cases).
if begin 80-conformance 200; then
  timeout "$(cap 500)" env GGML_COREML_POLICY=always GGML_COREML_HYBRID_MARK_WEIGHTS=1 \
    GGML_COREML_STATS_FILE="$W/conformance.stats.json" GGML_BACKEND_PATH=$LIB GGML_COREML_HYBRID=CUDA0 \
    "$BIN/test-backend-ops" test -b CoreML-CUDA0 -o MUL_MAT > "$W/conformance.txt" 2>&1
  RC=$?
  OK=$(grep -cE "^ *MUL_MAT.*OK" "$W/conformance.txt"); FAIL=$(grep -cE "^ *MUL_MAT.*FAIL" "$W/conformance.txt")
  note "hybrid conformance on CoreML-CUDA0 (rc $RC): $OK passed, $FAIL failed; $(grep -E "tests passed|Backend.*OK|FAIL" "$W/conformance.txt" | tail -2 | tr '\n' ' '); stats $(python3 -c '
import json, sys
try:
    s = json.load(open(sys.argv[1]))
    print(json.dumps({k: s[k] for k in ("ane_ops", "host_ops", "faults", "transfers") if k in s})[:500])
except Exception as e:
    print("n/a", e)' "$W/conformance.stats.json")"
  grep -E "FAIL" "$W/conformance.txt" | head -20 > "$OUT/conformance-failures.txt"
  kv conformance_passed "$OK"; kv conformance_failed "$FAIL"
  [ "$RC" -ne 124 ] && done_step
fi

# 7. Two models in one process (A, B, A) against each alone.
if begin 90-two-models 60; then
  A=$W/small-Q8_0.gguf; Bm=$W/small-b-Q8_0.gguf
  cc -O1 -o "$W/two_models" "$B/two_models.c" -I"$W/llama.cpp/include" -I"$W/llama.cpp/ggml/include" -L"$BIN" \
    -lllama -lggml -lggml-base -Wl,-rpath,"$BIN" \
    && $OURS GGML_COREML_POLICY=always timeout 120 "$W/two_models" CoreML-CUDA0 99 "$W/seq" "$A" "$Bm" "$A" > "$W/seq.txt" 2>/dev/null \
    && $OURS GGML_COREML_POLICY=always timeout 60 "$W/two_models" CoreML-CUDA0 99 "$W/a" "$A" > /dev/null 2>&1 \
    && $OURS GGML_COREML_POLICY=always timeout 60 "$W/two_models" CoreML-CUDA0 99 "$W/b" "$Bm" > /dev/null 2>&1
  if cmp -s "$W/seq.0.logits" "$W/a.0.logits" && cmp -s "$W/seq.1.logits" "$W/b.0.logits" && cmp -s "$W/seq.2.logits" "$W/a.0.logits"; then
    note "two models (A, B, A) in one process on CoreML-CUDA0: each bit-identical to the model alone"; kv two_models true
  else note "two models in one process: DIFFER from each alone (or did not run)"; kv two_models false; fi
  done_step
fi
finish
echo "all steps done"
