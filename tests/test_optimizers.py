"""One optimizer step on toy parameters against hand computations (SPEC §1 update rule)."""
import contextlib
import copy
import math

import pytest
import torch

import train_gpt as tg

LR, MU, WD = 0.1, 0.95, 0.01


def ns_scalar(sigma):
    """What Newton-Schulz does to one singular value (after normalisation), in float64."""
    for a, b, c in tg.NS_COEFFS:
        sigma = a * sigma + b * sigma ** 3 + c * sigma ** 5
    return sigma


def make_opt(w, p, normuon=False):
    return tg.DynMuon([w], lr=LR, mu=MU, weight_decay=WD, p_schedule=lambda t: p, normuon=normuon)


def close(a, b, rtol):
    return torch.allclose(a.double(), torch.as_tensor(b, dtype=torch.float64), rtol=rtol, atol=1e-6)


def test_raw_branch_two_steps_with_nesterov_momentum():
    """p >= 0.25: the update is the Nesterov momentum matrix itself, W (2 out x 3 in)."""
    torch.manual_seed(0)
    w0 = torch.randn(2, 3, dtype=torch.float64)
    w = torch.nn.Parameter(w0.clone().float())
    g1, g2 = torch.randn(2, 3), torch.randn(2, 3)
    opt = make_opt(w, p=0.5)
    w.grad = g1.clone(); opt.step()
    w.grad = g2.clone(); opt.step()
    scale = math.sqrt(2 / 3)
    u1 = (MU * g1 + g1).bfloat16().double()      # M1 = g1, U1 = bf16(mu M1 + g1)
    m2 = MU * g1 + g2                            # M2 = mu M1 + g2
    u2 = (MU * m2 + g2).bfloat16().double()
    expected = (w0 * (1 - LR * WD) - LR * scale * u1) * (1 - LR * WD) - LR * scale * u2
    assert close(w.data, expected, rtol=1e-5)
    assert close(opt.state[w]["momentum"], m2, rtol=1e-6)


def test_muon_step_on_orthogonal_rows():
    """p = 0: Newton-Schulz. G with orthonormal rows x c: NS maps both singular values 1/sqrt(2)
    to ns_scalar(1/sqrt(2)) along the same rows."""
    torch.manual_seed(0)
    c = 3.0
    g = torch.tensor([[c, 0.0, 0.0], [0.0, c, 0.0]])
    w0 = torch.randn(2, 3, dtype=torch.float64)
    w = torch.nn.Parameter(w0.clone().float())
    w.grad = g.clone()
    make_opt(w, p=0.0).step()
    o = ns_scalar(1 / math.sqrt(2)) * g.double() / c
    assert close(w.data, w0 * (1 - LR * WD) - LR * math.sqrt(2 / 3) * o, rtol=2e-2)


def test_dynmuon_fast_spectral_step_on_orthogonal_rows():
    """p < 0: |U|_F^p C NS(U) with A = 0.5 I, E = -0.5 I, so C = (1 - d/2 + d(d-1)/8) I, d = p/2."""
    torch.manual_seed(0)
    p, c = -0.25, 3.0
    g = torch.tensor([[c, 0.0, 0.0], [0.0, c, 0.0]])
    w0 = torch.randn(2, 3, dtype=torch.float64)
    w = torch.nn.Parameter(w0.clone().float())
    w.grad = g.clone()
    make_opt(w, p=p).step()
    d = p / 2
    u_norm = (1 + MU) * c * math.sqrt(2)
    o = u_norm ** p * (1 - d / 2 + d * (d - 1) / 8) * ns_scalar(1 / math.sqrt(2)) * g.double() / c
    assert close(w.data, w0 * (1 - LR * WD) - LR * math.sqrt(2 / 3) * o, rtol=2e-2)


def test_tall_matrix_is_transposed_and_scaled_by_sqrt_out_over_in():
    """A 3 out x 2 in matrix: NS runs on the wide transpose; scale sqrt(3/2)."""
    c = 2.0
    g = torch.tensor([[c, 0.0], [0.0, c], [0.0, 0.0]])
    w = torch.nn.Parameter(torch.zeros(3, 2))
    w.grad = g.clone()
    tg.DynMuon([w], lr=LR, mu=MU, weight_decay=0.0, p_schedule=lambda t: 0.0).step()
    o = ns_scalar(1 / math.sqrt(2)) * g.double() / c
    assert close(w.data, -LR * math.sqrt(3 / 2) * o, rtol=2e-2)


