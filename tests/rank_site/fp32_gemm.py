"""bf16 matrix products computed in float32 and rounded once, for CPUs without a bf16 GEMM.

Why: PyTorch's CPU build takes oneDNN's bf16 GEMM only on AVX512-BF16/AMX (or ARM bf16) hosts.
Elsewhere (the AVX2-only CI boxes) it falls back to a scalar reference loop: measured on this
project's 2-core AMD EPYC (2026-12-07), a (16 x 152064) @ (152064 x 3584) bf16 product, the shape
of the 7B head's backward, took 100-156 s (0.1-0.17 GFLOP/s) against 4-5 s in float32. The
real-width tests train the 7B's 3584 x 152064 head in bf16, so most of their time went there.

What changes: only the kernel. The reference loop accumulates in float32 and rounds the result to
bf16 once; this does the same through the float32 GEMM (summation order aside), for aten::mm and
aten::addmm with bf16 operands on the CPU. Dtypes, shapes, memory layout and every line of
RisKVA, transformers, peft and DeepSpeed stay as they are. The float32 copy of the right operand
is taken in blocks of at most CHUNK elements, so the measured peak RSS barely moves. Where the
stock kernel is the faster one (a few rows times a transposed weight: decoding), it is kept.

Loaded by tests/rank_site/sitecustomize.py when RISKVA_TESTS_FP32_GEMM=1 (tests/model/test_real_width.py).
"""
from __future__ import annotations

import torch

CHUNK = 1 << 22  # float32 elements of one block of the right operand (16 MB)
_BF16 = torch.bfloat16


def _product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b in float32 (a: M x K, b: K x N); b is converted in blocks that are contiguous in memory."""
    a32 = a.float()
    if b.is_contiguous():  # row blocks of b, accumulated
        step = max(1, CHUNK // max(1, b.shape[1]))
        out = torch.zeros(a.shape[0], b.shape[1], dtype=torch.float32)
        for k in range(0, b.shape[0], step):
            out.addmm_(a32[:, k:k + step], b[k:k + step].float())
        return out
    if b.t().is_contiguous():  # b is a weight's transpose (Linear's forward): column blocks of b
        step = max(1, CHUNK // max(1, b.shape[0]))
        out = torch.empty(a.shape[0], b.shape[1], dtype=torch.float32)
        for j in range(0, b.shape[1], step):
            torch.mm(a32, b.t()[j:j + step].float().t(), out=out[:, j:j + step])
        return out
    return a32 @ b.float()


def _faster_in_fp32(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The fallback is ~100x slower than float32 when b is row-major (autograd's grad @ weight), and
    a few times slower for x @ weight.T from 32 rows up; below that (decoding one token) the
    conversion would cost more than it saves (measured: 1 row x the 7B head, 0.12 s stock, 2.5 s)."""
    return a.dtype == b.dtype == _BF16 and (b.is_contiguous() or a.shape[0] >= 32)


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if _faster_in_fp32(a, b):
        return _product(a, b).to(_BF16)
    return torch.ops.aten.mm.out(a, b, out=torch.empty(a.shape[0], b.shape[1], dtype=a.dtype))


def _addmm(bias: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, beta=1, alpha=1) -> torch.Tensor:
    if bias.dtype == _BF16 and _faster_in_fp32(a, b):
        out = _product(a, b)
        if alpha != 1:
            out.mul_(alpha)
        if beta != 0:
            out.add_(bias.float(), alpha=beta)
        return out.to(_BF16)
    result = torch.empty(a.shape[0], b.shape[1], dtype=a.dtype)
    return torch.ops.aten.addmm.out(bias, a, b, beta=beta, alpha=alpha, out=result)


def install() -> None:
    # The .out overloads keep their stock kernels, so the float32 path (and every other dtype)
    # still runs PyTorch's own GEMM.
    lib = torch.library.Library("aten", "IMPL")
    lib.impl("mm", _mm, "CPU")
    lib.impl("addmm", _addmm, "CPU")
    install.library = lib  # registrations live as long as their Library object
