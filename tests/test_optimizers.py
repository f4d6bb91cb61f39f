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


BF16_U = 2.0 ** -8  # bf16's unit roundoff: 8 significant bits, round to nearest
FP32_U = 2.0 ** -24


@pytest.fixture
def transforms(monkeypatch):
    """Records each call of train_gpt.spectral_transform as (U, p, output). References take the trainer's own bf16
    output, so that they check the rule around the transform, not one CPU's bf16 roundings: fp32 sums in another
    order can put an element of U on the other side of a bf16 rounding midpoint, and one element of U moved by one
    bf16 step moved 147 of 256 NS outputs, by up to a bf16 step of the largest (2^-7 = 1.2% of max|O|; 4.8% of a
    small entry), which NorMuon's 1 / sqrt(V) weights up in rows of small V. test_kernels checks the transform."""
    calls, real = [], tg.spectral_transform

    def recording(U, p, *args, **kwargs):
        out = real(U, p, *args, **kwargs)
        calls.append((U.detach().clone(), float(p), out.detach().clone()))
        return out
    monkeypatch.setattr(tg, "spectral_transform", recording)
    return calls


def assert_rounds_to(U, u, terms):
    """U (bf16) is bf16(u) of the float64 value u, as the trainer's fp32 arithmetic gets it: rounding to nearest is
    within BF16_U |u|, and the fp32 operations before it (a few roundings of FP32_U times their operands |terms|)
    can move the value across a rounding boundary: 16 FP32_U |terms| bounds them."""
    bound = BF16_U * u.abs() + 16 * FP32_U * terms
    err = (U.double() - u).abs()
    assert (err <= bound).all(), f"transform input is not bf16(mu M + G): {(err / bound).max().item():.3g} x bound"


def trainer_transform(calls, u, p, terms):
    """The trainer's transform output (float64) for the wide matrices u [k, m, n] (float64) at p: for each, the
    recorded matrix of the same shape nearest to it, checked to be bf16(u) and transformed at p; removed from calls."""
    out = []
    for ui, ti in zip(u, terms):
        found = [(c, i) for c, (U, _, _) in enumerate(calls) for i in range(U.size(0)) if U.shape[-2:] == ui.shape]
        assert found, f"no recorded transform of a {tuple(ui.shape)} matrix"
        c, i = min(found, key=lambda ci: (calls[ci[0]][0][ci[1]].double() - ui).abs().max().item())
        U, p_call, O = calls[c]
        assert p_call == pytest.approx(p, abs=1e-12)
        assert_rounds_to(U[i], ui, ti)
        out.append(O[i].double())
        calls[c] = (torch.cat([U[:i], U[i + 1:]]), p_call, torch.cat([O[:i], O[i + 1:]]))
    return torch.stack(out)


def test_raw_branch_two_steps_with_nesterov_momentum():
    """p >= 0.25: the update is the Nesterov momentum matrix itself, W (2 out x 3 in). The fp32 M and U below are
    the trainer's own operations, so bf16(U) rounds the same bits on any IEEE machine; left are fp32 roundings of w
    (~4 x 2^-24 |w| <= 1e-6 atol for |w| < 4) and of the update (2^-24 relative, far under rtol)."""
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


# Updates of NS on diagonal inputs against ns_scalar (float64). Every product in NS is then one bf16 x bf16 product,
# exact in fp32, rounded to nearest: the same bits on any IEEE machine (1.0234375, 2.1e-3 under ns_scalar). bf16's
# grid is 2^-7 = 7.8e-3 apart at 1.02, so 2e-2 allows a neighbouring grid point (another order of NS's bf16 ops)
# plus Fast-Spectral's final rounding (2^-8); a wrong scale, orientation, branch or |U|_F^p is off by >= 18%.
NS_DIAGONAL_RTOL = 2e-2


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
    assert close(w.data - w0 * (1 - LR * WD), -LR * math.sqrt(2 / 3) * o, rtol=NS_DIAGONAL_RTOL)


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
    assert close(w.data - w0 * (1 - LR * WD), -LR * math.sqrt(2 / 3) * o, rtol=NS_DIAGONAL_RTOL)


def test_tall_matrix_is_transposed_and_scaled_by_sqrt_out_over_in():
    """A 3 out x 2 in matrix: NS runs on the wide transpose; scale sqrt(3/2)."""
    c = 2.0
    g = torch.tensor([[c, 0.0], [0.0, c], [0.0, 0.0]])
    w = torch.nn.Parameter(torch.zeros(3, 2))
    w.grad = g.clone()
    tg.DynMuon([w], lr=LR, mu=MU, weight_decay=0.0, p_schedule=lambda t: 0.0).step()
    o = ns_scalar(1 / math.sqrt(2)) * g.double() / c
    assert close(w.data, -LR * math.sqrt(3 / 2) * o, rtol=NS_DIAGONAL_RTOL)


