"""The objectives' checks (docs/method.md): zero start, per-step = single backward, LoRA-only gradients."""
import pytest
import torch
import torch.nn.functional as F

from dopsd_core.denoiser import euler_step
from dopsd_core.objectives import Batch, dopsd_backward, sft_backward, step_weight


def make_batch(den, records, teacher_gets_student_ctx=False):
    rs = records[:2]
    cs = den.batch_contexts([r.student_ctx[0] for r in rs])
    ct = cs if teacher_gets_student_ctx else den.batch_contexts([r.teacher_ctx[0] for r in rs])
    return Batch(torch.stack([r.x0 for r in rs]), cs, ct)


def grads(den):
    return [p.grad.clone() if p.grad is not None else None for p in den.lora().parameters_list()]


@pytest.mark.parametrize("teacher", ["ema", "frozen"])
def test_zero_start_loss_is_exactly_zero_with_student_context(tiny_records, teacher):
    den, records = tiny_records()
    den.add_lora(4, 4.0)
    sigmas = den.sigma_grid(4)
    out = dopsd_backward(den, make_batch(den, records, True), sigmas, torch.Generator().manual_seed(0), teacher=teacher)
    assert len(out["per_state"]) == 4
    assert all(v == 0.0 for v in out["per_state"].values()), out
    real = dopsd_backward(den, make_batch(den, records), sigmas, torch.Generator().manual_seed(0), teacher=teacher)
    assert all(v > 0.0 for v in real["per_state"].values()), real


def reference_single_backward(den, batch, sigmas, gen):
    """The released scripts' form: keep every state's graph, sum loss_k / K, one backward."""
    lora = den.lora()
    K = len(sigmas) - 1
    x = torch.randn(batch.x0.shape, generator=gen)
    total = 0.0
    for k in range(K):
        s = torch.full((x.shape[0],), sigmas[k])
        with torch.no_grad(), lora.use("teacher"):
            x0_t = den.denoise(x, s, batch.teacher_ctx)
        x0_s = den.denoise(x, s, batch.student_ctx)
        total = total + F.mse_loss(x0_s, x0_t) / K
        x = euler_step(x, x0_s.detach(), sigmas[k], sigmas[k + 1])
    total.backward()
    return total.item()


def test_per_step_backward_equals_single_backward(tiny_records):
    den, records = tiny_records()
    lora = den.add_lora(4, 4.0)
    with torch.no_grad():  # a non-zero student so that student != teacher and gradients are generic
        for p in lora.parameters_list():
            p.add_(torch.randn_like(p) * 0.05)
    batch, sigmas = make_batch(den, records), den.sigma_grid(4)
    out = dopsd_backward(den, batch, sigmas, torch.Generator().manual_seed(3))
    g_per_step = grads(den)
    for p in lora.parameters_list():
        p.grad = None
    ref_loss = reference_single_backward(den, batch, sigmas, torch.Generator().manual_seed(3))
    g_single = grads(den)
    assert out["loss"] == pytest.approx(ref_loss, rel=1e-5)
    assert all(a is not None for a in g_per_step)
    for a, b in zip(g_per_step, g_single):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("method", ["dopsd", "sft"])
def test_gradients_reach_only_lora_parameters(tiny_records, method):
    den, records = tiny_records()
    lora = den.add_lora(4, 4.0)
    batch = make_batch(den, records)
    gen = torch.Generator().manual_seed(0)
    if method == "dopsd":
        dopsd_backward(den, batch, den.sigma_grid(4), gen)
    else:
        out = sft_backward(den, batch, den.shift, gen)
        assert out["loss"] > 0
    for name, p in list(den.dit.named_parameters()) + list(den.text_encoder.named_parameters()):
        assert p.grad is None, f"base parameter {name} got a gradient"
    # B = 0 at start: A gets no gradient through B, but every B (up) gets a non-zero one
    for name, pair in zip(lora.targets, [lora.student[n.replace(".", "/")] for n in lora.targets]):
        assert pair.up.grad is not None and pair.up.grad.abs().sum() > 0, name


