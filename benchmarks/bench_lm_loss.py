"""Publishes the LM-loss table: BERT-base MLM (32x512 tokens, 15% labelled, H=768, V=30522),
GPT-2 (16k tokens, H=768, V=50257) and a large vocabulary (16k tokens, H=4096, V=128256),
bf16, one loss step forward + backward, against every peer installed.

    python benchmarks/bench_lm_loss.py --out benchmarks/results/lm_loss-<device>.json
"""
import sys

from fusedlm.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "lm_loss", "--case", "bert-mlm", "gpt2", "large-vocab",
                   "--dtype", "bf16", *sys.argv[1:]]))
