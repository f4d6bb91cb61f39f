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
    loss_sum, mult = tg.train_step(model, opts, [(x, x.roll(-1, 1))], args, 0, 1.0, torch.autocast("cpu",
                                                                                                   enabled=False))
    assert math.isfinite(loss_sum.item())
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert set(changed) == set(before)  # every parameter moved, biases and norm weights included