def test_loss_weights_relate_per_state(tiny_records):
    den, records = tiny_records()
    den.add_lora(4, 4.0)
    batch, sigmas = make_batch(den, records), den.sigma_grid(4)
    per = {w: dopsd_backward(den, batch, sigmas, torch.Generator().manual_seed(1), loss_weight=w)["per_state"]
           for w in ("x0", "velocity", "transition")}
    for k in range(4):
        s, s_next = sigmas[k], sigmas[k + 1]
        assert per["velocity"][k] == pytest.approx(per["x0"][k] / s**2, rel=1e-5)
        assert per["transition"][k] == pytest.approx(per["x0"][k] * ((s_next - s) / s) ** 2, rel=1e-5)
    assert step_weight("transition", 1.0, 0.9) == pytest.approx(0.01)
    with pytest.raises(ValueError):
        step_weight("l1", 1.0, 0.5)


def test_one_state_mode_supervises_one_state_on_policy(tiny_records):
    den, records = tiny_records()
    lora = den.add_lora(4, 4.0)
    batch, sigmas = make_batch(den, records), den.sigma_grid(4)
    seen = set()
    for seed in range(12):
        out = dopsd_backward(den, batch, sigmas, torch.Generator().manual_seed(seed), states="one")
        assert len(out["per_state"]) == 1
        seen |= set(out["per_state"])
    assert len(seen) >= 3, "the supervised state should vary with the generator"
    # on-policy: the states a late supervised step sees come from the student's own roll-out,
    # so changing the student LoRA changes the loss at that state even with an unchanged teacher
    gen_seed = next(s for s in range(50) if 3 in dopsd_backward(den, batch, sigmas, torch.Generator().manual_seed(s),
                                                              states="one")["per_state"])
    before = dopsd_backward(den, batch, sigmas, torch.Generator().manual_seed(gen_seed), states="one", teacher="frozen")
    with torch.no_grad():
        for p in lora.parameters_list():
            p.add_(torch.randn_like(p) * 0.5)
    after = dopsd_backward(den, batch, sigmas, torch.Generator().manual_seed(gen_seed), states="one", teacher="frozen")
    assert before["per_state"][3] != after["per_state"][3]


class FixedNoise(Batch):
    """A batch whose roll-out starts from the same noise whatever the generator drew before it."""

    def noise(self, generator):
        return torch.randn(self.x0.shape, generator=torch.Generator().manual_seed(99))


def test_two_state_mode_supervises_two_states_of_the_same_on_policy_roll_out(tiny_records):
    """Two random distinct states; the student steps through the states between them without a graph, so
    each supervised state's loss is the one the all-states roll-out has there (same noise, same student)."""
    den, records = tiny_records()
    lora = den.add_lora(4, 4.0)
    with torch.no_grad():
        for p in lora.parameters_list():
            p.add_(torch.randn_like(p) * 0.3)
    b = make_batch(den, records)
    batch, sigmas = FixedNoise(b.x0, b.student_ctx, b.teacher_ctx), den.sigma_grid(4)
    every = dopsd_backward(den, batch, sigmas, torch.Generator().manual_seed(0), teacher="frozen")["per_state"]
    pairs = set()
    for seed in range(16):
        two = dopsd_backward(den, batch, sigmas, torch.Generator().manual_seed(seed), states="two",
                             teacher="frozen")["per_state"]
        assert len(two) == 2
        pairs.add(tuple(sorted(two)))
        for k, v in two.items():
            assert v == pytest.approx(every[k], rel=1e-5), (k, two, every)
    assert len(pairs) >= 4 and any(b - a > 1 for a, b in pairs), "pairs vary, gaps between them included"


def test_sft_loss_is_flow_matching_on_data(tiny_records):
    den, records = tiny_records()
    den.add_lora(4, 4.0)
    batch = make_batch(den, records)
    out = sft_backward(den, batch, den.shift, torch.Generator().manual_seed(0))
    # recompute by hand with the same draws
    gen = torch.Generator().manual_seed(0)
    from dopsd_core.schedule import logit_normal_sigmas
    sigma = logit_normal_sigmas(2, den.shift, gen)
    eps = torch.randn(batch.x0.shape, generator=gen)
    x_t = (1 - sigma.view(-1, 1, 1, 1)) * batch.x0 + sigma.view(-1, 1, 1, 1) * eps
    with torch.no_grad():
        v = den.dit(x_t, sigma, batch.student_ctx.text)
    expected = ((v - (eps - batch.x0)) ** 2).flatten(1).mean(1).mean().item()
    assert out["loss"] == pytest.approx(expected, rel=1e-4)
