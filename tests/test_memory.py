"""tarflow.memory against what training really holds: autograd's saved tensors (CPU, tiny models) and
the optimizer's tensors after a step; and the planner's choices."""

import contextlib

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import tarflow
from tarflow import TarFlow, TarFlowConfig, TrainConfig, make_train_state, train_step
from tarflow.memory import CUDA_OVERHEAD_BYTES, GiB, plan_fit, recompute_flops_per_image, training_memory
from tarflow.training import flow_loss


def _param_derived(t: torch.Tensor, params: set[int]) -> bool:
    """t is a parameter, or a view / dtype cast of one (autocast's bf16 weight copies)."""
    fn = t.grad_fn
    while fn is not None and fn.name() in ("TBackward0", "ToCopyBackward0", "ViewBackward0", "TransposeBackward0",
                                           "PermuteBackward0", "ExpandBackward0"):
        fn = fn.next_functions[0][0]
    return fn is not None and hasattr(fn, "variable") and id(fn.variable) in params


def saved_for_backward(model: TarFlow, x: torch.Tensor, y: torch.Tensor | None, bf16: bool,
                       attention_kernel: str = "flash") -> tuple[int, int]:
    """(activations, weight casts): bytes of the distinct storages autograd saves in one training
    forward (+ loss), parameters excluded; casts = the saved bf16 copies of parameters."""
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    param_ids = {id(p) for p in model.parameters()}
    activations, casts = {}, {}

    def pack(t):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in param_storages and storage.nbytes():
            (casts if _param_derived(t, param_ids) else activations)[ptr] = storage.nbytes()
        return t

    kernel = sdpa_kernel(SDPBackend.MATH) if attention_kernel == "math" else contextlib.nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), kernel:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            z, logdet = model(x, y)
        loss = flow_loss(z, logdet)[0]
    del loss
    return sum(activations.values()), sum(casts.values())


CASES = [  # (P-Ch-T-K, image size, channels, classes, nvp, batch)
    ("2-64-2-2", 8, 3, 10, True, 4),      # 16 tokens, 1 head
    ("2-128-2-1", 16, 3, 0, True, 2),     # 64 tokens, 2 heads
    ("1-64-1-3", 8, 1, 0, False, 3),      # 64 tokens of 1 value, VP
    ("4-128-3-2", 16, 3, 5, True, 5),     # 16 tokens of 48 values
    ("2-192-1-2", 12, 2, 0, True, 1),     # 36 tokens, 3 heads
]


