"""Activation checkpointing and gradient accumulation change memory, never the mathematics: the same
loss, gradients and parameters after a step as the plain step (fp32, CPU), also under DDP."""

import copy

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import tarflow
from tarflow import TarFlow, TarFlowConfig, TrainConfig, make_train_state, train_step


def make_model(nvp: bool = True) -> TarFlow:
    torch.manual_seed(0)
    model = TarFlow(TarFlowConfig.from_string("2-64-2-2", image_size=8, in_channels=1, num_classes=10, nvp=nvp))
    for block in model.blocks:  # non-zero output projections: every layer gets a gradient
        torch.nn.init.normal_(block.proj_out.weight, std=0.05)
    return model


def batch(n: int = 8, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return ((torch.randint(0, 256, (n, 1, 8, 8), generator=g) / 127.5 - 1).to(dtype),
            torch.randint(0, 10, (n,), generator=g))


def run(model: TarFlow, steps: int = 1, wrap=None, **train_kw):
    """Train a copy of model for a few steps (flips and label drop on); return (state, metrics, last gradients)."""
    dtype = next(model.parameters()).dtype
    state = make_train_state(copy.deepcopy(model), TrainConfig(lr=1e-3, total_steps=10, warmup_steps=1,
                                                               label_drop=0.3, flip=True, **train_kw), wrap=wrap)
    metrics = [train_step(state, *batch(seed=i, dtype=dtype)) for i in range(steps)]
    grads = [p.grad.clone() for p in state.model.parameters()]
    return state, metrics, grads


def assert_same_training(a, b, rtol=1e-5, atol=1e-6):
    """Same metrics, gradients, weights and VP prior after the step(s)."""
    (sa, ma, ga), (sb, mb, gb) = a, b
    for x, y in zip(ma, mb):
        assert x["lr"] == y["lr"]
        for key in ("loss", "prior_term", "logdet_per_dim", "grad_norm"):
            assert x[key] == pytest.approx(y[key], rel=rtol, abs=atol), key
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, rtol=10 * rtol, atol=atol)
    for x, y in zip(sa.model.state_dict().values(), sb.model.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol)
    assert sa.step == sb.step == len(ma)


VARIANTS = [dict(activation_checkpointing=True), dict(grad_accum_steps=2), dict(grad_accum_steps=4),
            dict(grad_accum_steps=2, activation_checkpointing=True)]


@pytest.mark.parametrize("nvp", [True, False], ids=["nvp", "vp"])
def test_checkpointing_and_accumulation_step_exactly_like_the_plain_step(nvp):
    """fp32, one step: loss, gradients, and the weights after the step.

    (One step only: in fp32 the key biases' gradients are rounding noise around an exact zero (softmax
    ignores a shift shared by all keys), and Adam, normalising each coordinate, turns that noise into
    updates of up to lr·noise/eps that a later step's loss then sees. The fp64 test covers more steps.)"""
    model = make_model(nvp)
    plain = run(model)
    for kw in VARIANTS:
        assert_same_training(plain, run(model, **kw))
    if not nvp:  # the VP prior saw the whole batch's z
        assert not torch.equal(plain[0].model.prior_var, torch.ones_like(plain[0].model.prior_var))


def test_several_steps_in_fp64():
    """Three optimizer steps: the schedule and the optimizer count optimizer steps, not micro-batches."""
    model = make_model(nvp=False).double()
    plain = run(model, steps=3)
    assert plain[1][0]["loss"] != plain[1][2]["loss"] and plain[1][1]["lr"] != plain[1][2]["lr"]
    for kw in VARIANTS[2:]:
        assert_same_training(plain, run(model, steps=3, **kw), rtol=1e-10, atol=1e-12)


def test_checkpointing_only_while_training_with_grad():
    model = make_model()
    state = make_train_state(model, TrainConfig(activation_checkpointing=True))
    assert all(block.checkpoint_layers for block in model.blocks)
    x, y = batch(4)
    plain = make_model()
    torch.testing.assert_close(model.log_prob(x, y), plain.log_prob(x, y))  # autograd on, training: checkpointed
    model.eval()
    torch.testing.assert_close(model.reverse(x, y, guidance=1.0), plain.eval().reverse(x, y, guidance=1.0))
    assert state.model is model


