#!/usr/bin/env bash
# Everything that needs the H100, in one call of the device tool (one machine start):
#   GPU tests, the attention benchmark, the training benchmark and nanoGPT's shakespeare_char run.
# Results land in $OUT (or ./gpu_out). Prepare the wheels the GPU image lacks first, on this machine:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d .whl \
#       ml-collections==1.1.0 tensorboardX==2.6.5 tqdm==4.70.1
# and copy the nanoGPT data beside them (../shared does not travel; the copy is ignored, never committed):
#   echo /.data/ >> .git/info/exclude; mkdir -p .data; cp ../shared/data/tinyshakespeare.txt .data/
# then run it with carry=[".whl", ".data"]:  bash scripts/gpu_checks.sh [PART ...]
# PARTs, in the order they run: tests attn variants tiles passes dropout fixed train trainvariants sparsetrain
# gen shakespeare.
# Default: tests attn variants train gen shakespeare; "quick" = those but shakespeare. The device tool
# stops a command at 10 minutes, and on 2026-11-23 these took: tests 1-4 min, attn 4, variants 2+, passes 1,
# train 1, trainvariants 3, shakespeare 3, gen (GPT-3 Small, 1024 new tokens) over 2.5. Split them, e.g.
# "tests attn passes", then "train trainvariants shakespeare", then "sparsetrain gen".
set -uo pipefail
PARTS="${*:-tests attn variants train gen shakespeare}"
[ "$PARTS" = quick ] && PARTS="tests attn variants train gen"
for p in $PARTS; do
  case $p in tests|attn|variants|tiles|passes|dropout|fixed|train|trainvariants|sparsetrain|gen|shakespeare) ;;
    *) echo "error: unknown part '$p' (tests attn variants tiles passes dropout fixed train trainvariants sparsetrain gen" \
            "shakespeare quick)" >&2
       exit 2;; esac
done
OUT="${OUT:-$PWD/gpu_out}"; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD"
fi
SHAKESPEARE="${SHAKESPEARE:-.data/tinyshakespeare.txt}"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import jax; print(jax.__version__, jax.devices())" | tee -a "$OUT/gpu.txt"

want() { [[ " $PARTS " == *" $1 "* ]]; }
# The result line of one gpt_jax.bench_train run (ms/iter, p10, p90, tokens/s, TFLOP/s, MFU).
step_ms() { python3 -m gpt_jax.bench_train "$@" 2>&1 | grep -A1 "ms/iter" | tail -1; }
step() { echo; echo "=== $1 ($(date +%T))"; }

if want tests; then
step "GPU tests"
# The interpreter tests (tests/test_kernels_gpu_interpret.py) run on CPU in CI; here only what needs the GPU.
python3 -m pytest tests/test_kernels_gpu.py -q -m gpu 2>&1 | tee "$OUT/gpu_tests.txt" | tail -15
fi

if want attn; then
step "attention benchmark"
python3 -m kernels.bench --pattern local_strided --window 256 --stride 256 --seq 2048,8192,32768 \
    --tokens 32768 --heads 16 --head-dim 128 --block-k 64,128 --out "$OUT/attn" 2>&1 | tee "$OUT/attn_bench.txt"
fi

if want variants; then
step "our kernel's variants (ping-pong off, transposed strided pass)"
python3 -m kernels.bench --pattern local_strided --window 256 --stride 256 --seq 2048,32768 \
    --tokens 32768 --heads 16 --head-dim 128 --impls ours --variants default,no-pingpong,transposed \
    --out "$OUT/attn_variants" 2>&1 | tee "$OUT/attn_variants.txt"
fi

if want tiles; then
step "CTAs running 1, 2, 4, 8 tiles (kernels/NOTES.md: several tiles a CTA)"
python3 -m kernels.bench --pattern local_strided --window 256 --stride 256 --seq 2048,8192,32768 \
    --tokens 32768 --heads 16 --head-dim 128 --impls ours \
    --variants default,tiles-2,tiles-4,tiles-8,tiles-4-regs-240 \
    --out "$OUT/attn_tiles" 2>&1 | tee "$OUT/attn_tiles.txt"
fi

