#!/usr/bin/env bash
# The accuracy experiments of issues 5 and 6 on a GPU machine without internet, in one command.
# The default model, the task files and the Wikipedia text travel as two carried halves
# (.gpukit_a, copied to /root/sqkit by an earlier call, and .gpukit_b): see experiments/README.md.
# Results: $OUT/paper.tgz (run folders without the weights, report, sensitivity).
set -u
bash experiments/gpukit_setup.sh || exit 1
export SPARSEQUANT_CACHE=/root/sqcache PYTHONPATH=src TQDM_DISABLE=1
nvidia-smi -L
timeout 420 python experiments/paper_table.py --out /tmp/paper --device cuda --rows all --keep-going \
    --deadline-s ${DEADLINE_S:-330} 2>&1 | grep -v "^\s*$" | tail -80
timeout 100 python -m sparsequant.cli sensitivity --recipe 2:4-w4a16-sparsegpt --out /tmp/paper/sensitivity \
    --units layer,type --target-sparsity 0.45 --write-recipe /tmp/paper/selective45.yaml --device cuda --dtype float32 2>&1 | tail -30
if [ -f /tmp/paper/selective45.yaml ]; then
  timeout 70 python experiments/paper_table.py --out /tmp/paper --device cuda --rows 24-w4-sparsegpt \
      --recipe-row selective45=/tmp/paper/selective45.yaml --keep-going 2>&1 | tail -30
fi
tar czf $OUT/paper.tgz --exclude=model.safetensors -C /tmp paper
ls -la $OUT