def test_stacked_parameter_is_three_independent_matrices():
    """qkv is stored as [3, d, d]: each slice gets its own transform, as separate matrices would. Both go through the
    same operations on the same [3, 4, 4] stack, so they agree to the last bit; atol 1e-6 is fp32 noise at most."""
    torch.manual_seed(0)
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


def test_normuon_step(transforms):
    """NorMuon: O = NS(U); V = 0.05 * mean(O^2, rows); O / (sqrt V + 1e-8), rescaled to |O|_F. O is the trainer's
    own NS output (see `transforms`), of U = bf16((1 + mu) G) transposed: G is tall."""
    torch.manual_seed(0)
    g = torch.randn(4, 3)  # tall: rows of the polar factor have different norms
    w = torch.nn.Parameter(torch.zeros(4, 3))
    w.grad = g.clone()
    opt = make_opt(w, p=0.0, normuon=True)
    opt.step()
    ((U, p, o),) = transforms
    u = (1 + MU) * g.double().mT[None]
    assert p == 0.0
    assert_rounds_to(U, u, u.abs())  # M = G, U = mu M + G: no cancellation, so |terms| = |u|
    o = o[0].mT.double()
    v = (1 - tg.NORMUON_BETA2) * o.square().mean(dim=-1)
    normalized = o / (v.sqrt()[:, None] + 1e-8)
    normalized *= o.norm() / normalized.norm()
    # the same O, so only the rule's fp32 arithmetic differs: ~10 roundings of 2^-24 = 6e-7 relative; 1e-4 is far
    # below what a wrong V (0.05 vs 1: x 4.5) or normalised dimension changes
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


def test_lion_two_steps_by_hand():
    """--scalar_opt lion: c = b1 m + (1 - b1) g; W <- W (1 - lr wd) - lr sign(c); m <- b2 m + (1 - b2) g, written
    out in float64 for two steps (the second uses the first's m). sign() is exact, so the only rounding is fp32's
    in W's update and m's lerp: 1e-6 relative is 8 fp32 ulps."""
    w = torch.nn.Parameter(torch.tensor([[0.5, -1.0, 2.0], [0.0, 0.25, -0.75]]))
    # [0][0]: step 2's c = 0.045 - 0.06 < 0, while b2 in b1's place would give 0.0475 - 0.03 > 0
    grads = [torch.tensor([[1.0, -0.2, 0.0], [-1.0, 0.5, 0.1]]), torch.tensor([[-0.6, -0.1, 0.4], [0.2, -0.6, 0.0]])]
    opt = tg.Lion([w], lr=0.1, betas=(0.9, 0.95), weight_decay=0.5)
    W, m = w.detach().double().clone(), torch.zeros(2, 3, dtype=torch.float64)
    for g in grads:
        w.grad = g.clone()
        opt.step()
        c = 0.9 * m + 0.1 * g.double()
        W = W * (1 - 0.1 * 0.5) - 0.1 * torch.sign(c)
        m = 0.95 * m + 0.05 * g.double()
        torch.testing.assert_close(w.detach().double(), W, rtol=1e-6, atol=1e-7)


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


