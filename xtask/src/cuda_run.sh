#!/usr/bin/env bash
# The hybrid face over CUDA in one go, on the lent GPU machine (made by `cargo xtask cuda-bundle`; see
# docs/architecture.md). Builds llama.cpp with GGML_CUDA=ON, generates two random Qwen3 models and
# writes $OUT/report.md and $OUT/report.json. Every step is bounded; a failing step is reported and the
# next one runs.
set -uo pipefail
B=$(cd "$(dirname "$0")" && pwd)
OUT=${OUT:-$B/out}
W=${WORK:-/tmp/ggml-coreml-cuda}
mkdir -p "$OUT" "$W"
exec > >(tee "$OUT/log.txt") 2>&1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
T0=$(date +%s)
REPORT="$OUT/report.md"
JSON="$OUT/report.json"
echo "# Hybrid face over CUDA ($(date -u +%FT%TZ))" > "$REPORT"
echo "{" > "$JSON"
note() { echo "- $*" | tee -a "$REPORT"; }
kv() { echo "  \"$1\": $2," >> "$JSON"; }
elapsed() { echo $(( $(date +%s) - T0 )); }

nvidia-smi -L || true
NJ=$(nproc)
python3 -m pip install -q --no-index --no-deps --target "$W/site" "$B"/whl/*.whl && export PYTHONPATH="$W/site"

# 1. llama.cpp with CUDA (flash attention off on both sides: the same graph for stock and ours).
if [ ! -x "$W/build/bin/test-backend-ops" ]; then
  tar xzf "$B/llama.cpp.tgz" -C "$W"
  cmake -S "$W/llama.cpp" -B "$W/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=ON \
    -DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=OFF -DBUILD_SHARED_LIBS=ON -DGGML_NATIVE=OFF \
    -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_SERVER=OFF -DCMAKE_CUDA_ARCHITECTURES=90 >/dev/null \
    && cmake --build "$W/build" -j"$NJ" --target llama-completion llama-perplexity llama-bench \
       test-backend-ops llama-quantize >/dev/null
fi
BIN=$W/build/bin
[ -x "$BIN/test-backend-ops" ] || { note "llama.cpp CUDA build FAILED"; echo "}" >> "$JSON"; exit 1; }
note "llama.cpp built with CUDA in $(elapsed) s"
LIB=$B/libggml-coreml.so
ours() { GGML_BACKEND_PATH=$LIB GGML_COREML_HYBRID=CUDA0 "$@"; }

# 2. Models: qwen3-tiny (80 MiB F16) and a wider one, both Q8_0.
gen() { # name args...
  local n=$1; shift
  [ -f "$W/$n-Q8_0.gguf" ] && return
  python3 "$B/gen_qwen3_tiny.py" --vocab "$W/llama.cpp/models/ggml-vocab-qwen2.gguf" --out "$W/$n-F16.gguf" "$@" \
    && "$BIN/llama-quantize" "$W/$n-F16.gguf" "$W/$n-Q8_0.gguf" Q8_0 >/dev/null 2>&1
}
gen small --seed 0
gen wide --seed 1 --layers 4 --hidden 1024 --ff 3072 --heads 8 --kv-heads 4 --head-dim 128
gen small-b --seed 2
note "models ready at $(elapsed) s"
PROMPT="The quick brown fox jumps over the lazy dog because"

for M in small wide; do
  MODEL=$W/$M-Q8_0.gguf
  # 3. Policy off: bit-identical to stock CUDA.
  timeout 120 "$BIN/llama-completion" -m "$MODEL" -p "$PROMPT" -n 32 --temp 0 -no-cnv -ngl 99 -fa off 2>/dev/null > "$W/$M.stock.txt"
  timeout 120 env GGML_COREML_POLICY=off ours "$BIN/llama-completion" -m "$MODEL" -p "$PROMPT" -n 32 --temp 0 -no-cnv \
    -ngl 99 -fa off --device CoreML-CUDA0 2>/dev/null > "$W/$M.off.txt"
  if cmp -s "$W/$M.stock.txt" "$W/$M.off.txt"; then note "$M: policy off bit-identical to stock"; kv "${M}_off_identical" true
  else note "$M: policy off DIFFERS from stock"; kv "${M}_off_identical" false; fi
  # 4. Policy always: KLD against stock, and the copies per offloaded node.
  timeout 300 "$BIN/llama-perplexity" -m "$MODEL" -f "$B/text.txt" -c 128 --chunks 8 -ngl 99 -fa off \
    --kl-divergence-base "$W/$M.kld" >/dev/null 2>&1
  timeout 300 env GGML_COREML_POLICY=always GGML_COREML_STATS_FILE="$OUT/$M.always.stats.json" ours \
    "$BIN/llama-perplexity" -m "$MODEL" -c 128 --chunks 8 -ngl 99 -fa off --device CoreML-CUDA0 \
    --kl-divergence-base "$W/$M.kld" --kl-divergence > "$W/$M.always.txt" 2>&1
  KLD=$(grep -E "^Mean +KLD:" "$W/$M.always.txt" | awk '{print $3}')
  note "$M: policy always mean KLD ${KLD:-n/a}; stats $(cat "$OUT/$M.always.stats.json" 2>/dev/null | head -c 600)"
  kv "${M}_always_kld" "\"${KLD:-n/a}\""
  # 5. Default policy: tg128 / pp512, stock vs ours, alternating.
  for r in 1 2; do
    timeout 200 "$BIN/llama-bench" -m "$MODEL" -p 512 -n 128 -ngl 99 -fa 0 -r 3 -o json > "$OUT/$M.bench.stock.$r.json" 2>/dev/null
    timeout 200 env ours "$BIN/llama-bench" -m "$MODEL" -p 512 -n 128 -ngl 99 -fa 0 -r 3 -dev CoreML-CUDA0 -o json \
      > "$OUT/$M.bench.ours.$r.json" 2>/dev/null
  done
  python3 - "$OUT" "$M" <<'PY' | tee -a "$REPORT"
import json, sys, glob
out, m = sys.argv[1], sys.argv[2]
def best(side, n_prompt):
    v = []
    for f in glob.glob(f"{out}/{m}.bench.{side}.*.json"):
        try:
            v += [r["avg_ts"] for r in json.load(open(f)) if r["n_prompt"] == n_prompt and (r["n_gen"] == 0) == (n_prompt > 0)]
        except Exception:
            pass
    return max(v) if v else float("nan")
for label, p in (("pp512", 512), ("tg128", 0)):
    s, o = best("stock", p), best("ours", p)
    print(f"- {m}: default policy {label}: stock {s:.1f} t/s, ours {o:.1f} t/s, ratio {o / s:.3f}")
PY
done

# 6. Hybrid conformance on CoreML-CUDA0, every test buffer marked WEIGHTS (freed and reused between cases).
timeout 540 env GGML_COREML_POLICY=always GGML_COREML_HYBRID_MARK_WEIGHTS=1 \
  GGML_COREML_STATS_FILE="$OUT/conformance.stats.json" ours "$BIN/test-backend-ops" test -b CoreML-CUDA0 -o MUL_MAT \
  > "$W/conformance.txt" 2>&1
OK=$(grep -cE "^ *MUL_MAT.*OK" "$W/conformance.txt"); FAIL=$(grep -cE "^ *MUL_MAT.*FAIL" "$W/conformance.txt")
note "hybrid conformance on CoreML-CUDA0: $OK passed, $FAIL failed; stats $(head -c 600 "$OUT/conformance.stats.json" 2>/dev/null)"
grep -E "FAIL" "$W/conformance.txt" | head -20 > "$OUT/conformance-failures.txt"
kv conformance_passed "$OK"; kv conformance_failed "$FAIL"

# 7. Two models in one process (A, B, A) against each alone.
cc -O1 -o "$W/two_models" "$B/two_models.c" -I"$W/llama.cpp/include" -I"$W/llama.cpp/ggml/include" -L"$BIN" \
  -lllama -lggml -lggml-base -Wl,-rpath,"$BIN" \
  && A=$W/small-Q8_0.gguf && Bm=$W/small-b-Q8_0.gguf \
  && env GGML_COREML_POLICY=always ours timeout 120 "$W/two_models" CoreML-CUDA0 99 "$W/seq" "$A" "$Bm" "$A" > "$W/seq.txt" 2>/dev/null \
  && env GGML_COREML_POLICY=always ours timeout 60 "$W/two_models" CoreML-CUDA0 99 "$W/a" "$A" > /dev/null 2>&1 \
  && env GGML_COREML_POLICY=always ours timeout 60 "$W/two_models" CoreML-CUDA0 99 "$W/b" "$Bm" > /dev/null 2>&1
if cmp -s "$W/seq.0.logits" "$W/a.0.logits" && cmp -s "$W/seq.1.logits" "$W/b.0.logits" && cmp -s "$W/seq.2.logits" "$W/a.0.logits"; then
  note "two models (A, B, A) in one process: each bit-identical to the model alone"; kv two_models true
else note "two models in one process: DIFFER from each alone (or did not run)"; kv two_models false; fi

kv seconds "$(elapsed)"
echo "  \"done\": true" >> "$JSON"; echo "}" >> "$JSON"
note "done in $(elapsed) s"
