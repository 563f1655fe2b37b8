#!/usr/bin/env bash
# One call on a lent GPU machine: build the package with the CUDA extension for that GPU, run the GPU tests
# with Triton compiled for real (not the interpreter), then the GPU benchmarks. Logs and JSON go to $OUT
# (or ./gpu-out). Uses the machine's own python3, torch and triton; installs nothing from the network.
#
#   bash benchmarks/gpu_session.sh [build] [tests] [suite] [profile] [generate] [bench SUITE...]
#
# With no arguments: build, tests, bench mxfp4_dequant fp8_dequant overlay_moe.
set -uo pipefail
OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(build tests bench mxfp4_dequant fp8_dequant overlay_moe)

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, \
'transformers', transformers.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"

mode=""
for s in "${steps[@]}"; do
  case "$s" in
    build)
      start=$(date +%s)
      LAZARUS_CUDA=ON CMAKE_BUILD_PARALLEL_LEVEL=16 \
        python3 -m pip install --no-build-isolation --no-deps --no-index -e . \
          -Ccmake.define.LAZARUS_CUDA_ARCHITECTURES=90 >"$OUT/build.log" 2>&1 \
        || { tail -50 "$OUT/build.log"; echo "BUILD FAILED"; exit 1; }
      echo "build: $(( $(date +%s) - start )) s"
      python3 -c "import lazarus_core._C_cuda as c; print('cuda ext:', c.device_status())" ;;
    tests) mode="" ;
      TRITON_INTERPRET=0 python3 -m pytest -q -p no:cacheprovider tests/gpu 2>&1 | tee "$OUT/tests_gpu.log" | tail -25 ;;
    suite) mode="" ;
      # The whole suite as CI runs it (Triton in the interpreter), on this machine's library versions.
      python3 -m pytest -q -p no:cacheprovider -x -n 8 2>&1 | tee "$OUT/tests_all.log" | tail -25 ;;
    bench) mode="bench" ;;
    generate) mode="" ;
      # End to end on the GPU: the built-in upcycled model, original vs its overlay on each GPU backend.
      lazarus introspect moe-expert moe-overlay-compress -m demo:upcycled --energy 0.99 --out "${TMPDIR:-/tmp}/lazarus-ov-upcycled" \
        --no-progress >"$OUT/compress.log" 2>&1 || { tail -20 "$OUT/compress.log"; exit 1; }
      for run in "" "--overlay ${TMPDIR:-/tmp}/lazarus-ov-upcycled --backend cuda" "--overlay ${TMPDIR:-/tmp}/lazarus-ov-upcycled --backend triton"; do
        # shellcheck disable=SC2086
        lazarus generate -m demo:upcycled -p "def main():" --max-new-tokens 64 --device cuda $run 2>&1 | tail -2
      done ;;
    profile) mode="" ;
      python3 -m benchmarks.profile_overlay_gpu --tokens 1 16 256 --backends cuda triton >"$OUT/profile.log" 2>&1
      grep "===" "$OUT/profile.log" ;;
    *)
      if [ "$mode" = "bench" ]; then
        python3 -m benchmarks "$s" --out "$OUT" 2>&1 | tee "$OUT/bench_$s.log"
      else
        TRITON_INTERPRET=0 python3 -m pytest -q -p no:cacheprovider "$s" 2>&1 | tee -a "$OUT/tests_extra.log" | tail -25
      fi ;;
  esac
done