def test_stacked_parameter_is_three_independent_matrices():
    """qkv is stored as [3, d, d]: each slice gets its own transform, as separate matrices would."""
    g = torch.randn(3, 4, 4)
    w_stacked = torch.nn.Parameter(torch.zeros(3, 4, 4))
    w_stacked.grad = g.clone()
    singles = [torch.nn.Parameter(torch.zeros(4, 4)) for _ in range(3)]
    for s, gi in zip(singles, g):
        s.grad = gi.clone()
    make_opt(w_stacked, p=-0.25).step()
    tg.DynMuon(singles, lr=LR, mu=MU, weight_decay=WD, p_schedule=lambda t: -0.25).step()
    for i, s in enumerate(singles):
        assert torch.allclose(w_stacked.data[i], s.data, atol=1e-6)


def test_normuon_step():
    """NorMuon: O = NS(U); V = 0.05 * mean(O^2, rows); O / (sqrt V + 1e-8), rescaled to |O|_F."""
    torch.manual_seed(0)
    g = torch.randn(4, 3)  # tall: rows of the polar factor have different norms
    w = torch.nn.Parameter(torch.zeros(4, 3))
    w.grad = g.clone()
    opt = make_opt(w, p=0.0, normuon=True)
    opt.step()
    u = ((1 + MU) * g).bfloat16()
    o = tg.newton_schulz(u.mT)[0].mT.double()
    v = (1 - tg.NORMUON_BETA2) * o.square().mean(dim=-1)
    normalized = o / (v.sqrt()[:, None] + 1e-8)
    normalized *= o.norm() / normalized.norm()
    assert close(w.data, -LR * math.sqrt(4 / 3) * normalized, rtol=1e-4)
    assert close(opt.state[w]["row_var"], v, rtol=1e-4)
    row_norms = normalized.norm(dim=1)
    assert row_norms.max() / row_norms.min() < (o.norm(dim=1).max() / o.norm(dim=1).min())  # rows evened out


def test_adamw_baseline_and_scalar_groups():
    """AdamW, step 1: bias-corrected m/sqrt(v) = g/|g|, so the update is lr * sign(g) (+ decay on matrices)."""
    args = tg.resolve_config(["--model", "tiny", "--model_dim", "8", "--n_head", "2", "--vocab_size", "16",
                              "--sequence_length", "8", "--optimizer", "adamw"])
    torch.manual_seed(0)
    model = tg.build_model(args)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    (opt,) = tg.build_optimizers(model, args)
    opt.step()
    lr = 0.002
    for name, p in model.named_parameters():
        decay = 0.0 if name in ("embed.weight", "lm_head") else args.weight_decay
        expected = before[name] * (1 - lr * decay) - lr * p.grad / (p.grad.abs() + 1e-8)
        assert torch.allclose(p.data, expected, atol=1e-6), name


def test_muon_family_split_between_optimizers():
    args = tg.resolve_config(["--model", "tiny", "--model_dim", "8", "--n_head", "2", "--vocab_size", "16",
                              "--sequence_length", "8"])
    model = tg.build_model(args)
    adam, dyn = tg.build_optimizers(model, args)
    assert isinstance(adam, torch.optim.AdamW) and isinstance(dyn, tg.DynMuon)
    adam_params = {id(p) for g in adam.param_groups for p in g["params"]}
    assert adam_params == {id(model.embed.weight), id(model.lm_head)}
    assert adam.param_groups[0]["lr"] == 0.001 and adam.param_groups[0]["betas"] == (0.9, 0.95)
    assert adam.param_groups[0]["weight_decay"] == 0.0 and adam.param_groups[0]["eps"] == 1e-8
    assert all(p.ndim >= 2 for g in dyn.param_groups for p in g["params"])
    assert len(dyn.param_groups[0]["params"]) == 4 * args.n_layer  # qkv, out, fc, proj per block


