"""The loss on a CUDA device (skipped without one): fp32 Gram even with TF32 on, bf16 autocast."""

import pytest
import torch

from lowres_ssl.losses import PolynomialKernel, SFRIKKernel, SFRIKLoss, mmd_to_uniform

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def tf32_on():
    flags = torch.backends.cuda.matmul
    name = "fp32_precision" if hasattr(flags, "fp32_precision") else "allow_tf32"
    previous = getattr(flags, name)
    setattr(flags, name, "tf32" if name == "fp32_precision" else True)
    yield flags, name
    setattr(flags, name, previous)


@pytest.mark.parametrize(
    ("kernel", "path"),
    [
        (SFRIKKernel(), "dense"),
        (SFRIKKernel(), "blocked"),
        (PolynomialKernel(2), "moments"),
    ],
)
def test_paths_match_float64_reference_with_tf32_enabled(tf32_on, kernel, path):
    flags, name = tf32_on
    setting = getattr(flags, name)
    torch.manual_seed(0)
    n, q = 2000, 4096
    z = torch.nn.functional.normalize(torch.randn(n, q, device="cuda"), dim=1)
    z64 = z.double().cpu().requires_grad_()
    ref = kernel.value(z64 @ z64.T, q).mean() - kernel.b0(q)
    (ref_grad,) = torch.autograd.grad(ref, z64)
    z32 = z.clone().requires_grad_()
    got = mmd_to_uniform(z32, kernel, path, block_size=300)
    (grad,) = torch.autograd.grad(got, z32)
    # fp32 rounding of q-term dot products and n² sums: ~1e-6 relative; TF32 would give ~1e-3.
    assert abs(got.item() - ref.item()) <= 1e-5 * abs(ref.item())
    assert (grad.double().cpu() - ref_grad).norm() <= 1e-5 * ref_grad.norm()
    assert getattr(flags, name) == setting  # the user's TF32 setting is restored


def test_sfrik_loss_under_bf16_autocast_is_float32():
    torch.manual_seed(0)
    z1 = torch.randn(512, 8192, device="cuda")
    z2 = z1 + 0.1 * torch.randn_like(z1)
    h1, h2 = z1.bfloat16(), z2.bfloat16()
    want = SFRIKLoss()(h1.float(), h2.float())
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = SFRIKLoss()(h1, h2)
    assert got.dtype == torch.float32
    # The same fp32 arithmetic on the same (bf16-valued) inputs: equal to fp32 rounding.
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
