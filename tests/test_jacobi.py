"""Jacobi (parallel) inversion: at a tight tolerance it is the sequential inverse, in every sampling mode.

Exactness is checked in float64 at tol=1e-12 (and tol=0, where tokens settle only by the triangular
structure), where both samplers agree to ~1e-13: the Jacobi forward (scaled_dot_product_attention over
a chunk) and the sequential step (bmm over the KV cache) round differently, and float32's ~1e-7 per
op compounded over blocks would blur a 1e-5 comparison. The stored float32 vectors are checked too.
"""

from pathlib import Path

import pytest
import torch

from tarflow import BlockPlan, ConfigError, JacobiPlan, TarFlow, TarFlowConfig, jacobi_reverse, plan_jacobi, sample
from tarflow.jacobi import even_bounds

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "reference" / "tarflow_ref_uncond_small.pt"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tensors are tiny: a second thread only adds synchronisation (10x slower on a busy 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_model(num_classes=0, nvp=True, seed=0, num_blocks=3, **kw) -> TarFlow:
    """float64, 8×8 images in 2×2 patches (16 tokens), non-zero output projections; VP gets a non-unit prior."""
    torch.manual_seed(seed)
    cfg = dict(image_size=8, in_channels=1, patch_size=2, width=64, num_blocks=num_blocks, layers_per_block=2,
               num_classes=num_classes, nvp=nvp, **kw)
    model = TarFlow(TarFlowConfig(**cfg)).double().eval()
    for block in model.blocks:
        torch.nn.init.normal_(block.proj_out.weight, std=0.05)
        torch.nn.init.normal_(block.proj_out.bias, std=0.05)
    if not nvp:
        model.prior_var.uniform_(0.5, 1.5)
    return model


MODES = [  # guidance, annealed, attn_temp
    (0.0, False, 1.0),
    (1.5, False, 1.0),
    (2.0, True, 1.0),
    (1.5, True, 0.7),
    (2.0, False, 1.3),
]


@pytest.mark.skipif(not REFERENCE.exists(), reason="shared reference vectors absent")
@pytest.mark.parametrize("guidance,annealed,attn_temp", MODES)
def test_reference_checkpoint(guidance, annealed, attn_temp):
    ref = torch.load(REFERENCE, weights_only=True)
    model = TarFlow.from_reference(ref["state_dict"], ref["config"]).eval()
    if (guidance, annealed, attn_temp) == (ref["guidance"], ref["annealed_guidance"], ref["attn_temp"]):
        x, _ = jacobi_reverse(model, ref["z_in"], ref["y"], guidance, annealed, attn_temp, tol=1e-6)
        torch.testing.assert_close(x, ref["x_reverse"], atol=1e-4, rtol=0)  # the authors' float32 vectors
    model = model.double()
    z = ref["z_in"].double()
    seq = model.reverse(z, ref["y"], guidance, annealed, attn_temp)
    for tol in (1e-12, 0.0):
        x, stats = jacobi_reverse(model, z, ref["y"], guidance, annealed, attn_temp, tol=tol)
        assert stats.fallbacks == []
        torch.testing.assert_close(x, seq, atol=1e-10, rtol=0)


@pytest.mark.parametrize("nvp,num_classes", [(True, 0), (True, 3), (False, 0), (False, 3)])
@pytest.mark.parametrize("guidance,annealed,attn_temp", MODES)
def test_equals_sequential(nvp, num_classes, guidance, annealed, attn_temp):
    model = small_model(num_classes, nvp)
    z = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    y = torch.tensor([0, 2, -1]) if num_classes else None
    seq = model.reverse(z, y, guidance, annealed, attn_temp)
    x, stats = jacobi_reverse(model, z, y, guidance, annealed, attn_temp, tol=1e-12)
    torch.testing.assert_close(x, seq, atol=1e-10, rtol=0)
    assert [b.block for b in stats.blocks] == [2, 1, 0] and stats.fallbacks == []
    assert all(1 <= sum(b.iterations) <= 15 and b.forwards == sum(b.iterations) for b in stats.blocks)


def test_a_loose_tolerance_is_close_not_exact():
    model = small_model(num_classes=3)
    z = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0])
    seq = model.reverse(z, y, 2.0, True)
    tight, s_tight = jacobi_reverse(model, z, y, 2.0, True, tol=1e-12)
    loose, s_loose = jacobi_reverse(model, z, y, 2.0, True, tol=1e-2)
    assert s_loose.nfe < s_tight.nfe
    assert 0 < (loose - seq).abs().max() < 0.1
    assert (tight - seq).abs().max() < 1e-10


