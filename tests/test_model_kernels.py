"""The model's Triton kernels against float64 and the torch path: the fused QK-norm + RoPE and the
cross-entropy (--kernels triton). Without CUDA they run under the Triton interpreter
(conftest sets TRITON_INTERPRET=1)."""
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", reason="triton is not importable: no model kernels to test")

import train_gpt as tg  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# (batch, seq, heads, head_dim): a batch of one token and head, odd sizes, a half head_dim of 3 (not a power of 2)
SHAPES = [(1, 1, 1, 2), (2, 5, 3, 16), (1, 7, 2, 6), (3, 9, 5, 64)]


def qkv_and_rotary(shape, dtype, seed=0):
    B, T, H, hd = shape
    g = torch.Generator().manual_seed(seed)
    qkv = (1 + 3 * torch.rand(B, T, 3, H, hd, generator=g)) * torch.randn(B, T, 3, H, hd, generator=g)
    return qkv.to(DEV, dtype), tg.Rotary(hd, T + 3, 10000.0).to(DEV)


def reference64(qkv, rotary, eps):
    """rope(rms_norm(q)), rope(rms_norm(k)), v in float64 with the eps the model's F.rms_norm uses for qkv's dtype."""
    x, rot64 = qkv.double(), tg.Rotary(qkv.size(-1), rotary.cos.size(0), 10000.0).to(DEV).double()
    return torch.stack([rot64(F.rms_norm(x[:, :, s], (x.size(-1),), eps=eps)) for s in (0, 1)] + [x[:, :, 2]])


def forward_and_grad(fn, qkv, grad_out):
    x = qkv.detach().requires_grad_(True)
    out = fn(x)
    return out.detach(), torch.autograd.grad(out, x, grad_out.to(out.dtype))[0]


def fused(rotary):
    return lambda qkv: torch.stack(tg.qkv_norm_rope_fused(qkv, rotary.cos, rotary.sin))


def plain(rotary):
    return lambda qkv: torch.stack([rotary(tg.rms_norm(qkv[:, :, s])) for s in (0, 1)] + [qkv[:, :, 2]])


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_and_backward_match_float64(shape, dtype):
    qkv, rotary = qkv_and_rotary(shape, dtype)
    x64 = qkv.double().requires_grad_(True)
    ref = reference64(x64, rotary, torch.finfo(dtype).eps)
    grad_out = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1)).to(DEV, dtype).double()
    ref_grad = torch.autograd.grad(ref, x64, grad_out)[0]
    out, grad = forward_and_grad(fused(rotary), qkv, grad_out)
    assert out.shape == ref.shape and out.dtype == dtype and grad.shape == qkv.shape
    assert torch.equal(out[2], qkv[:, :, 2]) and torch.equal(grad[:, :, 2], grad_out[2].to(dtype))  # v: a copy
    # fp32 math, one rounding to dtype at the end: at most half a unit in the last place, plus fp32 noise
    half_ulp = torch.finfo(dtype).eps / 2
    for got, want in ((out, ref.detach()), (grad, ref_grad)):
        err = (got.double() - want).abs()
        assert (err <= half_ulp * want.abs() + 1e-5 * want.abs().max()).all(), err.max().item()


def test_bf16_kernel_is_closer_to_float64_than_the_torch_path():
    qkv, rotary = qkv_and_rotary((2, 33, 4, 64), torch.bfloat16, seed=3)
    x64 = qkv.double().requires_grad_(True)
    ref = reference64(x64, rotary, torch.finfo(torch.bfloat16).eps)
    grad_out = torch.randn(ref.shape, generator=torch.Generator().manual_seed(2)).to(DEV, torch.bfloat16).double()
    ref_grad = torch.autograd.grad(ref, x64, grad_out)[0]
    errors = {}
    for name, fn in (("fused", fused(rotary)), ("torch", plain(rotary))):
        out, grad = forward_and_grad(fn, qkv, grad_out)
        qk = slice(0, 2)  # v is exact on both paths
        errors[name] = ((out[qk].double() - ref[qk]).norm() / ref[qk].norm(),
                        (grad[:, :, qk].double() - ref_grad[:, :, qk]).norm() / ref_grad[:, :, qk].norm())
    for fused_err, torch_err in zip(errors["fused"], errors["torch"]):
        assert fused_err < torch_err < 2e-2