def spec_update(model, weights, state, x, y, t, args, grads, calls):
    """Update t (1-based) of SPEC §1 in float64 from weights {name: float64 tensor}, updated in place. It starts from
    the trainer's own gradients `grads` (float64 of its fp32), checked first against the gradient of the mean token
    loss over the whole batch that `model`, a float32 copy, gives; and it takes the spectral transform's output from
    the trainer (`calls`, see `transforms`), checked to be that of bf16(mu M + G) at p_t. So the float64 reference
    shares the trainer's roundings up to fp32 ones, except on the raw branch, whose update bf16(mu M + G) is compared
    with the float64 mu M + G: returns {name: allowance}, the bf16 rounding allowed there (zero elsewhere)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(weights[name])
    model.zero_grad()
    model(x, y).backward()
    mult = t / 3  # --warmup_ratio 0.3 of 10 steps: updates 1, 2, 3 ramp up linearly
    matrices = {id(p) for p in model.matrices()}
    allowance = {}
    for name, p in model.named_parameters():
        w, g, s = weights[name], grads[name], state.setdefault(name, {})
        # two fp32 backward passes of the same weights, summed in another order (two micro-batches x 0.5): each
        # element differs by a few 2^-24 of the sums over <= 64 tokens x 32 features that make it; 1e-4 of the
        # largest element leaves room for cancellation, while a wrong gradient scale is off by >= 50%
        assert (g - p.grad.double()).abs().max() <= 1e-4 * p.grad.abs().max(), ("gradient", name)
        allowance[name] = torch.zeros_like(w)
        if args.optimizer == "adamw" or id(p) not in matrices:  # bias-corrected AdamW, betas (0.9, 0.95)
            lr = (0.002 if args.optimizer == "adamw" else 0.001) * mult
            decay = WD_STEP if args.optimizer == "adamw" and id(p) in matrices else 0.0
            s["m"] = 0.9 * s.get("m", 0) + 0.1 * g
            s["v"] = 0.95 * s.get("v", 0) + 0.05 * g * g
            w.mul_(1 - lr * decay).sub_(lr * (s["m"] / (1 - 0.9 ** t)) / ((s["v"] / (1 - 0.95 ** t)).sqrt() + 1e-8))
            continue
        s["M"] = MU * s.get("M", 0) + g
        s["A"] = MU * s.get("A", 0) + g.abs()  # the |terms| of M, which the trainer's fp32 roundings of M scale with
        tall = g.size(-2) > g.size(-1)

        def wide(m):  # a stack of wide matrices (qkv: three)
            m = m.reshape(-1, *g.shape[-2:])
            return m.mT if tall else m
        u, terms = wide(MU * s["M"] + g), wide(MU * s["A"] + g.abs())
        p_t = -0.25 + 1.25 / (1 + math.exp((t / 10 - 0.2) / 0.04)) if args.optimizer == "dynmuon" else 0.0
        if p_t >= 0.25:  # raw branch: the update is bf16(u), within BF16_U |u| (and fp32 roundings) of u
            o, allow = u, BF16_U * u.abs() + 16 * FP32_U * terms
        else:
            o, allow = trainer_transform(calls, u, p_t, terms), torch.zeros_like(u)
        o, allow = ((m.mT if tall else m).reshape(w.shape) for m in (o, allow))
        if args.optimizer == "normuon":
            o = o.reshape(u.shape[0], *g.shape[-2:])
            s["V"] = 0.95 * s.get("V", 0) + 0.05 * o.square().mean(-1)
            normalized = o / (s["V"].sqrt()[..., None] + 1e-8)
            o = (normalized * (o.norm(dim=(-2, -1)) / normalized.norm(dim=(-2, -1)))[:, None, None]).reshape(w.shape)
        lr = 0.01 * mult * math.sqrt(w.size(-2) / w.size(-1))
        w.mul_(1 - 0.01 * mult * WD_STEP).sub_(lr * o)
        allowance[name] = lr * allow
    return allowance


WD_STEP = 0.5  # large, so that decay with the wrong lr shows


@pytest.mark.parametrize("optimizer", ["dynmuon", "normuon", "adamw"])
def test_three_train_steps_match_spec_written_out(optimizer, transforms):
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
    grads = {}  # the trainer's gradients as its optimizers see them, after both micro-batches
    for name, p in model.named_parameters():
        p.register_post_accumulate_grad_hook(lambda p, name=name: grads.__setitem__(name, p.grad.double().clone()))
    opts = tg.build_optimizers(model, args)
    state = {}
    for step in range(3):
        x, y = torch.randint(0, 16, (4, 8)), torch.randint(0, 16, (4, 8))
        before = {n: p.detach().double().clone() for n, p in model.named_parameters()}
        expected = {n: w.clone() for n, w in before.items()}
        transforms.clear()
        tg.train_step(model, opts, [(x[:2], y[:2]), (x[2:], y[2:])], args, step, 0.5, contextlib.nullcontext)
        allowance = spec_update(reference_model, expected, state, x, y, step + 1, args, grads, transforms)
        assert all(U.numel() == 0 for U, _, _ in transforms), "the trainer transformed more matrices than SPEC"
        for name, p in model.named_parameters():
            update, expected_update = p.double() - before[name], expected[name] - before[name]
            size = expected_update.abs().max()
            err = ((update - expected_update).abs() - allowance[name]).max() / size
            # left: fp32 roundings. The new weight's (the decay factor, the decayed weight, the sum: <= 3 x 2^-24
            # max|w|) relative to the update, and the update's own arithmetic (NorMuon's norms sum <= 256 squares:
            # 256 x 2^-24 = 1.5e-5, AdamW ~10 operations): 1e-4. Mutations of the rule (NorMuon's beta2, row dim or
            # rescale, mu, Nesterov, AdamW's betas, lr_t) exceed the bound >= 75-fold on some step
            bound = 4 * FP32_U * max(before[name].abs().max(), expected[name].abs().max()) / size + 1e-4
            assert err < bound, (step, name, err.item(), bound.item())