@pytest.mark.parametrize("plan", [
    BlockPlan(even_bounds(16, 4)),
    BlockPlan((1, 2, 9, 15, 16), init="zeros"),  # uneven, including one-token segments
    BlockPlan(init="zeros"),
])
@pytest.mark.parametrize("cache_prefix", [True, False])
def test_segments_inits_and_prefix_recompute_give_the_same_inverse(plan, cache_prefix):
    model = small_model(num_classes=3)
    z = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    y = torch.tensor([1, 2])
    seq = model.reverse(z, y, 1.5, True, 0.8)
    x, stats = jacobi_reverse(model, z, y, 1.5, True, 0.8, tol=1e-12, plan=JacobiPlan.uniform(3, plan),
                              cache_prefix=cache_prefix)
    torch.testing.assert_close(x, seq, atol=1e-10, rtol=0)
    for b in stats.blocks:
        assert len(b.iterations) == len(plan.segments(16))
        # a segment of L tokens settles within L iterations
        assert all(it <= hi - lo for it, (lo, hi) in zip(b.iterations, plan.segments(16)))


def test_cached_prefix_evaluates_fewer_tokens():
    model = small_model()
    z = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    plan = JacobiPlan.uniform(3, BlockPlan(even_bounds(16, 4)))
    _, cached = jacobi_reverse(model, z, tol=0.0, plan=plan)
    _, recomputed = jacobi_reverse(model, z, tol=0.0, plan=plan, cache_prefix=False)
    assert [b.iterations for b in cached.blocks] == [b.iterations for b in recomputed.blocks]
    assert cached.nfe < recomputed.nfe


def test_a_sequential_block_in_the_plan():
    model = small_model(num_classes=3)
    z = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    y = torch.tensor([0, 1])
    plan = JacobiPlan([BlockPlan(), BlockPlan(sequential=True), BlockPlan(even_bounds(16, 2))])
    x, stats = jacobi_reverse(model, z, y, 2.0, True, tol=1e-12, plan=plan)
    torch.testing.assert_close(x, model.reverse(z, y, 2.0, True), atol=1e-10, rtol=0)
    modes = {b.block: (b.mode, b.forwards, b.iterations) for b in stats.blocks}
    assert modes[1] == ("sequential", 15, [])
    assert stats.blocks[1].nfe == 15 / 16


