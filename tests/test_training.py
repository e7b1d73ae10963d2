"""Training math and checkpoints, and a real-data run that must learn."""

import math

import pytest
import torch

import tarflow
from tarflow import TarFlow, TarFlowConfig, TrainConfig, lr_at, make_train_state, train_step
from tarflow.data import DataConfig, load_dataset, to_uint8
from tarflow.training import augment, drop_labels


def test_lr_schedule_warms_up_then_follows_a_cosine():
    cfg = TrainConfig(lr=1e-3, min_lr=1e-6, warmup_steps=10, total_steps=110)
    assert lr_at(0, cfg) == pytest.approx(1e-6)
    assert lr_at(5, cfg) == pytest.approx(1e-6 + 0.5 * (1e-3 - 1e-6))
    assert lr_at(10, cfg) == pytest.approx(1e-3)
    assert lr_at(60, cfg) == pytest.approx(1e-6 + 0.5 * (1e-3 - 1e-6))  # half-way down the cosine
    assert lr_at(110, cfg) == pytest.approx(1e-6)
    lrs = [lr_at(s, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_noise_and_label_drop():
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(256, 3, 8, 8)
    noisy = augment(x, TrainConfig(noise="gaussian", noise_std=0.07), g)
    assert noisy.std().item() == pytest.approx(0.07, rel=0.05)
    u8 = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8)
    deq = augment(u8.float() / 127.5 - 1, TrainConfig(noise="uniform"), g)
    assert ((deq + 1) * 128).floor().equal(u8.float())
    y = torch.randint(0, 10, (10000,), generator=g)
    dropped = drop_labels(y, 0.1, g)
    assert (dropped == -1).float().mean().item() == pytest.approx(0.1, abs=0.015)
    assert dropped[dropped >= 0].equal(y[dropped >= 0])


@pytest.mark.parametrize("kwargs,message", [
    (dict(noise="laplace"), "noise must be"), (dict(noise_std=-0.1), "noise_std"),
    (dict(warmup_steps=20, total_steps=10), "warmup_steps"), (dict(label_drop=1.5), "label_drop"),
])
def test_bad_train_config(kwargs, message):
    with pytest.raises(tarflow.ConfigError, match=message):
        TrainConfig(**kwargs)


def small_state(**train_kw) -> tarflow.TrainState:
    torch.manual_seed(0)
    model = TarFlow(TarFlowConfig.from_string("2-64-2-1", image_size=8, in_channels=1, num_classes=10))
    return make_train_state(model, TrainConfig(**{"lr": 1e-3, "total_steps": 20, "warmup_steps": 2, **train_kw}))


def batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 256, (16, 1, 8, 8), generator=g).float() / 127.5 - 1,
             torch.randint(0, 10, (16,), generator=g)) for _ in range(n)]


def test_checkpoint_resume_continues_exactly(tmp_path):
    data = batches(6)
    full = small_state(ema_decay=0.9, grad_clip=1.0)
    for x, y in data:
        train_step(full, x, y)

    first = small_state(ema_decay=0.9, grad_clip=1.0)
    for x, y in data[:3]:
        train_step(first, x, y)
    path = tarflow.save_checkpoint(tmp_path / "ckpt.pt", first, data_position=3)
    ckpt = torch.load(path, weights_only=True)  # plain tensors and Python values only
    resumed = tarflow.restore(small_state(ema_decay=0.9, grad_clip=1.0), ckpt)
    assert resumed.step == 3 and resumed.extra["data_position"] == 3
    for x, y in data[3:]:
        train_step(resumed, x, y)
    for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    for a, b in zip(full.ema.parameters(), resumed.ema.parameters()):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    model = tarflow.model_from_checkpoint(tarflow.load_checkpoint(path))
    torch.testing.assert_close(list(model.parameters())[0], list(first.ema.parameters())[0])


def test_corrupt_or_foreign_checkpoint_is_named(tmp_path):
    state = small_state()
    good = tarflow.save_checkpoint(tmp_path / "good.pt", state)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    with pytest.raises(tarflow.CheckpointError, match="bad.pt is corrupt"):
        tarflow.load_checkpoint(bad)
    torch.save({"weights": torch.zeros(1)}, tmp_path / "foreign.pt")
    with pytest.raises(tarflow.CheckpointError, match="not a tarflow checkpoint"):
        tarflow.load_checkpoint(tmp_path / "foreign.pt")
    with pytest.raises(tarflow.CheckpointError, match="does not exist"):
        tarflow.load_checkpoint(tmp_path / "missing.pt")
    other = make_train_state(TarFlow(TarFlowConfig.from_string("2-128-2-1", image_size=8, in_channels=1)),
                             TrainConfig())
    with pytest.raises(tarflow.CheckpointError, match="differs"):
        tarflow.restore(other, tarflow.load_checkpoint(good))
    assert good.exists() and not list(tmp_path.glob("*.tmp"))


def test_bf16_autocast_step_is_finite():
    state = small_state(bf16=True)
    x, y = batches(1)[0]
    m = train_step(state, x, y)
    assert math.isfinite(m["loss"]) and state.step == 1


def test_vp_variant_learns_its_prior_variance():
    torch.manual_seed(0)
    model = TarFlow(TarFlowConfig.from_string("2-64-1-1", image_size=8, in_channels=1, nvp=False))
    state = make_train_state(model, TrainConfig(total_steps=5))
    x = 3 * torch.randn(16, 1, 8, 8)
    train_step(state, x)
    assert model.prior_var.mean().item() > 1.5  # moved towards E[z²] ≈ 9


@pytest.mark.slow
def test_real_data_training_lowers_heldout_bpd():
    """A few hundred steps on scikit-learn's digits (real handwritten images) must learn a lot."""
    train = load_dataset(DataConfig(name="digits"), "train")
    val = load_dataset(DataConfig(name="digits"), "val")
    x_val = to_uint8(torch.stack([val[i][0] for i in range(len(val))]))
    torch.manual_seed(0)
    model = TarFlow(TarFlowConfig.from_string("2-64-2-2", image_size=8, in_channels=1))
    state = make_train_state(model, TrainConfig(lr=2e-3, min_lr=1e-5, total_steps=300, warmup_steps=20,
                                                noise="uniform"))
    g = torch.Generator().manual_seed(0)

    def heldout():
        with torch.no_grad():
            return tarflow.bits_per_dim(model, x_val, generator=torch.Generator().manual_seed(1)).mean().item()

    before = heldout()
    loader = torch.utils.data.DataLoader(train, batch_size=64, shuffle=True, drop_last=True, generator=g)
    while state.step < 300:
        for x, _ in loader:
            train_step(state, x)
            if state.step == 300:
                break
    after = heldout()
    print(f"digits held-out BPD: {before:.3f} -> {after:.3f}")
    assert after < before - 2.0, (before, after)  # seen: 8.88 -> 6.36
