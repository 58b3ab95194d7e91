"""The real-width tests' float32 GEMM seam (tests/rank_site/fp32_gemm.py) computes what PyTorch's bf16
fallback computes: float32 accumulation, one rounding to bf16. Run in a fresh interpreter that
carries the seam as the real-width ranks do (PYTHONPATH + RISKVA_TESTS_FP32_GEMM=1)."""
from __future__ import annotations

import os
import subprocess
import sys

from rank_callbacks import SITE_DIR
from rank_site.sitecustomize import FP32_GEMM_ENV

SCRIPT = r'''
import torch
import torch.nn.functional as F
import fp32_gemm

torch.manual_seed(0)
bf = torch.bfloat16
def rounded(x):  # float32 result rounded once, what the stock fallback returns
    return x.to(bf)
a, b, w, bias = (torch.randn(40, 96, dtype=bf), torch.randn(96, 72, dtype=bf), torch.randn(72, 96, dtype=bf),
                 torch.randn(72, dtype=bf))
checks = {
    "mm row-major b": (a @ b, rounded(a.float() @ b.float())),
    "linear (b transposed)": (F.linear(a, w, bias), rounded(a.float() @ w.float().t() + bias.float())),
    "addmm alpha beta": (torch.addmm(bias, a, w.t(), beta=0.5, alpha=2.0),
                         rounded(2.0 * (a.float() @ w.float().t()) + 0.5 * bias.float())),
    "decoding row (stock kernel)": (F.linear(a[:1], w), rounded(a[:1].float() @ w.float().t())),
    "float32 untouched": (a.float() @ b.float(), a.float().double().matmul(b.float().double()).float()),
}
x = a.clone().requires_grad_()
F.linear(x, w).float().sum().backward()
checks["backward grad @ weight"] = (x.grad, rounded(torch.ones(40, 72) @ w.float()))
for name, (got, want) in checks.items():
    assert got.dtype == want.dtype and got.shape == want.shape, name
    spacing = want.float().abs().clamp_min(1e-3) * 2 ** -7  # one bf16 step (summation order aside)
    assert ((got.float() - want.float()).abs() <= spacing + 1e-4).all(), name
fp32_gemm.CHUNK = 100  # blocks much smaller than the operand (several row blocks accumulated): same result
want = checks["mm row-major b"][1].float()
assert ((a @ b).float() - want).abs().le(want.abs().clamp_min(1e-3) * 2 ** -7 + 1e-4).all(), "row blocks"
print("SEAM", fp32_gemm.install.library is not None)
'''


def test_bf16_products_in_float32_match_one_rounding_of_the_float32_product():
    env = dict(os.environ, PYTHONPATH=str(SITE_DIR), **{FP32_GEMM_ENV: "1"})
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SEAM True" in proc.stdout  # installed by sitecustomize, not by the script