if want passes; then
step "our kernel's two passes alone at 32K (band against cuDNN's sliding window, strided)"
for pat in "local --window 256" "strided --stride 256"; do
  python3 -m kernels.bench --pattern $pat --seq 32768 --tokens 32768 --heads 16 --head-dim 128 \
      --impls ours,cudnn_band --block-k 64,128 2>&1 | grep -E "^(ours|cudnn)" | tee -a "$OUT/attn_passes.txt"
done
fi

if want dropout; then
step "attention dropout inside our kernel (kernels/dropout.py) against the same kernel without, cuDNN, the reference"
python3 -m kernels.bench --pattern dense --seq 256 --tokens 16384 --heads 6 --head-dim 64 \
    --impls ours,cudnn_dense,reference --dropout 0,0.2 --out "$OUT/attn_dropout" 2>&1 | tee "$OUT/attn_dropout.txt"
fi

if want fixed; then
step "fixed(128, 16), the Sparse Transformer's pattern: our kernel against the alternatives"
python3 -m kernels.bench --pattern fixed --block 128 --c 16 --seq 2048,8192,32768 --tokens 32768 --heads 16 \
    --head-dim 128 --impls ours,cudnn_dense,xla_mask,flex --out "$OUT/attn_fixed" 2>&1 | tee "$OUT/attn_fixed.txt"
fi

if want train; then
step "training benchmark (shakespeare_char, nanoGPT's config)"
python3 -m gpt_jax.bench_train --config experiments/shakespeare_char.py \
    --config.data.path=$SHAKESPEARE --iters 50 --warmup 10 --out "$OUT/bench_train.json" --profile /tmp/prof_train \
    2>&1 | tee "$OUT/bench_train.txt"
fi

if want trainvariants; then
step "training step variants: attention dropout in our kernel (auto) or in XLA, without dropout (cuDNN), plain Flax"
for v in "" "--config.attention.impl=xla" "--config.model.attn_dropout=0" \
         "--config.model.attn_dropout=0 --config.model.dropout=0"; do
  echo "${v:-as configured}: $(step_ms --config experiments/shakespeare_char.py \
      --config.data.path=$SHAKESPEARE --iters 30 --warmup 5 $v)" | tee -a "$OUT/train_variants.txt"
done
# The yardstick: the same shape as a minimal hand-written Flax step (no dropout; gpt_jax/bench_plain.py),
# with the embedding lookup in float32 (as gpt_jax does) and in bfloat16 (as Flax's nn.Embed(dtype=) does).
for v in "" "--lookup_in_compute_dtype"; do
  echo "plain Flax step ${v:-(float32 lookup)}: $(python3 -m gpt_jax.bench_plain --config experiments/shakespeare_char.py \
      --config.data.path=$SHAKESPEARE --iters 30 --warmup 5 $v 2>&1 | grep -A1 "ms/iter" | tail -1)" \
      | tee -a "$OUT/train_variants.txt"
done
fi

if want sparsetrain; then
step "GPT-3 Small sparse (context 2048) train step: our kernel in the model against masked XLA attention"
for impl in auto xla; do
  echo "attention.impl=$impl: $(step_ms --config experiments/gpt3_small_sparse.py --config.data.tokenizer=byte \
      --config.train.batch_size=8 --config.train.grad_accum=1 --config.attention.impl=$impl --iters 10 --warmup 3)" \
      | tee -a "$OUT/sparse_train.txt"
done
fi

if want gen; then
step "generation: cached vs uncached, GPT-3 Small shapes, random weights"
for cfg in gpt3_small gpt3_small_sparse; do
  python3 -m gpt_jax.bench_generate --config experiments/$cfg.py --batch 1,32 --new-tokens 1024 \
      --out "$OUT/gen_$cfg.json" 2>&1 | tee "$OUT/gen_$cfg.txt"
done
fi

if want shakespeare; then
  step "shakespeare_char, 5000 iterations (nanoGPT: best val 1.459)"
  python3 -m gpt_jax.train --config experiments/shakespeare_char.py --workdir /tmp/shakespeare \
      --config.data.path=$SHAKESPEARE > "$OUT/shakespeare_train.txt" 2>&1
  grep -E "val loss|resumed|model:|compiled" "$OUT/shakespeare_train.txt" | tail -30
  cp /tmp/shakespeare/metrics.jsonl "$OUT/shakespeare_metrics.jsonl"
fi
