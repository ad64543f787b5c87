#!/bin/bash
# What ran on the lent GPU machine, from the repository root: `bash bench/results/gpu-h100-2/device.sh STAGE...`.
# Outputs go under $OUT (the tool's return folder). Stages: setup, tests, b8 N, contexts, serve.
export PYTHONUNBUFFERED=1 PYTHONPATH=.
M=/tmp/m/SmolLM2-135M-Instruct.Q4_1.gguf
T0=$SECONDS
left() { echo $(( ${BUDGET:-570} - (SECONDS - T0) )); }
for stage in "$@"; do
  echo "=== $stage at +$((SECONDS - T0)) s, $(left) s left"
  case $stage in b8|contexts|serve) [ $(left) -ge ${MIN:-200} ] || { echo "skipped: too little time"; continue; } ;; esac
  case $stage in
  setup)
    # the GGUF travels in two halves, one per call (a call carries at most 64 MiB); joined once both are here
    mkdir -p /tmp/m; for f in .gpu/a/part00 .gpu/b/part01; do [ -f $f ] && cp $f /tmp/m/; done
    [ -f .gpu/sum ] && cp .gpu/sum /tmp/m/sum
    if [ ! -f $M ] && [ -f /tmp/m/part00 ] && [ -f /tmp/m/part01 ]; then
      cat /tmp/m/part00 /tmp/m/part01 > $M && (cd /tmp/m && sha256sum -c sum) || exit 1
    fi
    python3 -c "import gguf" 2>/dev/null || python3 -m pip install -q --no-index --no-deps .whl/gguf-*.whl || exit 1
    ls -l /tmp/m
    { nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; nproc; which python3
      python3 -c "import sys, torch, transformers, triton, gguf, accelerate; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'triton', triton.__version__, 'accelerate', accelerate.__version__)"
      python3 -m pip show gguf tabulate matplotlib 2>/dev/null | grep -E '^(Name|Version)'
      ls -l /usr/share/common-licenses/GPL-3 2>&1; git log --oneline -1 2>&1; } 2>&1 | tee $OUT/setup.log ;;
  tests)
    timeout 300 python3 -m pytest -q -x -rs tests/test_cuda.py 2>&1 | tee $OUT/test_cuda.log
    timeout 240 python3 -m pytest -q -rs tests/kernels -k "not test_kernel_matches_naive" 2>&1 | tee $OUT/kernels.log ;;
  b8)
    timeout $(left) python3 -m triattn_compile bench --model $M --dtype bfloat16 --batch 8 --methods sdpa compiled \
      --budgets 1024 --length ${N:-1500} --serve-cap-mib 0 --out $OUT/b8 2>&1 | tee $OUT/b8.log ;;
  contexts)
    timeout $(left) python3 -m triattn_compile bench --model $M --dtype bfloat16 --batch 8 --methods sdpa compiled \
      --budgets 1024 --length 0 --contexts 8000 --serve-cap-mib 0 --out $OUT/ctx 2>&1 | tee $OUT/ctx.log ;;
  serve)
    timeout $(left) python3 -m triattn_compile bench --model $M --dtype bfloat16 --methods sdpa --budgets ${SB:-256 1024 2048} \
      --length 0 --serve-cap-mib 1024 --serve-context 8000 --out $OUT/serve 2>&1 | tee $OUT/serve.log ;;
  esac
done
echo "=== done at +$((SECONDS - T0)) s"
