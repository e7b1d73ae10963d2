"""The flow's mathematics: exactness, invertibility, causality, the reference checkpoints."""

import math
from pathlib import Path

import pytest
import torch

from tarflow import ConfigError, TarFlow, TarFlowConfig, bits_per_dim, denoise, dequantize_uniform, sample

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "reference"


def tiny_model(dtype=torch.float64, num_classes=0, nvp=True, seed=0, **kw) -> TarFlow:
    """A small model whose output projections are non-zero, so every block does something."""
    torch.manual_seed(seed)
    cfg = dict(image_size=4, in_channels=1, patch_size=2, width=64, num_blocks=3, layers_per_block=2,
               num_classes=num_classes, nvp=nvp)
    cfg.update(kw)
    model = TarFlow(TarFlowConfig(**cfg)).to(dtype).eval()
    for block in model.blocks:
        torch.nn.init.normal_(block.proj_out.weight, std=0.05)
        torch.nn.init.normal_(block.proj_out.bias, std=0.05)
    return model


def identity_model(**kw) -> TarFlow:
    """Zero output projections (weights AND biases): α = μ = 0 everywhere, so z = x exactly."""
    cfg = dict(image_size=4, in_channels=1, patch_size=2, width=64, num_blocks=2, layers_per_block=1)
    model = TarFlow(TarFlowConfig(**{**cfg, **kw}))
    for block in model.blocks:
        torch.nn.init.zeros_(block.proj_out.bias)
    return model


def naive_inverse(model: TarFlow, z, y=None, guidance=0.0, annealed=False):
    """Inverse without a cache: fixed-point (Jacobi) iterations of the full-sequence network.

    Token i's parameters depend only on tokens < i, so N iterations solve the triangular system exactly.
    """
    h = model.patchify(z)
    for block in reversed(model.blocks):
        zb = block.permute(h)
        x = zb.clone()
        N = x.shape[1]
        for _ in range(N):
            alpha, mu = block.params(x, y)
            if guidance:
                au, mu_u = block.params(x, None)
                w = guidance * torch.arange(N, dtype=x.dtype).div(N - 1)[None, :, None] if annealed else guidance
                alpha, mu = (1 + w) * alpha - w * au, (1 + w) * mu - w * mu_u
            x = zb * torch.exp(alpha) + mu
        h = block.permute(x)
    return model.unpatchify(h)


@pytest.mark.parametrize("nvp", [True, False])
def test_inverse_recovers_input(nvp):
    model = tiny_model(nvp=nvp)
    x = torch.randn(5, 1, 4, 4, dtype=torch.float64)
    z, _ = model(x)
    assert not torch.allclose(z, x)
    torch.testing.assert_close(model.reverse(z), x, atol=1e-10, rtol=0)


def test_logdet_equals_autograd_jacobian():
    model = tiny_model(image_size=4, in_channels=2, num_classes=3)
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    y = torch.tensor([0, 2, -1])
    _, logdet = model(x, y)
    for b in range(3):
        f = lambda v: model(v.view(1, 2, 4, 4), y[b : b + 1])[0].flatten()
        J = torch.autograd.functional.jacobian(f, x[b].flatten())
        sign, logabs = torch.linalg.slogdet(J)
        assert sign > 0
        torch.testing.assert_close(logdet[b], logabs, atol=1e-9, rtol=0)


