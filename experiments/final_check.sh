# Session 6 GPU check of the tree: the GPU tests of the kernels and the runtime, then the end-to-end
# numbers (issue #7): skinny mma.sp kernel at 1-5 tokens, split-KV Triton attention for one query
# token where preferred, int8 input embedding and int8 LM head on the compressed engines.
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.sqbuild} PYTHONPATH=$PWD/src
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 220 python -m pytest -q -m gpu -p no:cacheprovider tests/test_attention_decode.py tests/test_kernels_w8a16.py \
  tests/test_int8_linear.py tests/test_kernels_skinny.py tests/test_fuse.py tests/test_kernels_decode_mma.py \
  tests/test_kernels.py tests/test_runtime_load.py tests/test_runtime_compile.py tests/test_gpu_pipeline.py 2>&1 | tail -6
timeout 350 python benchmarks/bench_e2e.py --layers 32 --batch 1,32 --prompt-len 128 --embed-int8 --head-int8 --no-hf \
  --prefill-only-len 2048 --prefill-only-batch 1 --budget-s 220 --out $OUT/e2e 2>&1 | tail -40
