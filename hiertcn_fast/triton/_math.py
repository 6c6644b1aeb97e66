"""Math the Triton kernels share, accurate in float32 where Triton's own functions are not enough."""

import triton
import triton.language as tl

# tanh(x) / x = 1 + x^2 (-1/3 + x^2 (2/15 + ...)) below TANH_SERIES_BELOW: Taylor's first 7 terms, within 4e-9 of
# it there. At and above it, 1 - 2 / (e^2|x| + 1), whose cancellation then costs at most 2 ulps.
TANH_SERIES_BELOW = tl.constexpr(0.4)


@triton.jit
def tanh(x):
    """tanh in float32 to a few ulps relative to the result: 2 / (1 + e^-2x) - 1 alone cancels near 0 (an absolute
    error of an ulp of 1: tanh(1e-5) came out 1.00136e-5, tanh(1e-30) 0). Exact at both tails, NaN stays NaN, and
    -0 stays -0. Libdevice's tanh would do, but the interpreter has no libdevice."""
    a = tl.abs(x)
    s = x * x
    series = -1.0 / 3.0 + s * (2.0 / 15.0 + s * (-17.0 / 315.0 + s * (62.0 / 2835.0 + s * (
        -1382.0 / 155925.0 + s * (21844.0 / 6081075.0)))))
    near_zero = x * (1.0 + s * series)  # (x + x * (s * series) would turn -0 into +0)
    far = 1.0 - 2.0 / (tl.exp(2.0 * a) + 1.0)  # e^2|x| overflows to inf past |x| = 44: then exactly 1
    far = tl.where(x < 0.0, -far, far)
    return tl.where(a < TANH_SERIES_BELOW, near_zero, far)
