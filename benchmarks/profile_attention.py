"""One forward and backward of fusedlm's attention on one backend, for a profiler to read:
    ncu --kernel-name regex:attention_fwd --launch-count 1 python3 benchmarks/profile_attention.py cuda
Arguments: backend [batch seq heads head_dim] (default: cuda 4 4096 16 128, bf16, not causal)."""
import sys

import torch

import fusedlm

backend = sys.argv[1] if len(sys.argv) > 1 else "cuda"
b, s, h, d = (int(x) for x in sys.argv[2:6]) if len(sys.argv) > 5 else (4, 4096, 16, 128)
q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
           for _ in range(3))
out = fusedlm.attention(q, k, v, backend=backend)
out.backward(torch.randn_like(out))
torch.cuda.synchronize()
print(f"{backend}: one forward and backward at batch {b}, seq {s}, heads {h}, head dim {d}")
