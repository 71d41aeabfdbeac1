# Session 4 final GPU check of the merged tree: GPU tests not yet run on it, the 1-token dispatch
# comparison (decode over the mma.sp layout vs the second tiled kernel) and the end-to-end numbers.
export TORCH_EXTENSIONS_DIR=$PWD/.sqbuild PYTHONPATH=$PWD/src
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 200 python -m pytest -q -m gpu -p no:cacheprovider tests/test_fuse.py tests/test_kernels_w8a8.py \
  tests/test_kernels_decode_mma.py tests/test_kernels.py tests/test_runtime_load.py tests/test_runtime_compile.py \
  tests/test_gpu_pipeline.py 2>&1 | tail -6
timeout 90 python benchmarks/bench_decode_mma.py --tokens 1 --no-sweep --out $OUT/decode 2>&1 | tail -22
timeout 330 python benchmarks/bench_e2e.py --layers 32 --batch 1,32 --prompt-len 128 --embed-int8 --no-hf \
  --prefill-only-len 2048 --prefill-only-batch 1 --budget-s 200 --out $OUT/e2e 2>&1 | tail -40
