"""The rollout policy kept across RL steps: after an optimizer step the refreshed copy samples exactly what a
freshly built one does (CPU, fp32; on GPU a bf16 copy on CUDA graphs, to bf16 accuracy), from the same storage
(so CUDA graphs captured over it stay valid) and without rebuilding the engine's states; with keep_states 0 it
is freed after each rollout."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from nextstep.model.checkpoint import from_pretrained
from nextstep.model.tokenizer import TextTokenizer
from nextstep.model.vae import load_vae
from nextstep.rl.policy import RolloutPolicy
from nextstep.rl.rollout import Rollout, policy_log_prob, sample_rollout
from nextstep.sampling.flow import FlowSettings
from nextstep.train.config import ModelConfig, TrainConfig
from tests.refs import ROOT

TINY = ROOT / "nextstep11-tiny"
SOURCE = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))


pytestmark = pytest.mark.usefixtures("one_thread")


def _sample(policy: RolloutPolicy, steps: tuple[int, ...]) -> Rollout:
    settings = FlowSettings(family="nextstep11", num_steps=4, rule="sde", noise_level=0.8, stochastic=steps)
    size = (2 * policy.pipe.down_factor, 2 * policy.pipe.down_factor)
    prompts = ["a red circle", "make the red circle blue"]
    return sample_rollout(
        policy.pipe, prompts, settings, size=size, seed=5, sources=[None, SOURCE], engine=policy.engine
    )[0]


def _storage(policy: RolloutPolicy) -> list[int]:
    """Where the copy's weights and what the engine derived from them live: what captured graphs read."""
    layer = policy.pipe.model.layers[0]
    derived = [layer.self_attn.qkv_proj.weight, layer.mlp.gate_up_proj.weight]
    derived += [st.t_embed for st in policy.engine._states.values()]
    return [t.data_ptr() for t in [*derived, *policy.pipe.model.parameters()]]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_refreshed_policy_samples_what_a_fresh_one_does(device):
    dev = torch.device(device)
    exact = {"rtol": 0, "atol": 0} if device == "cpu" else {"rtol": 2e-2, "atol": 2e-2}  # fused head kernels
    model = from_pretrained(TINY, dtype=torch.float32, device=dev)  # fp32 masters; the copy takes the VAE's dtype
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    vae, tokenizer = load_vae(TINY / "vae", dtype=dtype, device=dev), TextTokenizer(TINY)
    cfg = TrainConfig(model=ModelConfig(init="pretrained", path=str(TINY), arch=model.config))
    kept = RolloutPolicy(vae, tokenizer, defaults={}, keep_states=2)
    kept.update(model, cfg, dev)
    trained_steps = ((0,), (1, 2))  # two engine states, both kept
    before = [_sample(kept, steps) for steps in trained_steps]
    states = dict(kept.engine._states)
    storage = _storage(kept)

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    lp, _ = policy_log_prob(model, before[0])
    lp.mean().backward()
    optimizer.step()
    kept.update(model, cfg, dev)
    fresh = RolloutPolicy(vae, tokenizer, defaults={}, keep_states=1)
    fresh.update(model, cfg, dev)
    for steps, old in zip(trained_steps, before, strict=True):
        got, want = _sample(kept, steps), _sample(fresh, steps)
        torch.testing.assert_close(got.tokens, want.tokens, **exact)
        assert (got.tokens - old.tokens).abs().max() > 0.1  # the optimizer step changed what is sampled
    assert _storage(kept) == storage  # refreshed in place
    assert kept.engine._states.keys() == states.keys()
    assert all(kept.engine._states[k] is st for k, st in states.items())  # no state rebuilt

    kept.release()  # kept: keep_states > 0
    assert kept.pipe is not None
    once = RolloutPolicy(vae, tokenizer, defaults={}, keep_states=0)
    once.update(model, cfg, dev)
    torch.testing.assert_close(_sample(once, (0,)).tokens, _sample(fresh, (0,)).tokens, **exact)
    once.release()
    assert once.pipe is None and once.engine is None
