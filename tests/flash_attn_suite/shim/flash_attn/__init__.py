"""`flash_attn` for running flash-attention's own test suite against fusedlm (never installed:
tests/flash_attn_suite/run.py puts this directory first on sys.path). Everything comes from
fusedlm.flash_attn_interface; what fusedlm lacks raises fusedlm's ValueError naming it."""
from fusedlm.flash_attn_interface import (flash_attn_func, flash_attn_kvpacked_func,  # noqa: F401
                                          flash_attn_qkvpacked_func, flash_attn_varlen_func,
                                          flash_attn_varlen_kvpacked_func,
                                          flash_attn_varlen_qkvpacked_func)


def flash_attn_with_kvcache(*args, **kwargs):
    raise ValueError("flash_attn_with_kvcache: fusedlm has no KV-cache decoding kernel "
                     "(training kernels only)")