def test_a_batch_accumulation_does_not_divide_runs_as_unequal_micro_batches_with_the_same_step():
    """8 images in 3 micro-batches (3, 3, 2), each weighted by its share: the batch's mean gradient, as a world
    size that does not divide the global batch leaves a rank with such a share."""
    plain, split = make_train_state(make_model(), TrainConfig()), make_train_state(make_model(), TrainConfig(
        grad_accum_steps=3))
    x, y = batch(8)
    a, b = train_step(plain, x, y), train_step(split, x, y)
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    for (name, p), q in zip(plain.model.named_parameters(), split.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("kwargs,message", [
    (dict(grad_accum_steps=0), "grad_accum_steps"), (dict(grad_accum_steps=2.0), "grad_accum_steps"),
    (dict(activation_checkpointing="yes"), "activation_checkpointing"),
])
def test_bad_knobs(kwargs, message):
    with pytest.raises(tarflow.ConfigError, match=message):
        TrainConfig(**kwargs)


@pytest.fixture
def gloo_group(tmp_path):
    """A real one-process gloo process group (DDP needs one)."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_ddp_all_reduces_only_on_the_last_micro_batch(gloo_group):
    model = make_model()
    reductions = []

    def wrap(m):
        ddp = DDP(m)

        def count(_, bucket):  # a real comm hook: the usual all-reduce, counted
            reductions.append(bucket.index())
            fut = dist.all_reduce(bucket.buffer(), async_op=True).get_future()
            return fut.then(lambda f: f.value()[0])

        ddp.register_comm_hook(None, count)
        return ddp

    plain = run(model, steps=1)
    per_step = []
    for k in (1, 4):
        reductions.clear()
        state, metrics, grads = run(model, steps=1, grad_accum_steps=k, wrap=wrap)
        per_step.append(len(reductions))
        assert_same_training(plain, (state, metrics, grads))
    assert per_step[0] > 0 and per_step[1] == per_step[0]  # every bucket once per optimizer step, not per micro-batch


def test_no_sync_reaches_ddp_through_torch_compile(gloo_group):
    ddp = DDP(make_model())
    compiled = torch.compile(ddp)  # compiles lazily, on the first call: nothing is compiled here
    assert compiled is not ddp
    with tarflow.training.no_sync(compiled):
        assert not ddp.require_backward_grad_sync
    assert ddp.require_backward_grad_sync
    with tarflow.training.no_sync(make_model()):  # a plain module: nothing to suspend
        pass


DDP_TRAIN = dict(lr=1e-3, total_steps=10, flip=True, label_drop=0.3, seed=3)


def _all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    dist.all_reduce(t)
    return t / dist.get_world_size()


def _ddp_rank(rank: int, world: int, rendezvous: str, out: str) -> None:
    """One of two real DDP ranks of a VP model: positions rank, rank + 2, ... of each global batch of 8
    (DistributedSampler's layout), as two micro-batches; two optimizer steps; the prior averaged over ranks."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        state = make_train_state(make_model(nvp=False), TrainConfig(**DDP_TRAIN, grad_accum_steps=2), wrap=DDP,
                                 all_reduce_mean=_all_reduce_mean)
        try:  # without positions every rank would draw the same noise
            train_step(state, *batch(4))
            refused = False
        except tarflow.ConfigError:
            refused = True
        for i in range(2):
            x, y = batch(8, seed=i)
            train_step(state, x[rank::world], y[rank::world], positions=range(rank, 8, world))
        torch.save({"weights": state.model.state_dict(), "grads": [p.grad for p in state.model.parameters()],
                    "refused": refused}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes: ~10 s on an idle 2-core machine, much more on a busy one
def test_two_ddp_ranks_accumulating_equal_one_process_on_the_whole_batch(tmp_path):
    """Two gloo processes × (2 micro-batches of 2) == one process, batch 8, with flips, noise and label drop
    on (keyed by position, so both runs draw the same) and the VP prior averaged over the ranks."""
    out = tmp_path / "rank"
    torch.multiprocessing.spawn(_ddp_rank, args=(2, str(tmp_path / "rendezvous"), str(out)), nprocs=2)
    state = make_train_state(make_model(nvp=False), TrainConfig(**DDP_TRAIN))
    for i in range(2):
        train_step(state, *batch(8, seed=i))
    ranks = [torch.load(f"{out}.{r}", weights_only=True) for r in range(2)]
    for g, p in zip(ranks[0]["grads"], state.model.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-7)
    # Adam's first step moves a weight by about lr·g/(|g| + eps): where |g| is near eps, rounding-level
    # differences of the gradient (another summation order) show, here at up to ~1e-3·lr (atol: 1% of lr)
    for ddp in ranks:
        for key, value in ddp["weights"].items():
            torch.testing.assert_close(value, state.model.state_dict()[key], rtol=1e-5, atol=1e-5)
    assert torch.equal(ranks[0]["weights"]["prior_var"], ranks[1]["weights"]["prior_var"])
    assert ranks[0]["refused"] and ranks[1]["refused"]
    assert not torch.equal(state.model.prior_var, torch.ones_like(state.model.prior_var))