@pytest.mark.parametrize("shape", [(2, 6, 3, 8), (3, 1, 2, 4)])  # (3, 1, ...): the token stride is the batch's
def test_strided_inputs_and_gradients_agree_with_contiguous_ones(shape):
    qkv, rotary = qkv_and_rotary(shape, torch.float32)
    grads = torch.randn(3, *qkv[:, :, 0].shape, generator=torch.Generator().manual_seed(4)).to(DEV).unbind(0)

    def run(x, grads):
        x = x.detach().requires_grad_(True)
        outs = tg.qkv_norm_rope_fused(x, rotary.cos, rotary.sin)
        assert all(o.is_contiguous() for o in outs)
        return torch.stack(outs), torch.autograd.grad(outs, x, grads)[0]

    want = run(qkv, grads)
    batch_inner = qkv.transpose(0, 1).contiguous().transpose(0, 1)  # batch stride below the token stride
    heads_outer = [g.transpose(1, 2).contiguous().transpose(1, 2) for g in grads]  # SDPA's [B, H, T, hd] layout
    for got in (run(batch_inner, grads), run(qkv, heads_outer), run(batch_inner, heads_outer)):
        assert all(torch.equal(a, b) for a, b in zip(got, want))


# cross-entropy: (rows, vocab) with a single row, a vocabulary that is not a multiple of the block, and several blocks
CE_SHAPES = [(1, 5), (7, 203), (4, 3 * tg.CE_BLOCK + 5)]


@pytest.mark.parametrize("shape", CE_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_kernel_matches_float64(shape, dtype):
    n, vocab = shape
    g = torch.Generator().manual_seed(0)
    logits = (4 * torch.randn(n, vocab, generator=g)).to(DEV, dtype)
    targets = torch.randint(0, vocab, (n,), generator=g).to(DEV)
    x64 = logits.double().requires_grad_(True)
    ref_rows = F.cross_entropy(x64, targets, reduction="none")
    ref_grad = torch.autograd.grad(ref_rows.mean(), x64)[0]
    rows, grad = tg.cross_entropy_with_grad(logits, targets)
    assert rows.dtype == torch.float32 and grad.dtype == dtype
    torch.testing.assert_close(rows.double(), ref_rows.detach(), rtol=1e-6, atol=1e-6)
    half_ulp = torch.finfo(dtype).eps / 2
    err = (grad.double() - ref_grad).abs()
    assert (err <= half_ulp * ref_grad.abs() + 1e-6 / n).all(), err.max().item()
    padded = torch.zeros(n, vocab + 3, dtype=dtype, device=DEV)  # rows strided wider than the vocabulary
    padded[:, :vocab] = logits
    strided_rows, strided_grad = tg.cross_entropy_with_grad(padded[:, :vocab], targets)
    assert torch.equal(strided_rows, rows) and torch.equal(strided_grad, grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_linear_cross_entropy_matches_the_torch_loss(dtype):
    g = torch.Generator().manual_seed(1)
    h = torch.randn(9, 16, generator=g).to(DEV, dtype).requires_grad_(True)
    weight = torch.randn(131, 16, generator=g).to(DEV, dtype).requires_grad_(True)
    targets = torch.randint(0, 131, (9,), generator=g).to(DEV)
    results = []
    for loss_fn in (tg.linear_cross_entropy, tg.fused_linear_cross_entropy):
        loss = loss_fn(h, weight, targets)
        results.append((loss, *torch.autograd.grad(0.37 * loss, (h, weight))))  # a scaled backward, as in accumulation
    tol = 1e-5  # the kernel's math (and the loss it returns) is fp32 also for float64 inputs
    for fused_value, plain_value in zip(results[1], results[0]):
        torch.testing.assert_close(fused_value.to(dtype), plain_value, rtol=tol, atol=tol)
    assert results[1][0].dtype == torch.float32 and results[1][1].dtype == results[1][2].dtype == dtype


def tiny_model(kernels):
    args = tg.resolve_config(["--model", "tiny", "--vocab_size", "300", "--device", DEV, "--kernels", kernels,
                              "--run_name", "t"])
    torch.manual_seed(0)
    return tg.build_model(args, DEV)


@pytest.mark.parametrize("compile_model", [False, True])
def test_model_with_the_kernels_matches_the_torch_path(compile_model):
    plain_model, fused_model = tiny_model("torch"), tiny_model("triton")
    assert fused_model.train_loss is tg.fused_linear_cross_entropy and plain_model.train_loss is tg.linear_cross_entropy
    assert fused_model.eval_loss is tg.linear_cross_entropy  # evaluation takes the plain path: no gradient written
    assert fused_model.blocks[0].attn.norm_rope is tg.qkv_norm_rope_fused
    g = torch.Generator().manual_seed(0)
    idx, targets = (torch.randint(0, plain_model.lm_head.size(0), (2, 24), generator=g).to(DEV) for _ in range(2))
    losses = []
    for model in (plain_model, torch.compile(fused_model) if compile_model else fused_model):
        loss = model(idx, targets)
        (0.5 * loss).backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    for p, q in zip(plain_model.parameters(), fused_model.parameters()):
        assert (p.grad - q.grad).abs().max() <= 1e-5 * p.grad.abs().max() + 1e-7
