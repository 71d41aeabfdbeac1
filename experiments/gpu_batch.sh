#!/usr/bin/env bash
# The accuracy experiments of issues 5 and 6 on a GPU machine without internet, in one command.
# The default model, the task files and the Wikipedia text travel as two carried halves
# (.gpukit_a, copied to /root/sqkit by an earlier call, and .gpukit_b): see experiments/README.md.
# Rows already measured travel in .gpukit_b/seed (run folders without weights) and are skipped.
# Call it again while the machine is still warm and it goes on with the rows left.
# Results: $OUT/paper.tgz (run folders without the weights, and the report).
set -u
bash experiments/gpukit_setup.sh || exit 1
export SPARSEQUANT_CACHE=/root/sqcache PYTHONPATH=src TQDM_DISABLE=1
nvidia-smi -L
mkdir -p /tmp/paper
[ -d .gpukit_b/seed ] && cp -rn .gpukit_b/seed/* /tmp/paper/
D=${DEADLINE_S:-400}
timeout $((D + 160)) python experiments/paper_table.py --out /tmp/paper --device cuda --rows ${ROWS:-all} --keep-going \
    --deadline-s $D 2>&1 | tr '\r' '\n' | grep -v "it/s\]\|s/it\]\|req/s\]\|^\s*$" | tail -60
tar czf $OUT/paper.tgz --exclude=model.safetensors -C /tmp paper
ls -la $OUT
