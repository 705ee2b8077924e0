"""denoiser.py: the Euler step toward x0_hat and the few-step sampler, with tiny stand-in denoisers; the
model contract (the Denoiser Protocol) against each implementation."""
import ast
import importlib
import inspect
import subprocess
import sys
import textwrap
from typing import Protocol

import pytest
import torch

from dopsd_core.denoiser import Denoiser, PromptDenoiser, euler_step, sample

SIGMAS = [1.0, 0.75, 0.5, 0.25, 0.0]


class FixedX0:
    """Always predicts the same clean image; records what it was called with."""
    family = "test"

    def __init__(self, x0: torch.Tensor):
        self.x0, self.calls = x0, []

    def denoise(self, x_t, sigma, ctx):
        self.calls.append((x_t.clone(), sigma.clone(), ctx))
        return self.x0.to(x_t.device).expand_as(x_t).clone()


class Shrink:
    """x0_hat depends on x_t (so the result depends on the noise drawn)."""
    family = "test"

    def denoise(self, x_t, sigma, ctx):
        return 0.5 * x_t + ctx


def test_last_step_returns_x0_hat_exactly():
    g = torch.Generator().manual_seed(0)
    x, x0_hat = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    for sigma in (1.0, 0.3, 1e-6):
        assert torch.equal(euler_step(x, x0_hat, sigma, 0.0), x0_hat)


@pytest.mark.parametrize("sigma,sigma_next", [(1.0, 0.75), (0.75, 0.5), (0.9, 0.1), (0.2, 0.19), (1e-3, 1e-4)])
def test_step_is_the_euler_update_along_the_velocity(sigma, sigma_next):
    g = torch.Generator().manual_seed(1)
    x, x0_hat = torch.randn(3, 2, 5, 5, generator=g), torch.randn(3, 2, 5, 5, generator=g)
    v = (x - x0_hat) / sigma
    want = x + (sigma_next - sigma) * v
    got = euler_step(x, x0_hat, sigma, sigma_next)
    assert got.shape == x.shape and got.dtype == x.dtype
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the step stays on the straight line between x0_hat (sigma 0) and x (sigma)
    t = sigma_next / sigma
    torch.testing.assert_close(got, t * x + (1 - t) * x0_hat, rtol=1e-6, atol=1e-6)


def test_step_with_sigma_next_equal_sigma_is_the_identity():
    x, x0_hat = torch.randn(1, 2, 3, 3), torch.randn(1, 2, 3, 3)
    torch.testing.assert_close(euler_step(x, x0_hat, 0.6, 0.6), x)


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_fixed_x0_denoiser_is_reached_exactly_from_any_noise(seed):
    x0 = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(100))
    den = FixedX0(x0)
    out = sample(den, None, (3, 2, 4, 4), SIGMAS, torch.Generator().manual_seed(seed))
    assert out.shape == (3, 2, 4, 4)
    assert torch.equal(out, x0.expand(3, 2, 4, 4))


def test_sampler_walks_the_straight_line_from_the_generators_noise():
    """With a fixed x0, each state the denoiser sees is sigma * noise + (1 - sigma) * x0, where the
    noise is the generator's first draw of the shape; sigma arrives as a [B] tensor."""
    shape = (2, 3, 4, 4)
    x0 = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(5))
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(9))
    ctx = object()
    den = FixedX0(x0)
    sample(den, ctx, shape, SIGMAS, torch.Generator().manual_seed(9))
    assert len(den.calls) == len(SIGMAS) - 1  # no call at sigma 0
    for (x_t, s, c), sigma in zip(den.calls, SIGMAS[:-1]):
        assert c is ctx
        assert s.shape == (shape[0],) and torch.all(s == sigma)
        torch.testing.assert_close(x_t, sigma * noise + (1 - sigma) * x0, rtol=1e-5, atol=1e-6)