# (checkpointing keeps only the layers' inputs: the attention kernel does not matter there)
@pytest.mark.parametrize("kernel,ckpt", [("flash", False), ("flash", True), ("math", False)],
                         ids=["flash", "ckpt", "math"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("arch,size,channels,classes,nvp,batch", CASES, ids=[c[0] for c in CASES])
def test_activation_estimate_matches_saved_tensors(arch, size, channels, classes, nvp, batch, precision, ckpt, kernel):
    torch.manual_seed(0)
    cfg = TarFlowConfig.from_string(arch, image_size=size, in_channels=channels, num_classes=classes, nvp=nvp)
    model = TarFlow(cfg).train()
    model.set_activation_checkpointing(ckpt)
    x = torch.randn(batch, channels, size, size)
    y = torch.tensor([-1] + [i % classes for i in range(1, batch)]) if classes else None
    measured, casts = saved_for_backward(model, x, y, precision == "bf16", kernel)
    est = training_memory(cfg, batch, precision, activation_checkpointing=ckpt, attention_kernel=kernel)
    ratio = est["activations"] / measured
    print(f"{arch} {size}² {precision} ckpt={ckpt} {kernel}: estimate {est['activations']} measured {measured} "
          f"ratio {ratio:.3f}")
    assert 0.8 <= ratio <= 1.2
    if precision == "bf16" and not ckpt:  # every Linear's weight is saved as a bf16 copy (biases are not)
        assert 0.95 * est["weight_casts"] <= casts <= est["weight_casts"]
    if precision == "fp32":
        assert casts == 0 and est["weight_casts"] == 0


def peak_of_training_step(model: TarFlow, x: torch.Tensor, bf16: bool) -> int:
    """The most bytes the CPU allocator held at once during a forward + backward, beyond what was live
    before it (weights and, after a warm-up step, their gradients): from the profiler's memory events."""
    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            z, logdet = model(x)
        flow_loss(z, logdet)[0].backward()

    step()  # the gradients exist from now on: they are state, not activations
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("ckpt", [False, True], ids=["plain", "ckpt"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_peak_of_a_training_step(precision, ckpt):
    """activations + transient (+ the bf16 weight copies) against the allocator's peak over a step."""
    torch.manual_seed(0)
    cfg = TarFlowConfig.from_string("2-128-2-2", image_size=16, in_channels=3)
    model = TarFlow(cfg).train()
    model.set_activation_checkpointing(ckpt)
    peak = peak_of_training_step(model, torch.randn(4, 3, 16, 16), precision == "bf16")
    est = training_memory(cfg, 4, precision, activation_checkpointing=ckpt)
    ratio = (est["activations"] + est["transient"] + est["weight_casts"]) / peak
    print(f"{precision} ckpt={ckpt}: estimate / allocator peak = {ratio:.3f}")
    if precision == "fp32":
        assert 0.9 <= ratio <= 1.1
    else:  # the copies of the weights of checkpointed layers are not all alive at the backward's peak
        assert 0.9 <= ratio <= 1.4


def test_accumulation_divides_the_activations():
    cfg = TarFlowConfig.from_string("2-64-2-2", image_size=8)
    full, accum = training_memory(cfg, 8), training_memory(cfg, 8, grad_accum_steps=4)
    assert accum["activations"] * 4 == full["activations"]
    assert {k: accum[k] for k in ("params", "gradients", "optimizer")} == {k: full[k] for k in ("params", "gradients",
                                                                                                 "optimizer")}
    with pytest.raises(tarflow.ConfigError, match="not divisible"):
        training_memory(cfg, 6, grad_accum_steps=4)


@pytest.mark.parametrize("bf16", [False, True])
def test_state_entries_are_exact(bf16):
    torch.manual_seed(0)
    cfg = TarFlowConfig.from_string("2-64-2-1", image_size=8, in_channels=1, num_classes=10)
    model = TarFlow(cfg)
    state = make_train_state(model, TrainConfig(total_steps=5, ema_decay=0.9, bf16=bf16))
    train_step(state, torch.rand(4, 1, 8, 8) * 2 - 1, torch.arange(4))

    def nbytes(tensors):
        return sum(t.untyped_storage().nbytes() for t in tensors)

    est = training_memory(cfg, 4, "bf16" if bf16 else "fp32", ema=True, ddp=True)
    assert est["params"] == nbytes(list(model.parameters()) + list(model.buffers()))
    assert est["gradients"] == nbytes(p.grad for p in model.parameters())
    assert est["optimizer"] == nbytes(t for s in state.optimizer.state.values() for t in s.values())
    assert est["ema"] == nbytes(list(state.ema.parameters()) + list(state.ema.buffers()))
    assert est["ddp_buckets"] == est["gradients"]
    assert est["total"] == sum(v for k, v in est.items() if k != "total")


def test_recompute_flops_are_the_layers_forward():
    cfg = TarFlowConfig.from_string("2-768-8-8", image_size=64)
    share = recompute_flops_per_image(cfg) / cfg.flops_per_image(training=True)
    assert 0.30 < share < 1 / 3  # one more forward of the layers; the projections are not recomputed


# ---------------------------------------------------------------------------------------------
# The planner


TABLE2 = TarFlowConfig.from_string("2-768-8-8", image_size=64)


def test_plan_fits_without_options():
    plan = plan_fit(TABLE2, 4, 80 * GiB, "fp32", num_workers=8)
    assert plan.fits and plan.options == [] and plan.per_gpu_bytes < plan.budget_bytes
    assert "fits" in plan.summary()


def test_plan_offers_single_changes_cheapest_first():
    plan = plan_fit(TABLE2, 32, 80 * GiB, "fp32", num_workers=8)
    assert not plan.fits
    keys = [set(o.overrides) for o in plan.options]
    assert keys == [{"train.grad_accum_steps"}, {"train.activation_checkpointing"}, {"cluster.num_workers"},
                    {"train.precision"}]
    accum, ckpt, workers, bf16 = plan.options
    assert accum.overrides["train.grad_accum_steps"] == 2 and accum.extra_compute == 0
    assert 0.3 < ckpt.extra_compute < 0.34 and ckpt.num_workers == 8
    assert workers.overrides["cluster.num_workers"] == 16
    assert bf16.changes_numerics
    for o in plan.options:
        assert o.per_gpu_bytes <= plan.budget_bytes
        assert f"{o.per_gpu_bytes / GiB:.1f} GiB per GPU" in o.description
    # each option is the smallest that fits: one step less does not
    assert training_memory(TABLE2, 32, "fp32", ddp=True)["total"] + CUDA_OVERHEAD_BYTES > plan.budget_bytes
    print(plan.summary())


def test_plan_combines_when_no_single_change_fits():
    # 10 GiB: checkpointing alone still holds every layer's input for 32 images (~15 GiB); accumulation
    # alone still holds one whole image's activations (~3 GiB) beside 7 GiB of state; together they fit
    plan = plan_fit(TABLE2, 32, 10 * GiB, "fp32", num_workers=1, headroom=1.0)
    assert not plan.fits
    assert [o.overrides for o in plan.options] == [{"train.grad_accum_steps": 8,
                                                    "train.activation_checkpointing": True}]
    assert plan.options[0].per_gpu_bytes <= plan.budget_bytes


def test_plan_with_nothing_that_fits():
    plan = plan_fit(TABLE2, 1, 2 * GiB, "fp32")
    assert not plan.fits and plan.options == []
    assert "nothing fits" in plan.summary()