def test_each_block_is_autoregressive():
    model = tiny_model(image_size=8, num_blocks=2)
    N = model.config.num_tokens
    for block in model.blocks:
        x = torch.randn(2, N, model.config.token_dim, dtype=torch.float64)
        z = block.permute(block(block.permute(x))[0])  # outputs in the block's own order
        for j in (1, N // 2, N - 1):
            x2 = x.clone()
            x2[:, j] += 1.0
            z2 = block.permute(block(block.permute(x2))[0])
            torch.testing.assert_close(z2[:, :j], z[:, :j], atol=0, rtol=0)  # earlier tokens untouched
            assert not torch.allclose(z2[:, j + 1 :], z[:, j + 1 :]) or j == N - 1  # later ones do depend
        torch.testing.assert_close(z[:, 0], x[:, 0])  # token 0 passes through


def test_cached_reverse_equals_recompute():
    model = tiny_model(image_size=8, num_classes=4)
    z = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    y = torch.tensor([1, 3, 0])
    torch.testing.assert_close(model.reverse(z, y), naive_inverse(model, z, y), atol=1e-10, rtol=0)
    for annealed in (False, True):
        torch.testing.assert_close(model.reverse(z, y, guidance=1.5, annealed_guidance=annealed),
                                   naive_inverse(model, z, y, 1.5, annealed), atol=1e-10, rtol=0)


def test_guidance_weight_zero_is_the_conditional_inverse():
    model = tiny_model(num_classes=4)
    z = torch.randn(4, 1, 4, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3])
    plain = model.reverse(z, y)
    # a vanishing weight goes through the batched guided path and must agree with the plain one
    torch.testing.assert_close(model.reverse(z, y, guidance=1e-12), plain, atol=1e-9, rtol=0)
    assert not torch.allclose(model.reverse(z, y, guidance=2.0), plain)
    assert not torch.allclose(model.reverse(z, None), plain)  # labels matter


def test_attention_temperature_only_changes_the_guided_branch():
    model = tiny_model()
    z = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(model.reverse(z, attn_temp=0.5), model.reverse(z))  # no guidance: no effect
    assert not torch.allclose(model.reverse(z, guidance=1.0, attn_temp=0.5), model.reverse(z, guidance=1.0))
    torch.testing.assert_close(model.reverse(z, guidance=1.0, attn_temp=1.0), model.reverse(z), atol=1e-10, rtol=0)


def test_denoise_is_a_score_step():
    model = tiny_model(num_classes=2)
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    y = torch.tensor([1, 0])
    sigma, step = 0.3, 1.2
    # the score by central finite differences of the exact log-density
    eps = 1e-6
    grad = torch.zeros_like(x)
    with torch.no_grad():
        for idx in range(x[0].numel()):
            d = torch.zeros_like(x).view(2, -1)
            d[:, idx] = eps
            d = d.view_as(x)
            grad.view(2, -1)[:, idx] = (model.log_prob(x + d, y) - model.log_prob(x - d, y)) / (2 * eps)
    torch.testing.assert_close(denoise(model, x, y, sigma=sigma, step=step), x + step * sigma**2 * grad,
                               atol=1e-7, rtol=0)


def test_log_prob_is_a_normalised_density_for_the_identity_flow():
    model = identity_model().double()
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    expected = torch.distributions.Normal(0.0, 1.0).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(model.log_prob(x), expected)


def test_bits_per_dim_known_answer():
    # With zero output projections z = x, so log p is the standard normal's.
    model = identity_model(in_channels=3)
    x_u8 = torch.randint(0, 256, (6, 3, 4, 4), dtype=torch.uint8)
    bpd = bits_per_dim(model, x_u8, generator=torch.Generator().manual_seed(7))
    x = dequantize_uniform(x_u8, torch.Generator().manual_seed(7)).double()
    nats = (0.5 * x.pow(2) + 0.5 * math.log(2 * math.pi)).flatten(1).mean(1)
    torch.testing.assert_close(bpd.double(), (nats + math.log(128)) / math.log(2), atol=1e-5, rtol=0)
    # an all-mid-grey image: x_int = 128 -> x = u/128 ∈ [0, 1/128): BPD within 7 + 0.5·log2(2π)/… bounds
    mid = torch.full((1, 3, 4, 4), 128, dtype=torch.uint8)
    lo = (0.5 * math.log(2 * math.pi) + math.log(128)) / math.log(2)
    assert lo <= bits_per_dim(model, mid).item() <= lo + 0.5 / 128**2 / math.log(2) + 1e-6