def test_sample_is_deterministic_for_a_fixed_generator_seed():
    shape = (2, 1, 3, 3)
    ctx = torch.tensor(0.25)
    a = sample(Shrink(), ctx, shape, SIGMAS, torch.Generator().manual_seed(3))
    b = sample(Shrink(), ctx, shape, SIGMAS, torch.Generator().manual_seed(3))
    c = sample(Shrink(), ctx, shape, SIGMAS, torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    # the same generator object continues its stream: a second call draws other noise
    g = torch.Generator().manual_seed(3)
    first, second = sample(Shrink(), ctx, shape, SIGMAS, g), sample(Shrink(), ctx, shape, SIGMAS, g)
    assert torch.equal(first, a) and not torch.allclose(first, second)


def test_single_step_grid_returns_the_first_prediction():
    shape = (1, 2, 3, 3)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    out = sample(Shrink(), torch.tensor(1.0), shape, [1.0, 0.0], torch.Generator().manual_seed(2))
    torch.testing.assert_close(out, 0.5 * noise + 1.0)


def test_device_argument_moves_noise_and_sigmas_and_accepts_strings():
    seen = []

    class Recorder:
        family = "test"

        def denoise(self, x_t, sigma, ctx):
            seen.append((x_t.device, sigma.device, sigma.shape))
            return x_t * 0.5

    shape = (3, 1, 2, 2)
    out = sample(Recorder(), None, shape, SIGMAS, torch.Generator().manual_seed(0), device="meta")
    assert out.device.type == "meta" and out.shape == shape
    assert all(xd.type == "meta" and sd.type == "meta" and ss == (3,) for xd, sd, ss in seen)
    a = sample(Shrink(), torch.tensor(0.0), shape, SIGMAS, torch.Generator().manual_seed(0), device="cpu")
    b = sample(Shrink(), torch.tensor(0.0), shape, SIGMAS, torch.Generator().manual_seed(0),
               device=torch.device("cpu"))
    assert torch.equal(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_noise_is_drawn_on_the_cpu_so_devices_agree():
    x0 = torch.randn(1, 2, 4, 4)

    class Half:
        family = "test"

        def denoise(self, x_t, sigma, ctx):
            return 0.5 * x_t + x0.to(x_t.device)

    shape = (2, 2, 4, 4)
    cpu = sample(Half(), None, shape, SIGMAS, torch.Generator().manual_seed(1))
    gpu = sample(Half(), None, shape, SIGMAS, torch.Generator().manual_seed(1), device="cuda")
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-5, atol=1e-5)


def test_denoiser_protocol_is_runtime_checkable():
    class Full(FixedX0):
        shift = 1.0

        def add_lora(self, rank, alpha, seed=0): ...
        def lora(self): ...
        def set_checkpointing(self, on): ...
        def batch_contexts(self, ctxs): ...
        def fingerprint(self): ...
        def sigma_grid(self, steps, latent_shape): ...

    assert isinstance(Full(torch.zeros(1)), Denoiser)
    assert not isinstance(Shrink(), Denoiser)  # denoise alone is not the whole interface


def protocol_members(proto) -> set[str]:
    """A Protocol's members: the attributes it annotates and the methods it defines, its own and those of
    the Protocols it extends."""
    names = set()
    for base in proto.__mro__:
        if base is Protocol or not getattr(base, "_is_protocol", False):
            continue
        names |= set(base.__dict__.get("__annotations__", {}))
        names |= {n for n, v in base.__dict__.items() if inspect.isfunction(v) and not n.startswith("_")}
    return names


def provided_members(cls) -> set[str]:
    """What an instance of cls has without running it: class attributes (methods, properties, class
    variables, inherited ones too) and the attributes its __init__ assigns to self."""
    names = set(dir(cls))
    init = ast.parse(textwrap.dedent(inspect.getsource(cls.__init__)))
    for node in ast.walk(init):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        for t in targets:
            for e in t.elts if isinstance(t, ast.Tuple) else [t]:
                if isinstance(e, ast.Attribute) and isinstance(e.value, ast.Name) and e.value.id == "self":
                    names.add(e.attr)
    return names


def test_the_protocols_list_what_the_core_calls():
    assert protocol_members(Denoiser) == {"family", "shift", "denoise", "add_lora", "lora", "set_checkpointing",
                                          "batch_contexts", "fingerprint", "sigma_grid"}
    assert protocol_members(PromptDenoiser) == protocol_members(Denoiser) | {"latent_shape", "encode_prompt", "decode"}


# every implementation of the model contract, and the Protocol it implements (a ComfyUI model encodes its
# prompts with ComfyUI's text encoder, so it is a Denoiser, not a PromptDenoiser)
IMPLEMENTATIONS = [("dopsd_core.toy.denoiser", "ToyDenoiser", PromptDenoiser),
                   ("dopsd_core.hosts.comfy", "ComfyDenoiser", Denoiser)]


@pytest.mark.parametrize("module, name, proto", IMPLEMENTATIONS, ids=[i[1] for i in IMPLEMENTATIONS])
def test_each_implementation_has_every_member_of_its_protocol(module, name, proto):
    cls = getattr(importlib.import_module(module), name)
    missing = protocol_members(proto) - provided_members(cls)
    assert not missing, f"{module}.{name} lacks {sorted(missing)} of the {proto.__name__} Protocol"
    for member in protocol_members(proto):
        if inspect.isfunction(proto.__dict__.get(member)) or inspect.isfunction(Denoiser.__dict__.get(member)):
            assert callable(getattr(cls, member)), f"{name}.{member} is not a method"


def test_the_toy_is_a_prompt_denoiser(tiny_toy):
    assert isinstance(tiny_toy(), PromptDenoiser)


def test_the_comfy_adapter_imports_without_comfyui():
    """hosts/comfy.py imports ComfyUI lazily, so the contract test above (and CI) needs no ComfyUI."""
    code = ("import sys; import dopsd_core.hosts.comfy; "
            "print([m for m in sys.modules if m == 'comfy' or m.startswith(('comfy.', 'comfy_api'))])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
