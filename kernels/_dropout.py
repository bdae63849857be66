"""The dropout seed as the kernels take it, shared by the attention and norm kernels."""
import triton
import triton.language as tl


@triton.jit
def seed_of(seed, SEED, SEED_PTR: tl.constexpr):
    """The dropout seed: the scalar argument (eager calls), or the one element of the integer
    tensor at SEED (under torch.compile: drawn on the device, so that a CUDA graph replays a new
    draw each step and no host value enters the graph). One return: Triton's compiler also
    compiles what follows a return in a constexpr branch."""
    if SEED_PTR:
        seed = tl.load(SEED).to(tl.int32)
    return seed


def seed_args(seed, placeholder):
    """(SEED, seed, SEED_PTR) as a launcher passes them: an int seed by value (`placeholder`, any
    tensor, at SEED), a tensor seed by pointer (and 0)."""
    if isinstance(seed, int):
        return placeholder, seed, False
    return seed, 0, True
