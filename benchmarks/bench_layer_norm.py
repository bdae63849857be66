"""Publishes the layer-norm table: every backend and peer, forward and backward, bf16 and
fp32, 16384 and 65536 rows x N in {768, 1024, 2048, 4096, 8192}.

    python benchmarks/bench_layer_norm.py --out benchmarks/results/layer_norm-<device>.json
"""
import sys

from fusedlm.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    sys.exit(main(["bench", "layer_norm", "--rows", "16384", "65536", *args]))
