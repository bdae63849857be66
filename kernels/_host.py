"""Launch arithmetic on the host. triton.cdiv and triton.next_power_of_2 are constexpr functions
in recent Triton, whose wrapper costs ~2.6 us a call from Python (measured on a 2-core CPU):
a few of those per launch are a visible share of a small kernel's launch cost."""


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << (n - 1).bit_length() if n > 1 else 1
