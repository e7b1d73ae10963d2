"""Pieces of the orchestrated training and evaluation that need no Ray: the data order of a resumed epoch, its
independence of the number of workers, and FID statistics combined from shards."""

import numpy as np
import torch
from torch.utils.data import TensorDataset

from orchestrator.evaluation import FeatureMoments
from orchestrator.train_loop import epoch_batches, rank_share
from tarflow.fid import FIDStatistics


def batches_of(dataset, epoch, skip, global_batch, rank, world):
    return [y.tolist() for _, y in epoch_batches(dataset, epoch, skip, global_batch, rank, world, seed=3,
                                                 num_workers=0)]


def test_resuming_mid_epoch_gives_the_batches_an_uninterrupted_run_would():
    data = TensorDataset(torch.zeros(103, 1), torch.arange(103))
    for rank in range(2):
        full = batches_of(data, epoch=1, skip=0, global_batch=16, rank=rank, world=2)
        assert len(full) == 103 // 16
        assert batches_of(data, epoch=1, skip=3, global_batch=16, rank=rank, world=2) == full[3:]
    assert batches_of(data, 2, 0, 16, 0, 2) != batches_of(data, 1, 0, 16, 0, 2)  # a new order every epoch


def test_a_global_step_sees_the_same_images_whatever_the_number_of_workers():
    data = TensorDataset(torch.zeros(96, 1), torch.arange(96))
    global_batch = 16

    def steps(world):
        per_rank = [batches_of(data, 0, 0, global_batch, r, world) for r in range(world)]
        return [sorted(sum((per_rank[r][s] for r in range(world)), [])) for s in range(len(per_rank[0]))]

    assert steps(1) == steps(2) == steps(4) == steps(3) == steps(5)  # 3 and 5 do not divide the batch


def test_rank_r_holds_positions_r_plus_world_times_i_of_the_global_batch():
    """The positions train_loop gives train_step (they key each image's flip, noise and label drop)."""
    data = TensorDataset(torch.zeros(96, 1), torch.arange(96))
    whole = batches_of(data, 0, 0, 16, 0, 1)
    for world in (2, 3, 4):
        for rank in range(world):
            mine = batches_of(data, 0, 0, 16, rank, world)
            positions = rank_share(16, rank, world).tolist()
            assert positions == list(range(rank, 16, world))
            assert all([whole[s][p] for p in positions] == mine[s] for s in range(len(whole)))


def test_feature_moments_of_shards_equal_the_statistics_of_all_features():
    feats = torch.randn(50, 7, dtype=torch.float64)
    moments = FeatureMoments(7, torch.device("cpu"))
    for shard in feats.split(13):  # as ranks and batches add theirs
        moments.add(shard.float())
    combined = moments.statistics()
    direct = FIDStatistics.from_features(feats.float())
    assert combined.count == direct.count == 50
    np.testing.assert_allclose(combined.mu, direct.mu, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(combined.sigma, direct.sigma, rtol=1e-5, atol=1e-6)
