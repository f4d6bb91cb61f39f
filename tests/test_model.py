"""The GPT and Qwen-style models: shapes, causality, initialisation, parameter split, one step each."""
import math

import pytest
import torch

from conftest import TINY_VOCAB
import train_gpt as tg


def tiny_args(*extra):
    return tg.resolve_config(["--model", "tiny", "--model_dim", "32", "--n_head", "4", "--vocab_size",
                              str(TINY_VOCAB), "--sequence_length", "16", "--device", "cpu", *extra])


def test_gpt_is_causal_and_returns_mean_loss():
    torch.manual_seed(0)
    model = tg.build_model(tiny_args())
    x = torch.randint(0, TINY_VOCAB, (2, 16))
    y = torch.randint(0, TINY_VOCAB, (2, 16))
    loss = model(x, y)
    assert loss.ndim == 0 and abs(loss.item() - math.log(TINY_VOCAB)) < 1.0  # logits of std ~1 at init

    def first_logits(inp):  # per-position loss of the first 8 positions with fixed targets
        out = []
        for t in range(8):
            out.append(model(inp[:, : t + 1], y[:, : t + 1]).item())
        return out
    x2 = x.clone()
    x2[:, 8:] = (x2[:, 8:] + 1) % TINY_VOCAB  # change only the future
    assert first_logits(x) == first_logits(x2)


def test_init_follows_spec():
    torch.manual_seed(0)
    model = tg.build_model(tiny_args("--model_dim", "128", "--n_layer", "1"))
    block = model.blocks[0]
    assert block.attn.qkv.std().item() == pytest.approx(128 ** -0.5, rel=0.05)
    assert block.mlp.fc.std().item() == pytest.approx(128 ** -0.5, rel=0.05)  # out 4d, in d: min(1, 2) = 1
    assert block.mlp.proj.std().item() == pytest.approx((512 ** -0.5) * 0.5, rel=0.05)  # in 4d: x sqrt(1/4)
    assert model.embed.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.lm_head.std().item() == pytest.approx(128 ** -0.5, rel=0.05)


def test_qwen171M_parameter_count():
    args = tg.resolve_config(["--model", "qwen171M"])
    assert (args.arch, args.n_kv_head, args.mlp_hidden, args.rope_base) == ("qwen", 2, 2816, 1e6)
    with torch.device("meta"):
        n = tg.count_parameters(tg.build_model(args))
    assert abs(n - 171e6) < 0.5e6


def qwen_args(*extra):
    return tiny_args("--arch", "qwen", "--n_kv_head", "2", "--mlp_hidden", "48", *extra)


def test_qwen_parameters_split_between_muon_and_adamw():
    model = tg.build_model(qwen_args())
    adam, dyn = tg.build_optimizers(model, qwen_args())
    muon_ids = {id(p) for g in dyn.param_groups for p in g["params"]}
    adam_ids = {id(p) for g in adam.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        expected = "muon" if (p.ndim >= 2 and name.startswith("blocks")) else "adam"
        assert (id(p) in muon_ids, id(p) in adam_ids) == (expected == "muon", expected == "adam"), name
    block = model.blocks[0]
    assert block.attn.kv.shape == (2, 16, 32) and block.mlp.gate_up.shape == (2, 48, 32)


@pytest.mark.parametrize("optimizer", ["dynmuon", "muon", "normuon", "adamw"])
def test_qwen_one_training_step_each_optimizer(optimizer):
    args = qwen_args("--optimizer", optimizer, "--p_schedule", "fixed")
    torch.manual_seed(0)
    model = tg.build_model(args)
    opts = tg.build_optimizers(model, args)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = torch.randint(0, TINY_VOCAB, (2, 16))
    loss_sum, mult = tg.train_step(model, opts, [(x, x.roll(-1, 1))], args, 0, 1.0, tg.forward_context(args))
    assert math.isfinite(loss_sum.item())
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert set(changed) == set(before)  # every parameter moved, biases and norm weights included


def _loss_and_grads(h, w, targets, chunk):
    h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss = tg.linear_cross_entropy(h, w, targets, chunk)
    (loss * 0.25).backward()  # a scaled loss, as under gradient accumulation
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("chunk", [1, 8, 37, 100])
def test_chunked_cross_entropy_matches_full_logits_float64(chunk):
    """37 rows in chunks of 8 leave a tail of 5; chunk >= rows is one chunk."""
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(37, 16, generator=g, dtype=torch.float64), torch.randn(97, 16, generator=g, dtype=torch.float64)
    targets = torch.randint(0, 97, (37,), generator=g)
    ref = _loss_and_grads(h, w, targets, 0)
    out = _loss_and_grads(h, w, targets, chunk)
    for a, b in zip(out, ref):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    with torch.no_grad():  # evaluation: loss only
        torch.testing.assert_close(tg.linear_cross_entropy(h, w, targets, chunk), ref[0], rtol=1e-12, atol=0)


def test_chunked_cross_entropy_under_bf16_autocast():
    """bf16 matmuls, fp32 logits: same loss and gradients as the unchunked path up to bf16 rounding."""
    g = torch.Generator().manual_seed(1)
    h, w = torch.randn(64, 32, generator=g), torch.randn(300, 32, generator=g) * 0.2
    targets = torch.randint(0, 300, (64,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = _loss_and_grads(h, w, targets, 0)
        out = _loss_and_grads(h, w, targets, 16)
    assert out[0].dtype == torch.float32 and out[1].dtype == h.dtype and out[2].dtype == w.dtype
    torch.testing.assert_close(out[0], ref[0], rtol=1e-6, atol=0)
    for a, b in zip(out[1:], ref[1:]):
        assert (a - b).norm() / b.norm() < 1e-2


def test_model_with_loss_chunk_and_attention_backend_matches_default():
    plain_args, fast_args = tiny_args(), tiny_args("--loss_chunk", "7", "--attention", "math")
    torch.manual_seed(0)
    model = tg.build_model(plain_args)
    other = tg.build_model(fast_args)
    other.load_state_dict(model.state_dict())
    x, y = torch.randint(0, TINY_VOCAB, (2, 16)), torch.randint(0, TINY_VOCAB, (2, 16))
    losses = []
    for m, args in ((model, plain_args), (other, fast_args)):
        with tg.forward_context(args)():
            losses.append(m(x, y))
        losses[-1].backward()
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=0)
    for (name, a), b in zip(model.named_parameters(), other.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)
