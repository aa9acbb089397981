"""How much of the GPU allowance in tests/test_gemm.py::assert_close_to_oracle two models of
Hopper's FP8 tensor-core accumulation would use (numpy, CPU; no GPU needed).

The FP8 MMA does not sum in fp32 inside a 128-wide K block (it keeps about 13 fraction bits), and
how exactly it loses the rest is not documented. Two models:
- `truncate`: every 32-wide MMA step adds its exact products to the partial sum and truncates the
  result to F fraction bits;
- `align`: every step aligns its products and the partial sum to the largest of them, truncates each
  to F fraction bits of that exponent, sums exactly, and truncates the result (what the tensor-core
  studies describe for earlier generations).
Each block's result is then scaled and added in fp32, the output rounded to bf16, as our kernels do.
Prints, per model, the largest share of the allowance any output element used (over 1 is a test
failure) and the largest calc_diff against the exact product (the test allows 2^-16).

    python scripts/fp8_mma_error_models.py [--draws 10]
"""

import argparse

import numpy as np

ALLOWANCE = 2.0**-9  # tests/test_gemm.py: on CUDA, this times sum |terms| on top of the fp32 part


def e4m3_values():
    """Every finite float8_e4m3fn value (NaN excluded)."""
    values = []
    for byte in range(256):
        if byte & 0x7F == 0x7F:
            continue
        sign = -1.0 if byte & 0x80 else 1.0
        exponent, mantissa = (byte >> 3) & 0xF, byte & 7
        magnitude = mantissa / 8 * 2.0**-6 if exponent == 0 else (1 + mantissa / 8) * 2.0**(exponent - 7)
        values.append(sign * magnitude)
    return np.array(values)


E4M3 = e4m3_values()


def quantum(x, fraction_bits):
    """The spacing of fraction_bits bits below x's leading bit (1 where x is 0)."""
    with np.errstate(divide="ignore"):
        exponent = np.floor(np.log2(np.abs(x)))
    return np.where(np.isinf(exponent), 1.0, 2.0**(exponent - fraction_bits))


def truncate(x, step):
    return np.trunc(x / step) * step


def mma_block(a, b, model, fraction_bits, step_k=32):
    """One 128-wide K block of a @ b.T as the modelled tensor core sums it (float64 holds it exactly)."""
    partial = np.zeros((a.shape[0], b.shape[0]))
    for k0 in range(0, a.shape[1], step_k):
        products = a[:, None, k0:k0 + step_k] * b[None, :, k0:k0 + step_k]
        if model == "truncate":
            total = partial + products.sum(-1)
        else:
            terms = np.concatenate([partial[..., None], products], -1)
            total = truncate(terms, quantum(np.abs(terms).max(-1), fraction_bits)[..., None]).sum(-1)
        partial = truncate(total, quantum(total, fraction_bits))
    return partial


def to_bf16(x):
    bits = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    return rounded.astype(np.uint32).view(np.float32).astype(np.float64)


def kernel_output(a, sa, b, sb, model, fraction_bits):
    acc = np.zeros((a.shape[0], b.shape[0]), dtype=np.float32)
    block_of_col = np.arange(b.shape[0]) // 128
    for kb in range(a.shape[1] // 128):
        cols = slice(kb * 128, (kb + 1) * 128)
        block = mma_block(a[:, cols], b[:, cols], model, fraction_bits).astype(np.float32)
        acc += block * (sa[:, kb, None] * sb[None, block_of_col, kb]).astype(np.float32)
    return to_bf16(acc)


def allowance_used(a, sa, b, sb, out):
    k = a.shape[1]
    deq_a = a * np.repeat(sa, 128, 1)
    deq_b = b * np.repeat(np.repeat(sb, 128, 0)[:b.shape[0]], 128, 1)
    exact = deq_a @ deq_b.T
    abs_terms = np.abs(deq_a) @ np.abs(deq_b).T
    fp32_part = 2 * (k + 8) * 2.0**-24 * abs_terms
    used = (np.abs(out - exact) - np.abs(exact) * 2.0**-8 - fp32_part) / (ALLOWANCE * abs_terms)
    calc_diff = 1 - 2 * (out * exact).sum() / (out * out + exact * exact).sum()
    return used.max(), calc_diff


def every_value_inputs(rng, m=19, n=136, k=256):
    """tests/test_gemm.py::test_gemm_dense_every_fp8_value: random finite bytes, scales in [0.5, 1.5)."""
    pick = lambda rows: E4M3[rng.integers(0, E4M3.size, (rows, k))]  # noqa: E731
    return pick(m), rng.random((m, k // 128)) + 0.5, pick(n), rng.random((-(-n // 128), k // 128)) + 0.5


def cast_inputs(rng, m=64, n=136, k=256):
    """Gaussian activations and weights cast as our casts do (1x128 and 128x128 scales)."""
    def to_e4m3(x):
        return E4M3[np.abs(np.clip(x, -448, 448)[..., None] - E4M3).argmin(-1)]
    x, w = rng.standard_normal((m, k)), rng.standard_normal((n, k))
    sa = np.abs(x.reshape(m, k // 128, 128)).max(-1) / 448
    w_blocks = np.pad(w, ((0, -n % 128), (0, 0))).reshape(-1, 128, k // 128, 128)
    sb = np.abs(w_blocks).max((1, 3)) / 448
    return (to_e4m3(x / np.repeat(sa, 128, 1)), sa,
            to_e4m3(w / np.repeat(np.repeat(sb, 128, 0)[:n], 128, 1)), sb)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--draws", type=int, default=10)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    cases = [("every fp8 value, k=256", every_value_inputs), ("cast inputs, k=256", cast_inputs),
             ("cast inputs, k=7168", lambda r: cast_inputs(r, m=8, k=7168))]
    models = [("truncate", 13), ("align", 13), ("align", 12), ("align", 11)]
    print(f"{'inputs':<24} {'model':<10} {'F':>3} {'allowance used':>15} {'calc_diff':>10}")
    for name, make in cases:
        for model, bits in models:
            used, diff = 0.0, 0.0
            for _ in range(args.draws):
                a, sa, b, sb = make(rng)
                u, d = allowance_used(a, sa, b, sb, kernel_output(a, sa, b, sb, model, bits))
                used, diff = max(used, u), max(diff, d)
            print(f"{name:<24} {model:<10} {bits:>3} {used:>15.3f} {diff:>10.2e}")


if __name__ == "__main__":
    main()
