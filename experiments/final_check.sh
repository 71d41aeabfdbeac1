# Session 5 GPU check of the tree: the GPU tests of the kernels and the runtime, then the end-to-end
# numbers (issue #7) with the skinny mma.sp kernel dispatched at 1-5 tokens.
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.sqbuild} PYTHONPATH=$PWD/src
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 200 python -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels_skinny.py tests/test_fuse.py \
  tests/test_kernels_decode_mma.py tests/test_kernels.py tests/test_runtime_load.py tests/test_runtime_compile.py \
  tests/test_gpu_pipeline.py 2>&1 | tail -6
timeout 330 python benchmarks/bench_e2e.py --layers 32 --batch 1,32 --prompt-len 128 --embed-int8 --no-hf \
  --prefill-only-len 2048 --prefill-only-batch 1 --budget-s 200 --out $OUT/e2e 2>&1 | tail -40