def blown_up_model(alpha_scale, mu_scale, seed):
    """One block whose output projection is scaled up: its inverse exists (the sequential sampler
    computes it) but Jacobi's iterates run away from it."""
    torch.manual_seed(0)
    model = TarFlow(TarFlowConfig(image_size=8, in_channels=1, patch_size=2, width=64, num_blocks=1,
                                  layers_per_block=1)).double().eval()
    w = model.blocks[0].proj_out.weight.data
    torch.manual_seed(1)
    torch.nn.init.normal_(w, std=0.05)
    w[:4] *= alpha_scale
    w[4:] *= mu_scale
    z = torch.randn(2, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return model, z


@pytest.mark.parametrize("alpha_scale,mu_scale,seed,reason", [
    (1, 4, 2, "grew 3 iterations running"),
    (2, 3, 2, "non-finite update"),
])
def test_divergence_falls_back_to_the_sequential_inverse(alpha_scale, mu_scale, seed, reason):
    model, z = blown_up_model(alpha_scale, mu_scale, seed)
    seq = model.reverse(z)
    assert torch.isfinite(seq).all()
    x, stats = jacobi_reverse(model, z, tol=1e-12)
    (b,) = stats.blocks
    assert b.mode == "fallback" and reason in b.reason and stats.fallbacks == [0]
    assert b.forwards == b.iterations[0] + 15  # the Jacobi iterations spent, then the sequential steps
    torch.testing.assert_close(x, seq, atol=0, rtol=0)


def test_max_iters_falls_back():
    model = small_model(num_classes=3)
    z = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    y = torch.tensor([0, 1])
    x, stats = jacobi_reverse(model, z, y, 1.0, tol=0.0, max_iters=3)
    assert stats.fallbacks == [2, 1, 0] and all("max_iters=3" in b.reason for b in stats.blocks)
    torch.testing.assert_close(x, model.reverse(z, y, 1.0), atol=1e-10, rtol=0)


def test_plan_jacobi_measures_every_option_and_its_plan_is_exact():
    model = small_model(num_classes=3)
    y = torch.tensor([0, 1, 2, 1])
    z = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    plan = plan_jacobi(model, z, y, 2.0, True, tol=1e-12, segments=(2, 4), repeats=1)
    assert len(plan.blocks) == 3 and sorted(plan.calibration) == [0, 1, 2]
    for options in plan.calibration.values():
        assert len(options) == 5 and {"sequential", "jacobi init=z", "jacobi init=zeros"} <= set(options)
        assert sum(k.endswith((" 2 segments", " 4 segments")) for k in options) == 2
        assert all(o["max_err"] < 1e-10 for k, o in options.items() if k != "sequential")
        assert all(o["predicted"] >= 0 and o["seconds"] > 0 for o in options.values())
    assert plan.cost.sequential > 0 and plan.cost.per_forward >= 0 and plan.cost.per_token >= 0
    assert "block 2:" in plan.describe().split(";")[0]
    z2 = torch.randn(4, 1, 8, 8, dtype=torch.float64)  # the plan is reused on new noise
    x, _ = jacobi_reverse(model, z2, y, 2.0, True, tol=1e-12, plan=plan)
    torch.testing.assert_close(x, model.reverse(z2, y, 2.0, True), atol=1e-10, rtol=0)


def test_sample_with_the_jacobi_sampler():
    model = small_model(num_classes=3).float()
    y = torch.tensor([0, 1, 2])
    kw = dict(y=y, guidance=1.0, annealed_guidance=True)
    seq = sample(model, 3, generator=torch.Generator().manual_seed(0), **kw)
    jac = sample(model, 3, generator=torch.Generator().manual_seed(0), sampler="jacobi", jacobi_tol=1e-7, **kw)
    torch.testing.assert_close(jac, seq, atol=1e-5, rtol=0)
    assert not jac.is_inference()
    with pytest.raises(ConfigError, match="unknown sampler 'gs'"):
        sample(model, 1, sampler="gs")


def test_bad_plans_are_named():
    model = small_model()
    z = torch.randn(1, 1, 8, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="plan has 2 blocks, the model 3"):
        jacobi_reverse(model, z, plan=JacobiPlan.uniform(2))
    with pytest.raises(ValueError, match="rise strictly from 1 to N=16"):
        jacobi_reverse(model, z, plan=JacobiPlan.uniform(3, BlockPlan((1, 8, 8, 16))))
    with pytest.raises(ValueError, match="init must be one of"):
        jacobi_reverse(model, z, plan=JacobiPlan.uniform(3, BlockPlan(init="ones")))


def test_runs_under_bf16_autocast_and_leaves_its_input_alone():
    model = small_model(num_classes=3).float()
    z = torch.randn(2, 1, 8, 8)
    z0 = z.clone()
    y = torch.tensor([1, 2])
    exact = model.reverse(z, y, 1.5, True, 0.8)
    plan = JacobiPlan.uniform(3, BlockPlan(even_bounds(16, 3)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        approx, _ = jacobi_reverse(model, z, y, 1.5, True, 0.8, tol=1e-3, plan=plan)
    assert torch.equal(z, z0) and approx.dtype == torch.float32
    torch.testing.assert_close(approx, exact, atol=0.1, rtol=0.05)
