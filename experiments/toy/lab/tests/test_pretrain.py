"""pretrain.py: the shipped base it produced (small-sample acceptance), the two resumable training
stages, and the pretraining data mix."""
import random

import pytest
import torch

from dopsd_core.errors import DopsdError
from dopsd_core.toy.denoiser import BASE_WEIGHTS, load_toy_file
from dopsd_core.toy.evaluator import WEIGHTS as EVALUATOR, load_evaluator
from dopsd_core.toy.metrics import ToyMetrics, concept_training_set
from experiments.toy.lab.experiment import UNDISTILLED_WEIGHTS
from testutil import needs_weights


@pytest.fixture(scope="module")
def shipped():
    """The shipped base, its undistilled parent and metrics on 48 unrelated prompts (a small-sample version
    of `python -m experiments.toy.lab toy-acceptance`, whose full-size numbers are in docs/toy_acceptance.json)."""
    from dopsd_core.fileio import load_tensors
    size = sum(p.stat().st_size for p in (BASE_WEIGHTS, UNDISTILLED_WEIGHTS, EVALUATOR))
    assert BASE_WEIGHTS.stat().st_size <= 20e6 and size <= 40e6
    torch.manual_seed(0)
    base, undistilled = load_toy_file(BASE_WEIGHTS), load_toy_file(UNDISTILLED_WEIGHTS)
    guidance = float(load_tensors(BASE_WEIGHTS)[1]["dopsd.guidance"])
    m = ToyMetrics(load_evaluator(EVALUATOR), base, n_unrelated=48)
    return base, undistilled, guidance, m, m.evaluate(base)


def _teacher_fidelity(m, base, shape):
    images, captions = concept_training_set(shape)
    return m.teacher_fidelity(base, shape, images, captions, seeds=1)  # 6 images x 4 captions


@needs_weights
def test_shipped_base_retains_unrelated_prompts_at_4_steps(shipped):
    base, _, _, m, distilled = shipped
    assert distilled["retention"] >= 0.85, distilled  # full size: 90.1 % (acceptance >= 90 %)


@needs_weights
def test_shipped_base_beats_its_parent_sampled_with_its_guidance_at_4_steps(shipped):
    """The distillation is real, with the parent sampled as it was for the distillation (guidance)."""
    from dopsd_core.toy.denoiser import Guided
    _, undistilled, guidance, m, distilled = shipped
    parent = m.evaluate(Guided(undistilled, guidance))
    assert parent["quality_4"] >= 2 * distilled["quality_4"], (parent, distilled)  # full size: 2.7x
    assert distilled["retention"] > parent["retention"]


@needs_weights
@pytest.mark.parametrize("shape", ["star", "heart", "crescent"])
def test_teacher_reproduces_held_out_shapes(shipped, shape):
    base, _, _, m, _ = shipped
    assert _teacher_fidelity(m, base, shape) >= 0.8, shape  # full size: star 98 %, heart 100 %, crescent 94 %


@needs_weights
@pytest.mark.xfail(strict=True, reason="misses the acceptance (docs/toy_acceptance.json): the unguided parent's "
                   "4-step toy-FID is 0.37x the distilled model's, not >= 2x; strict, so it turns red once it passes")
def test_unguided_parent_is_2x_worse_at_4_steps(shipped):
    _, undistilled, _, m, distilled = shipped
    assert m.evaluate(undistilled)["quality_4"] >= 2 * distilled["quality_4"]


@needs_weights
def test_shipped_base_draws_each_held_out_token_as_its_own_outline():
    """Each held-out concept token means something of its own in the base (run 9), so a LoRA has a token
    to rebind that other tokens do not share (full size, 48 prompts: [V1] 94 %, [V2] 75 %, [V3] 100 %;
    chance 1/9)."""
    from dopsd_core.toy.metrics import token_identity
    identity = token_identity(load_toy_file(BASE_WEIGHTS), n=16)
    assert all(identity[t] >= 0.5 for t in ("[V1]", "[V2]", "[V3]")), identity


