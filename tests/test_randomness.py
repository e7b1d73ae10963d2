"""A run's randomness is a pure function of (seed, step, position in the global batch): the same training
whatever the number of ranks, the micro-batch split or the restarts. The VP prior and the EMA follow.

Ranks are simulated as threads of this process: gradients and the VP prior statistic are averaged through
a rendezvous (`ThreadRanks`), as DDP's all-reduce and the orchestrator's all_reduce_mean do. The real DDP
check (two gloo processes) is in test_accumulation_checkpointing.py.
"""

import collections
import copy
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import tarflow
from tarflow import TarFlow, TarFlowConfig, TrainConfig, make_train_state, train_step
from tarflow.randomness import sample_draws, sample_key
from tarflow.training import training_inputs


def make_model(nvp: bool = False, dtype=torch.float64) -> TarFlow:
    model = tarflow.initial_model(TarFlowConfig.from_string("2-64-2-1", image_size=8, in_channels=1, num_classes=10,
                                                            nvp=nvp), seed=0)
    for block in model.blocks:  # non-zero output projections: every layer gets a gradient
        torch.nn.init.normal_(block.proj_out.weight, std=0.05, generator=torch.Generator().manual_seed(1))
    return model.to(dtype)


def batches(n: int, size: int = 8, dtype=torch.float64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [((torch.randint(0, 256, (size, 1, 8, 8), generator=g) / 127.5 - 1).to(dtype),
             torch.randint(0, 10, (size,), generator=g)) for _ in range(n)]


def config(**kw) -> TrainConfig:
    return TrainConfig(**{"lr": 1e-3, "total_steps": 10, "warmup_steps": 1, "seed": 7, "flip": True,
                          "label_drop": 0.3, "noise_std": 0.1, "grad_clip": 1.0, "ema_decay": 0.9, **kw})


class ThreadRanks:
    """`world` ranks as threads: mean(rank, name, t) returns the mean over the ranks of their n-th t of that
    name, summed in rank order, so every rank gets the same bits (as after an all-reduce)."""

    def __init__(self, world: int):
        self.world = world
        self.calls = collections.Counter()
        self.values: dict = {}
        self.cond = threading.Condition()

    def mean(self, rank: int, name: str, t: torch.Tensor) -> torch.Tensor:
        with self.cond:
            key = (name, self.calls[rank, name])
            self.calls[rank, name] += 1
            self.values.setdefault(key, {})[rank] = t.detach().clone()
            self.cond.notify_all()
            if not self.cond.wait_for(lambda: len(self.values[key]) == self.world, timeout=60):
                raise TimeoutError(f"rank {rank} waited for the others at {key}")
            parts = self.values[key]
        return torch.stack([parts[r] for r in range(self.world)]).sum(0) / self.world


def train_ranks(model: TarFlow, cfg: TrainConfig, data: list, world: int) -> list[tarflow.TrainState]:
    """Train `world` copies of model on the global batches of `data`, rank r holding the positions r, r + world,
    ... of each (DistributedSampler's layout), gradients averaged after backward and the VP prior statistic
    through all_reduce_mean."""
    ranks = ThreadRanks(world)

    def average_grad(rank: int, name: str):
        def hook(p: torch.Tensor) -> None:
            p.grad.copy_(ranks.mean(rank, name, p.grad))
        return hook

    states = []
    for r in range(world):
        state = make_train_state(copy.deepcopy(model), cfg, all_reduce_mean=lambda t, r=r: ranks.mean(r, "prior", t))
        for name, p in state.model.named_parameters():
            p.register_post_accumulate_grad_hook(average_grad(r, name))
        states.append(state)

    def work(r: int) -> None:
        for x, y in data:
            train_step(states[r], x[r::world], y[r::world], positions=torch.arange(r, len(x), world))

    with ThreadPoolExecutor(world) as pool:
        for future in [pool.submit(work, r) for r in range(world)]:
            future.result()
    return states


def max_relative_difference(a: dict, b: dict) -> float:
    return max(((a[k] - b[k]).abs().max() / b[k].abs().max().clamp(min=1e-30)).item() for k in a)


# ---------------------------------------------------------------------------------------------
# The draws


def test_a_samples_draws_depend_on_its_key_alone():
    x, y = batches(1, size=8)[0]
    cfg = config()
    whole = training_inputs(x, y, cfg, step=3, positions=None)
    halves = [training_inputs(x[r::2], y[r::2], cfg, step=3, positions=torch.arange(r, 8, 2)) for r in (0, 1)]
    for r, (xs, ys) in enumerate(halves):
        assert torch.equal(xs, whole[0][r::2]) and torch.equal(ys, whole[1][r::2])
    again = training_inputs(x.flip(0), y.flip(0), cfg, step=3, positions=list(range(7, -1, -1)))
    assert torch.equal(again[0], whole[0].flip(0)) and torch.equal(again[1], whole[1].flip(0))
    for other in (dict(step=4, cfg=cfg), dict(step=3, cfg=config(seed=8))):
        moved = training_inputs(x, y, other["cfg"], other["step"], None)[0]
        assert not torch.isclose(moved, whole[0]).any()  # another step or seed: other noise everywhere


def test_draws_are_flips_drops_and_noise_of_the_right_law():
    n = 4000
    d = sample_draws(seed=0, step=0, positions=range(n), shape=(1, 4, 4), noise="gaussian", dtype=torch.float32,
                     device=torch.device("cpu"))
    assert d.flip.float().mean().item() == pytest.approx(0.5, abs=0.03)
    assert d.drop.min().item() >= 0 and d.drop.max().item() < 1 and d.drop.mean().item() == pytest.approx(0.5, abs=0.02)
    assert d.noise.std().item() == pytest.approx(1.0, abs=0.02) and d.noise.mean().item() == pytest.approx(0, abs=0.02)
    assert torch.corrcoef(torch.stack([d.flip.float(), d.drop, d.noise[:, 0, 0, 0]]))[0, 1:].abs().max() < 0.06
    u = sample_draws(0, 0, range(n), (1, 4, 4), "uniform", torch.float32, torch.device("cpu")).noise
    assert u.min().item() >= 0 and u.max().item() < 1 and u.mean().item() == pytest.approx(0.5, abs=0.01)
    assert len({sample_key(s, t, p) for s in range(3) for t in range(30) for p in range(300)}) == 3 * 30 * 300


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_draws_are_keyed_per_sample():
    """On a GPU the noise comes from CUDA's Philox, one generator per sample as on the CPU; flips and drop
    uniforms are the CPU's."""
    cuda = torch.device("cuda")
    whole = sample_draws(7, 3, range(8), (3, 16, 16), "gaussian", torch.float32, cuda)
    on_cpu = sample_draws(7, 3, range(8), (3, 16, 16), "gaussian", torch.float32, torch.device("cpu"))
    assert torch.equal(whole.flip.cpu(), on_cpu.flip) and torch.equal(whole.drop.cpu(), on_cpu.drop)
    for r in (0, 1):
        assert torch.equal(sample_draws(7, 3, range(r, 8, 2), (3, 16, 16), "gaussian", torch.float32, cuda).noise,
                           whole.noise[r::2])
    assert whole.noise.std().item() == pytest.approx(1.0, abs=0.05)
    x, y = batches(1, dtype=torch.float32)[0]
    on_gpu = training_inputs(x.to(cuda), y.to(cuda), config(), step=3, positions=torch.arange(8))
    assert torch.equal(on_gpu[1].cpu(), training_inputs(x, y, config(), step=3)[1])


def test_train_step_leaves_the_global_rng_alone():
    state = make_train_state(make_model(), config())
    before = torch.get_rng_state()
    train_step(state, *batches(1)[0])
    assert torch.equal(torch.get_rng_state(), before)


def test_positions_must_match_the_batch():
    state = make_train_state(make_model(), config())
    with pytest.raises(tarflow.ConfigError, match="8 images but 4 positions"):
        train_step(state, *batches(1)[0], positions=range(4))


# ---------------------------------------------------------------------------------------------
# The same training whatever the ranks, micro-batches or restarts


@pytest.mark.parametrize("nvp", [False, True], ids=["vp", "nvp"])
def test_two_ranks_train_like_one(nvp):
    """1 rank, batch 8 == 2 ranks of 4 (grads and the VP statistic averaged), fp64, 3 steps with flips, noise,
    label drop, clipping and EMA."""
    model, data = make_model(nvp), batches(3)
    one = make_train_state(copy.deepcopy(model), config())
    for x, y in data:
        train_step(one, x, y)
    two = train_ranks(model, config(), data, world=2)
    want = one.model.state_dict()
    for state in two:
        assert max_relative_difference(state.model.state_dict(), want) < 1e-12
        assert max_relative_difference(state.ema.state_dict(), one.ema.state_dict()) < 1e-12
    assert torch.equal(two[0].model.prior_var, two[1].model.prior_var)  # every rank the same prior
    if not nvp:
        assert not torch.equal(want["prior_var"], torch.ones_like(want["prior_var"]))


def test_vp_prior_without_the_reduction_sees_its_own_shard_only():
    model, data = make_model(), batches(1)
    one = make_train_state(copy.deepcopy(model), config())
    train_step(one, *data[0])
    half = make_train_state(copy.deepcopy(model), config())
    x, y = data[0]
    train_step(half, x[0::2], y[0::2], positions=range(0, 8, 2))
    assert max_relative_difference({"p": half.model.prior_var}, {"p": one.model.prior_var}) > 1e-4


def test_accumulation_draws_like_one_batch():
    model, data = make_model(), batches(3)
    plain, accumulated = (make_train_state(copy.deepcopy(model), config(grad_accum_steps=k)) for k in (1, 4))
    for x, y in data:
        train_step(plain, x, y)
        train_step(accumulated, x, y)
    assert max_relative_difference(accumulated.model.state_dict(), plain.model.state_dict()) < 1e-12


def test_restart_from_a_checkpoint_is_bit_for_bit(tmp_path):
    model, data = make_model(dtype=torch.float32), batches(6, dtype=torch.float32)
    full = make_train_state(copy.deepcopy(model), config())
    for x, y in data:
        train_step(full, x, y)
    first = make_train_state(copy.deepcopy(model), config())
    for x, y in data[:3]:
        train_step(first, x, y)
    path = tarflow.save_checkpoint(tmp_path / "ckpt.pt", first)
    resumed = tarflow.restore(make_train_state(make_model(dtype=torch.float32), config()),
                              tarflow.load_checkpoint(path))
    for x, y in data[3:]:
        train_step(resumed, x, y)
    for a, b in ((full.model, resumed.model), (full.ema, resumed.ema)):
        for (key, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(va, vb), key


# ---------------------------------------------------------------------------------------------
# Initial weights and the EMA


def test_initial_weights_come_from_the_seed_alone():
    cfg = TarFlowConfig.from_string("2-64-1-1", image_size=8, in_channels=1)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a, b = tarflow.initial_model(cfg, seed=5), tarflow.initial_model(cfg, seed=5)
    assert torch.equal(torch.get_rng_state(), before)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    c = tarflow.initial_model(cfg, seed=6)
    assert not torch.equal(a.blocks[0].pos_embed, c.blocks[0].pos_embed)


def test_ema_carries_the_vp_prior():
    state = make_train_state(make_model(), config())
    for x, y in batches(3):
        train_step(state, x, y)
    assert torch.equal(state.ema.prior_var, state.model.prior_var)
    assert not torch.equal(state.ema.prior_var, torch.ones_like(state.ema.prior_var))
