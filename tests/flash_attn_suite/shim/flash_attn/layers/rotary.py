"""flash_attn.layers.rotary: only the KV-cache tests use it, and fusedlm has no KV cache."""


def apply_rotary_emb(*args, **kwargs):
    raise ValueError("apply_rotary_emb: fusedlm has no rotary kernel (its KV-cache tests are "
                     "out of scope)")