def test_base_training_stages_run_resume_and_chain(tmp_path):
    """toy-pretrain then toy-distill on a tiny config: checkpoints resume (a finished stage does no
    more steps and writes the same model) and the distilled model differs from its parent."""
    from dopsd_core.fileio import load_tensors
    from dopsd_core.toy.model import ToyConfig
    from experiments.toy.lab.pretrain import distill, pretrain, probe
    cfg = ToyConfig(width=32, depth=1, heads=2, context_dim=16, text_depth=1)
    first = pretrain(tmp_path, steps=3, batch=4, warmup=1, save_every=2, probe_every=0, cfg=cfg)
    sd_first, _ = load_tensors(first)
    again = pretrain(tmp_path, steps=3, batch=4, warmup=1, save_every=2, probe_every=0, cfg=cfg)
    sd_again, _ = load_tensors(again)
    assert all(torch.equal(sd_first[k], sd_again[k]) for k in sd_first)
    out = distill(tmp_path, steps=2, batch=4, n_traj=8, save_every=1, probe_every=0)
    assert (tmp_path / "trajectories.safetensors").is_file()
    parent, child = load_toy_file(first), load_toy_file(out)
    assert child.cfg == cfg
    diff = [not torch.equal(a, b) for a, b in zip(parent.dit.state_dict().values(), child.dit.state_dict().values())]
    assert any(diff)
    res = probe(child, n=6, steps=2)
    assert set(res) == {"shape_acc", "joint_acc", "ref_copy_acc"} and all(0.0 <= v <= 1.0 for v in res.values())
    # a finished distillation continues with data-supervised copies (one more step, at another lr)
    more = load_toy_file(distill(tmp_path, steps=3, batch=4, n_traj=8, save_every=1, probe_every=0, copy_batch=2,
                                 copy_from=2, lr=2e-5))
    assert any(not torch.equal(a, b) for a, b in zip(child.dit.state_dict().values(), more.dit.state_dict().values()))
    _, meta = load_tensors(tmp_path / "distilled.safetensors")
    assert meta["dopsd.copy_batch"] == "2" and meta["dopsd.last_lr"] == "2e-05"
    # another parent: the cached trajectories and the half-done student are refused, not reused
    pretrain(tmp_path, steps=4, batch=4, warmup=1, save_every=2, probe_every=0, cfg=cfg)
    with pytest.raises(DopsdError, match="delete it"):
        distill(tmp_path, steps=4, batch=4, n_traj=8, save_every=1, probe_every=0)
    (tmp_path / "trajectories.safetensors").unlink()
    with pytest.raises(DopsdError, match="distils another pretrained model"):
        distill(tmp_path, steps=4, batch=4, n_traj=8, save_every=1, probe_every=0)


def test_copy_examples_show_the_target_and_the_loss_asks_for_it():
    from experiments.toy.lab.pretrain import _copy_loss, make_copy_example
    rng = random.Random(1)
    assert all(torch.equal(e.ref, e.target) for e in (make_copy_example(rng) for _ in range(300)))

    class Oracle:  # returns the reference (= the target) whatever the state: the loss must be zero
        text_encoder = staticmethod(lambda ids: ids)

        def denoise(self, x_t, sigma, ctx):
            return ctx.ref

    class Identity(Oracle):  # returns its noisy input: a positive loss
        def denoise(self, x_t, sigma, ctx):
            return x_t
    def args():
        return 8, [1.0, 0.9, 0.75, 0.5, 0.0], random.Random(2), torch.Generator().manual_seed(0), "cpu"
    assert _copy_loss(Oracle(), *args()).item() == 0.0
    assert _copy_loss(Identity(), *args()).item() > 0.05


def test_pretraining_mixes_empty_captions_copies_and_blobs():
    from experiments.toy.lab.pretrain import COPY_PROB, DROP_PROB, EMPTY_TOKENS, make_example
    from dopsd_core.toy.text import CONCEPT_TOKENS, TOKEN_ID
    rng = random.Random(0)
    plain = [make_example(rng, 0.0) for _ in range(2000)]
    assert all(e.ref is None for e in plain)
    empty = sum(e.tokens == EMPTY_TOKENS for e in plain) / len(plain)
    assert abs(empty - DROP_PROB) < 0.03, empty
    refs = [make_example(rng, 1.0) for _ in range(1000)]
    copies = sum(torch.equal(e.ref, e.target) for e in refs) / len(refs)
    assert abs(copies - COPY_PROB) < 0.05, copies
    concept_ids = {TOKEN_ID[t] for t in CONCEPT_TOKENS}
    assert all(e.tokens != EMPTY_TOKENS for e in refs)
    assert 0.3 < sum(bool(concept_ids & set(e.tokens)) for e in refs) / len(refs) < 0.95


def test_plain_examples_give_every_concept_token_its_own_outline():
    """Since run 9 a share of plain examples shows a concept token's own outline under that token: the
    token in the caption and the outline in the target agree, and every token gets its turn."""
    from dopsd_core.toy.denoiser import latent_to_image
    from dopsd_core.toy.metrics import outline_matches
    from experiments.toy.lab.pretrain import DROP_PROB, NAMED_PROB, make_example
    from dopsd_core.toy.text import CONCEPT_TOKENS, TOKEN_ID
    rng = random.Random(5)
    plain = [make_example(rng, 0.0) for _ in range(1500)]
    named = [(t, e) for e in plain for t in CONCEPT_TOKENS if TOKEN_ID[t] in e.tokens]
    share = len(named) / len(plain)
    assert abs(share - (1 - DROP_PROB) * NAMED_PROB) < 0.04, share
    assert {t for t, _ in named} == set(CONCEPT_TOKENS)
    drawn = outline_matches(latent_to_image(torch.stack([e.target for _, e in named])))
    assert drawn == [t for t, _ in named]