def test_dequantization_stays_in_the_integer_bin():
    x_u8 = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    x = dequantize_uniform(x_u8)
    x_int = x_u8.float()
    assert ((x + 1) * 128 >= x_int).all() and ((x + 1) * 128 < x_int + 1).all()
    # the [−1, 1] form of the same integers dequantises into the same bins
    x2 = dequantize_uniform(x_u8.float() / 127.5 - 1)
    assert ((x2 + 1) * 128).floor().equal(x_int)


def test_sample_shapes_and_denoise_option():
    model = tiny_model(dtype=torch.float32, num_classes=3)
    g = torch.Generator().manual_seed(0)
    y = torch.tensor([0, 1, 2, 0])
    a = sample(model, 4, y=y, guidance=1.0, annealed_guidance=True, generator=g)
    b = sample(model, 4, y=y, guidance=1.0, annealed_guidance=True, generator=torch.Generator().manual_seed(0))
    assert a.shape == (4, 1, 4, 4) and torch.isfinite(a).all()
    torch.testing.assert_close(a, b)
    c = sample(model, 4, y=y, guidance=1.0, annealed_guidance=True, denoise_sigma=0.1,
               generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(c, denoise(model, a, y, sigma=0.1), atol=1e-6, rtol=0)


# -- the authors' checkpoints ----------------------------------------------------------------------


@pytest.mark.skipif(not (REFERENCE / "tarflow_ref_uncond_small.pt").exists(), reason="shared reference vectors absent")
def test_reference_vectors():
    ref = torch.load(REFERENCE / "tarflow_ref_uncond_small.pt", weights_only=True)
    model = TarFlow.from_reference(ref["state_dict"], ref["config"]).eval()
    z, logdet = model(ref["x"], ref["y"])
    torch.testing.assert_close(z, ref["z"], atol=1e-4, rtol=0)
    torch.testing.assert_close(logdet, ref["logdet"], atol=1e-4, rtol=0)
    x = model.reverse(ref["z_in"], ref["y"], guidance=ref["guidance"], annealed_guidance=ref["annealed_guidance"],
                      attn_temp=ref["attn_temp"])
    torch.testing.assert_close(x, ref["x_reverse"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("num_classes,nvp", [(0, True), (3, True), (3, False)])
def test_reference_layout_round_trip(num_classes, nvp):
    model = tiny_model(dtype=torch.float32, num_classes=num_classes, nvp=nvp)
    if not nvp:
        model.prior_var.uniform_(0.5, 1.5)
    sd = model.to_reference()
    assert sd["blocks.0.attn_mask"].shape == (4, 4)
    if num_classes:
        assert sd["blocks.1.class_embed"].shape == (3, 1, 64)
    cfg = dict(in_channels=1, img_size=4, patch_size=2, channels=64, num_blocks=3, layers_per_block=2, nvp=nvp,
               num_classes=num_classes)
    loaded = TarFlow.from_reference(sd, cfg)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v)
    with pytest.raises(KeyError, match="blocks.2.attn_blocks.1.mlp.main.2.bias"):
        TarFlow.from_reference({k: v for k, v in sd.items() if "blocks.2.attn_blocks.1.mlp.main.2.bias" != k}, cfg)
    with pytest.raises(ValueError, match="shape"):
        TarFlow.from_reference(sd, {**cfg, "channels": 128})


# -- configuration -------------------------------------------------------------------------------


def test_config_from_paper_name():
    c = TarFlowConfig.from_string("2-768-8-8-0.05", image_size=64, in_channels=3, num_classes=1000)
    assert (c.patch_size, c.width, c.num_blocks, c.layers_per_block, c.noise_std) == (2, 768, 8, 8, 0.05)
    assert c.num_tokens == 1024 and c.token_dim == 12 and c.name == "2-768-8-8-0.05"
    assert TarFlowConfig.from_string("4-1024-8-8", image_size=128).noise_std is None
    with pytest.raises(ConfigError, match="cannot parse"):
        TarFlowConfig.from_string("2-768-8", image_size=64)


@pytest.mark.parametrize("kwargs,message", [
    (dict(image_size=28, patch_size=8), "patch_size=8 does not divide image_size=28"),
    (dict(width=100), "width=100 is not a multiple of the attention head dim 64"),
    (dict(patch_size=0), "patch_size must be a positive integer"),
    (dict(image_size=4, patch_size=4), "single token"),
    (dict(num_classes=-1), "num_classes"),
])
def test_bad_config_values_are_named(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        TarFlowConfig(**{**dict(image_size=32, in_channels=1, patch_size=2, width=64, num_blocks=1,
                                layers_per_block=1), **kwargs})


def test_bad_inputs_are_named():
    model = tiny_model(dtype=torch.float32, num_classes=3)
    x = torch.randn(2, 1, 4, 4)
    with pytest.raises(ConfigError, match=r"label out of range.*\[0, 2\].*max 3"):
        model(x, torch.tensor([0, 3]))
    with pytest.raises(ConfigError, match="expected images of shape"):
        model(torch.randn(2, 3, 4, 4))
    with pytest.raises(ConfigError, match="unconditional"):
        tiny_model(dtype=torch.float32)(x, torch.tensor([0, 1]))


def test_flops_per_image():
    model = TarFlow(TarFlowConfig.from_string("2-128-2-2", image_size=8, in_channels=1))
    fwd = model.flops_per_image()
    # ~2 FLOPs per weight per token dominates; attention and the embeddings add a little
    weight_flops = 2 * model.config.num_tokens * sum(p.numel() for n, p in model.named_parameters()
                                                     if n.endswith("weight") and p.dim() == 2)
    assert weight_flops <= fwd <= 1.5 * weight_flops
    assert model.flops_per_image(training=True) == 3 * fwd


@pytest.mark.parametrize("nvp", [True, False])
def test_guided_reverse_equals_recompute_vp_and_affine(nvp):
    model = tiny_model(image_size=6, num_classes=3, nvp=nvp)
    z = torch.randn(2, 1, 6, 6, dtype=torch.float64)
    y = torch.tensor([2, 0])
    torch.testing.assert_close(model.reverse(z, y, guidance=2.0, annealed_guidance=True),
                               naive_inverse(model, z, y, 2.0, True), atol=1e-10, rtol=0)


def test_reverse_leaves_its_input_alone_and_runs_under_bf16_autocast():
    model = tiny_model(dtype=torch.float32, num_classes=3)
    z = torch.randn(2, 1, 4, 4)
    z0 = z.clone()
    y = torch.tensor([1, 2])
    exact = model.reverse(z, y, guidance=1.5, annealed_guidance=True, attn_temp=0.8)
    assert torch.equal(z, z0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        approx = model.reverse(z, y, guidance=1.5, annealed_guidance=True, attn_temp=0.8)
    assert approx.dtype == torch.float32
    torch.testing.assert_close(approx, exact, atol=0.1, rtol=0.05)


def test_the_key_bias_changes_nothing_and_gets_an_exactly_zero_gradient():
    """Softmax ignores the q·b_k a key bias adds to a query's whole row; an exact zero gradient keeps Adam from
    turning the rounding noise of that zero into steps that differ with the world size or batch split."""
    cfg = TarFlowConfig.from_string("4-64-2-2", image_size=16, in_channels=1, num_classes=10)
    torch.manual_seed(0)
    model = TarFlow(cfg)
    for block in model.blocks:
        torch.nn.init.normal_(block.proj_out.weight, std=0.02)
    x, y = torch.rand(4, 1, 16, 16) * 2 - 1, torch.randint(0, 10, (4,))
    z, logdet = model(x, y)
    (z.square().mean() - logdet.mean()).backward()
    width = cfg.width
    for layer in (lay for block in model.blocks for lay in block.layers):
        grad = layer.qkv.bias.grad
        assert torch.count_nonzero(grad[width:2 * width]) == 0 and torch.count_nonzero(grad[:width]) > 0
    with torch.no_grad():
        for layer in (lay for block in model.blocks for lay in block.layers):
            layer.qkv.bias[width:2 * width] += torch.randn(width)
        z2, logdet2 = model(x, y)
    torch.testing.assert_close(z2, z.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logdet2, logdet.detach(), rtol=1e-4, atol=1e-4)
