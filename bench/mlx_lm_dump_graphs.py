#!/usr/bin/env python3
# Dumps the CUDA graphs of a few mlx-lm greedy decode steps (MLX_SAVE_CUDA_GRAPHS_DOT_FILE must
# be set): python dump_mlx_lm.py MODEL_DIR PROMPT_TOKENS GEN
import sys
import mlx.core as mx
from mlx_lm import load
from mlx_lm.generate import generate_step
model, _ = load(sys.argv[1])
prompt = mx.array([(i * 7919) % 1000 + 10 for i in range(int(sys.argv[2]))])
for _ in generate_step(prompt, model, max_tokens=int(sys.argv[3])):
    pass
print("mlx-lm dump done")
