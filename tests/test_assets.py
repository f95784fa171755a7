"""The files shipped in the package: the built-in model's image and text tokenizers."""

import numpy as np
import torch

from nextstep.assets import BUILTIN_MODEL
from nextstep.model.tokenizer import BOI, EOI, IMAGE_PLACEHOLDER, TextTokenizer
from nextstep.model.vae import load_vae, pil_to_pixels
from nextstep.shapes.synth import make_sample


def test_shipped_vae_reconstructs_generated_scenes():
    vae = load_vae(BUILTIN_MODEL / "vae", dtype=torch.float32)
    assert vae.config.z_channels == 16 and vae.config.down_factor == 8
    images = [make_sample(i, seed=123).images[-1] for i in range(4)]  # scenes the VAE never trained on
    x = torch.cat([pil_to_pixels(im) for im in images])  # (4, 3, 128, 128) in [-1, 1]
    with torch.no_grad():
        latents = vae.encode(x)
        y = vae.decode(latents).clamp(-1, 1)
    assert latents.shape == (4, 16, 16, 16)
    mse = ((y - x) / 2).pow(2).mean().item()
    psnr = 10 * np.log10(1 / mse)
    assert psnr > 30, f"shipped VAE reconstructs at {psnr:.1f} dB"


def test_shipped_text_tokenizer_knows_the_domain_and_special_tokens():
    tok = TextTokenizer(BUILTIN_MODEL)
    for special in (BOI, EOI, IMAGE_PLACEHOLDER):
        assert tok.token_id(special) is not None
    ids = tok.encode("two red circles above a blue star")
    assert len(ids) <= 8  # domain words are single tokens
    assert tok.decode(ids) == "two red circles above a blue star"


def test_shipped_model_fits_the_package_budget_and_loads_in_fp16():
    from safetensors import safe_open

    from nextstep.assets import builtin_model_dir

    assert builtin_model_dir() == BUILTIN_MODEL
    total = sum(p.stat().st_size for p in BUILTIN_MODEL.rglob("*") if p.is_file())
    assert total <= 25e6, f"built-in model is {total / 1e6:.1f} MB"
    shards = sorted(BUILTIN_MODEL.glob("*.safetensors"))
    dtypes, n_params = set(), 0
    for shard in shards:
        with safe_open(str(shard), "pt") as f:
            dtypes |= {f.get_slice(k).get_dtype() for k in f.keys()}
            n_params += sum(int(np.prod(f.get_slice(k).get_shape())) for k in f.keys())
    assert dtypes == {"F16"} and n_params <= 15e6
    assert all(s.stat().st_size <= 8e6 for s in shards)  # files git handles well
