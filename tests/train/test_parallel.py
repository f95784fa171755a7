"""apply_ac / apply_compile / apply_fsdp from outside the model: same loss and gradients as the plain
model, and the same parameter names in checkpoints."""

import pytest
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from nextstep.model.checkpoint import build_model
from nextstep.model.config import NextStepConfig
from nextstep.train.config import ParallelConfig
from nextstep.train.parallel import init_single_process_group, parallelize

ARCH = NextStepConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, fm_head_dim=32)


def _batch(text: int = 6, image: int = 4):
    g = torch.Generator().manual_seed(0)
    img = [ARCH.boi] + [ARCH.image_placeholder_id] * image + [ARCH.eoi]
    ids = torch.cat([torch.randint(0, 400, (2, text), generator=g), torch.tensor([img, img])], dim=1)
    labels = ids.masked_fill(ids == ARCH.image_placeholder_id, -100)
    return ids, labels, torch.randn(2 * image, ARCH.token_dim, generator=g)


@pytest.fixture
def one_rank_group():
    torch.set_num_threads(1)
    init_single_process_group(torch.device("cpu"))
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize(("ac", "compile_"), [(True, False), (True, True)])
def test_parallelized_equals_plain(one_rank_group, ac, compile_):
    ref, model = build_model(ARCH, seed=0), build_model(ARCH, seed=0)
    parallelize(
        model, ParallelConfig(activation_checkpointing=ac, compile=compile_, param_dtype="float32"), torch.device("cpu")
    )
    ids, labels, tokens = _batch()
    losses = []
    for m in (ref, model):
        out = m.forward_train(ids, labels, tokens, generator=torch.Generator().manual_seed(1))
        out.loss.backward()
        losses.append(out.loss.detach())
    torch.testing.assert_close(losses[0], losses[1])
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    assert set(full) == set(ref.state_dict())
    grads = {n: p.grad for n, p in model.named_parameters()}
    for name, p in ref.named_parameters():
        clean = (
            name if name in grads else next(k for k in grads if k.replace("_checkpoint_wrapped_module.", "") == name)
        )
        g = grads[clean]
        g = g.full_tensor() if hasattr(g, "full_tensor") else g
        torch.testing.assert_close(g, p.grad, atol=1e-6, rtol=1e-4)


def test_compiled_layers_do_not_recompile_for_every_batch_shape(one_rank_group):
    """Training batches vary in width and image-token count: after the first recompile the changing sizes
    are dynamic, so a fourth shape compiles nothing new, and the losses stay the eager ones."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    ref, model = build_model(ARCH, seed=0), build_model(ARCH, seed=0)
    parallelize(model, ParallelConfig(compile=True, param_dtype="float32"), torch.device("cpu"))
    graphs = []
    for text, image in [(6, 4), (9, 4), (5, 9), (7, 16)]:
        ids, labels, tokens = _batch(text, image)
        losses = [
            m.forward_train(ids, labels, tokens, generator=torch.Generator().manual_seed(1)).loss.detach()
            for m in (ref, model)
        ]
        torch.testing.assert_close(losses[0], losses[1])
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[-1] == graphs[-2], f"graphs compiled after each batch shape: {graphs}"


def test_compile_with_bf16_params_on_cpu_runs_eager(one_rank_group, caplog):
    """Inductor's CPU backend cannot build the bf16 layer: the preset's compile=true must not crash a CPU run."""
    model = build_model(ARCH, seed=0)
    with caplog.at_level("WARNING"):
        parallelize(model, ParallelConfig(compile=True, param_dtype="bfloat16"), torch.device("cpu"))
    assert "parallel.compile=true ignored on CPU" in caplog.text
    assert all(layer._compiled_call_impl is None for layer in model.layers)
    ids, labels, tokens = _batch()
    out = model.forward_train(ids, labels, tokens)
    out.loss.backward()
    assert torch.isfinite(out.loss)