def spec_update(model, weights, state, x, y, t, args):
    """Update t (1-based) of SPEC §1 in float64 from weights {name: float64 tensor}, updated in place. The
    gradient (of the mean token loss over the whole batch) comes from `model`, a float32 copy; the spectral
    transform is spectral_transform itself (tested against float64 references in test_kernels)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(weights[name])
    model.zero_grad()
    model(x, y).backward()
    mult = t / 3  # --warmup_ratio 0.3 of 10 steps: updates 1, 2, 3 ramp up linearly
    matrices = {id(p) for p in model.matrices()}
    for name, p in model.named_parameters():
        w, g, s = weights[name], p.grad.double(), state.setdefault(name, {})
        if args.optimizer == "adamw" or id(p) not in matrices:  # bias-corrected AdamW, betas (0.9, 0.95)
            lr = (0.002 if args.optimizer == "adamw" else 0.001) * mult
            decay = WD_STEP if args.optimizer == "adamw" and id(p) in matrices else 0.0
            s["m"] = 0.9 * s.get("m", 0) + 0.1 * g
            s["v"] = 0.95 * s.get("v", 0) + 0.05 * g * g
            w.mul_(1 - lr * decay).sub_(lr * (s["m"] / (1 - 0.9 ** t)) / ((s["v"] / (1 - 0.95 ** t)).sqrt() + 1e-8))
            continue
        s["M"] = MU * s.get("M", 0) + g
        u = (MU * s["M"] + g).reshape(-1, *g.shape[-2:])  # a stack of matrices (qkv: three)
        p_t = -0.25 + 1.25 / (1 + math.exp((t / 10 - 0.2) / 0.04)) if args.optimizer == "dynmuon" else 0.0
        tall = u.size(-2) > u.size(-1)
        o = tg.spectral_transform((u.mT if tall else u).bfloat16(), p_t).double()
        o = o.mT if tall else o
        if args.optimizer == "normuon":
            s["V"] = 0.95 * s.get("V", 0) + 0.05 * o.square().mean(-1)
            normalized = o / (s["V"].sqrt()[..., None] + 1e-8)
            o = normalized * (o.norm(dim=(-2, -1)) / normalized.norm(dim=(-2, -1)))[:, None, None]
        w.mul_(1 - 0.01 * mult * WD_STEP).sub_(0.01 * mult * math.sqrt(w.size(-2) / w.size(-1)) * o.reshape(w.shape))


WD_STEP = 0.5  # large, so that decay with the wrong lr shows


@pytest.mark.parametrize("optimizer", ["dynmuon", "normuon", "adamw"])
def test_three_train_steps_match_spec_written_out(optimizer):
    """train_step (2 micro-batches, the LR warmup, every optimizer and group) against SPEC §1 in float64, step
    by step from the same weights: p_t at the 1-based update count (tau 0.2: raw, raw, Fast-Spectral), lr_t for
    the decay too, AdamW's betas and bias correction over steps, NorMuon's running V, gradient scale."""
    args = tg.resolve_config(["--model", "tiny", "--model_dim", "8", "--n_head", "2", "--vocab_size", "16",
                              "--sequence_length", "8", "--device", "cpu", "--optimizer", optimizer,
                              "--num_iterations", "10", "--warmup_ratio", "0.3", "--weight_decay", str(WD_STEP),
                              "--dynmuon_tau", "0.2"])
    torch.manual_seed(0)
    model = tg.build_model(args)
    reference_model = copy.deepcopy(model)
    opts = tg.build_optimizers(model, args)
    state = {}
    for step in range(3):
        x, y = torch.randint(0, 16, (4, 8)), torch.randint(0, 16, (4, 8))
        before = {n: p.detach().double().clone() for n, p in model.named_parameters()}
        expected = {n: w.clone() for n, w in before.items()}
        tg.train_step(model, opts, [(x[:2], y[:2]), (x[2:], y[2:])], args, step, 0.5, contextlib.nullcontext)
        spec_update(reference_model, expected, state, x, y, step + 1, args)
        for name, p in model.named_parameters():
            update, expected_update = p.double() - before[name], expected[name] - before[name]
            err = (update - expected_update).abs().max() / expected_update.abs().max()
            assert err < 1e-3, (step, name, err.item())  # measured <= 1.3e-4; mutations of the rule give >= 0.018
