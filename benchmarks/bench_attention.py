"""Publishes the attention table: bf16, head dim 64 and 128, seq 512..8192 at 16k tokens a
batch, causal and not, forward and forward+backward, against every SDPA backend,
flex_attention and flash-attn when installed; plus a padded BERT batch (32 x 512, ~50% pad).

    python benchmarks/bench_attention.py --out benchmarks/results/attention-<device>.json
"""
import sys

from fusedlm.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "attention", "--dtype", "bf16", *sys.argv[1:]]))
