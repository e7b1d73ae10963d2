"""uint8 images and the dataset they become: the pixel conversions and the base dataset that data, prepared
and fid share. It imports none of them, so the arrows run one way: data -> prepared -> images, fid ->
prepared, fid -> images.

Every dataset yields (x, y): x (C, H, W) float32 = u8/127.5 - 1, so (x + 1)·127.5 rounds back to the exact
stored byte (the likelihood in bits/dim is defined on those integers), and y an int64 class.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from .randomness import flip_coin, sample_key


class ImageDataset(Dataset):
    """uint8 images (in memory, or decoded by a subclass's `image`) -> (x in [-1, 1], label).

    flip: mirror image i when flip_coin(sample_key(seed, epoch, i)) says so, a function of (seed, epoch,
    index) alone (set_epoch), so it is the same in every DataLoader worker and after a restart. Training
    flips through TrainConfig.flip instead (keyed by the sample's step and position, like its noise), with
    datasets built with flip=False.
    """

    def __init__(self, labels: torch.Tensor, num_classes: int, channels: int, image_size: int, flip: bool,
                 images: torch.Tensor | None = None):
        self.images = images  # (N, C, S, S) uint8, or None when a subclass decodes per item
        self.labels = labels  # (N,) int64
        self.num_classes = num_classes
        self.channels = channels
        self.image_size = image_size
        self.flip = flip
        self.flip_seed = 0
        self.epoch = 0

    def set_epoch(self, epoch: int, seed: int = 0) -> None:
        """The flips of (seed, epoch). Call it before the epoch's DataLoader iterator starts: worker processes
        take their copy of the dataset then (persistent workers keep the copy of their first epoch)."""
        self.epoch, self.flip_seed = epoch, seed

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, i: int) -> torch.Tensor:
        """The stored (C, S, S) uint8 image."""
        return self.images[i]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.image(i)
        if self.flip and flip_coin(sample_key(self.flip_seed, self.epoch, int(i))):
            x = x.flip(-1)
        return x.float() / 127.5 - 1, self.labels[i]


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Inverse of the dataset scaling: [-1, 1] floats -> the uint8 pixels they came from."""
    return ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def decode_photo(file, image_size: int, channels: int) -> torch.Tensor:
    """A photo (path or binary file) as (channels, S, S) uint8: RGB, shorter side resized to S, centre-cropped.
    Shared by image_folder and the data preparation, so prepared pixels equal these."""
    from PIL import Image
    from torchvision.transforms.v2 import functional as TF

    with Image.open(file) as img:
        img = img.convert("RGB")
    img = TF.center_crop(TF.resize(img, [image_size], antialias=True), [image_size, image_size])
    return to_channels(TF.pil_to_tensor(img)[None], channels)[0]


# ---------------------------------------------------------------------------------------------
# Pixel conversions on (N, C, H, W) uint8 batches


def to_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """Gray -> RGB by repeating; RGB -> gray by the rounded channel mean (integer arithmetic, exact)."""
    if x.shape[1] == channels:
        return x
    if channels == 3:
        return x.expand(-1, 3, -1, -1).contiguous()
    total = x.to(torch.int16).sum(1, keepdim=True)
    return ((total + 1) // 3).to(torch.uint8)  # (s + 1) // 3 == round(s / 3), as s / 3 never ends in .5


def fit_size(x: torch.Tensor, size: int, fit: str) -> torch.Tensor:
    """Centre-pad with black, or resize the shorter side and centre-crop, to size × size."""
    h, w = x.shape[-2:]
    if (h, w) == (size, size):
        return x
    if fit == "pad":
        top, left = (size - h) // 2, (size - w) // 2
        return torch.nn.functional.pad(x, (left, size - w - left, top, size - h - top))
    from torchvision.transforms.v2 import functional as TF

    return TF.center_crop(TF.resize(x, [size], antialias=True), [size, size])
