"""flash_attn.flash_attn_interface as the suite imports it: fusedlm's interface, plus the two
private names its tests read."""
from fusedlm.flash_attn_interface import *  # noqa: F401,F403
from fusedlm.flash_attn_interface import _get_block_size_n  # noqa: F401

from . import flash_attn_with_kvcache  # noqa: F401

USE_TRITON_ROCM = False  # the suite's switch for AMD's Triton backend: not this
