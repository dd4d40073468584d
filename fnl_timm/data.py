"""Datasets and transforms of the paper's vision experiments (paper section 4; docs/experiments.md).

* ``digits``: scikit-learn's 8x8 handwritten digits (1,797 images, embedded, no download),
  upsampled to 32x32 RGB; the default of ``fnl-train`` and the data of every smoke run.
* ``cifar10`` / ``cifar100``: torchvision's datasets through ``timm.data.create_dataset``
  (``--download`` fetches them).
* ``tiny-imagenet``: the Tiny-ImageNet-200 folder (``train/<wnid>/images``, ``val/images`` +
  ``val_annotations.txt``), 64x64.
* ``folder``: any ``<root>/train`` and ``<root>/val`` class-per-folder tree, through timm.

Training augmentation is the paper's: random crop with 4-pixel (1/8) zero padding and horizontal
flip, plus Cutout for WRN-28-10. Folder datasets of any size use timm's ``create_transform``.
"""
import os
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T

__all__ = ['DATASETS', 'DatasetInfo', 'DigitsDataset', 'TinyImageNet', 'Cutout', 'create_datasets']

DATASETS = ('digits', 'cifar10', 'cifar100', 'tiny-imagenet', 'folder')

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
TINY_MEAN, TINY_STD = (0.4802, 0.4481, 0.3975), (0.2770, 0.2691, 0.2821)


@dataclass
class DatasetInfo:
    num_classes: int
    input_size: Tuple[int, int, int]
    mean: Tuple[float, ...]
    std: Tuple[float, ...]


class DigitsDataset(Dataset):
    """scikit-learn's digits, upsampled (bilinear) to ``img_size`` and repeated to RGB.

    The split is fixed: a seeded permutation, the first 80% for ``train``, the rest ``val``.

    Args:
        split: 'train' or 'val'.
        img_size: output side (32 for the CIFAR models).
        transform: applied to the PIL image.
    """

    num_classes = 10

    def __init__(self, split: str = 'train', img_size: int = 32, transform: Optional[Callable] = None):
        if split not in ('train', 'val'):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if not isinstance(img_size, int) or img_size < 8:
            raise ValueError(f'img_size must be an int >= 8, got {img_size!r}')
        from sklearn.datasets import load_digits
        digits = load_digits()
        order = np.random.RandomState(0).permutation(len(digits.target))
        cut = int(0.8 * len(order))
        idx = order[:cut] if split == 'train' else order[cut:]
        images = torch.from_numpy(digits.images[idx]).float().div_(16.0).unsqueeze(1)  # (N, 1, 8, 8)
        images = torch.nn.functional.interpolate(images, size=(img_size, img_size), mode='bilinear',
                                                 align_corners=False)
        self.images = images.clamp_(0, 1).mul_(255).round_().to(torch.uint8)[:, 0].numpy()
        self.targets = [int(t) for t in digits.target[idx]]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        img = Image.fromarray(self.images[i], mode='L').convert('RGB')
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[i]


class TinyImageNet(Dataset):
    """Tiny-ImageNet-200 from its distribution folder (``wnids.txt``, ``train/``, ``val/``)."""

    num_classes = 200

    def __init__(self, root: str, split: str = 'train', transform: Optional[Callable] = None):
        if split not in ('train', 'val'):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        wnids_file = os.path.join(root, 'wnids.txt')
        if not os.path.isfile(wnids_file):
            raise ValueError(f'data_dir {root!r} is not a Tiny-ImageNet-200 folder: no wnids.txt '
                             '(download http://cs231n.stanford.edu/tiny-imagenet-200.zip and unzip it)')
        with open(wnids_file) as f:
            wnids = [w.strip() for w in f if w.strip()]
        index = {w: i for i, w in enumerate(wnids)}
        self.samples: List[Tuple[str, int]] = []
        if split == 'train':
            for w in wnids:
                folder = os.path.join(root, 'train', w, 'images')
                for name in sorted(os.listdir(folder)):
                    self.samples.append((os.path.join(folder, name), index[w]))
        else:
            with open(os.path.join(root, 'val', 'val_annotations.txt')) as f:
                for line in f:
                    parts = line.split('\t')
                    if len(parts) >= 2:
                        self.samples.append((os.path.join(root, 'val', 'images', parts[0]), index[parts[1]]))
        self.targets = [t for _, t in self.samples]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, target = self.samples[i]
        img = Image.open(path).convert('RGB')
        if self.transform is not None:
            img = self.transform(img)
        return img, target


class Cutout:
    """Cutout (DeVries & Taylor 2017): zero one ``size`` x ``size`` square at a random centre
    (clipped at the border) of a (C, H, W) tensor."""

    def __init__(self, size: int):
        if not isinstance(size, int) or size < 1:
            raise ValueError(f'cutout size must be a positive int, got {size!r}')
        self.size = size

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        h, w = img.shape[-2:]
        cy, cx = int(torch.randint(h, ())), int(torch.randint(w, ()))
        y0, y1 = max(0, cy - self.size // 2), min(h, cy + self.size - self.size // 2)
        x0, x1 = max(0, cx - self.size // 2), min(w, cx + self.size - self.size // 2)
        img = img.clone()
        img[..., y0:y1, x0:x1] = 0
        return img

    def __repr__(self) -> str:
        return f'Cutout(size={self.size})'


def paper_transforms(
        img_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        hflip: bool = True,
        cutout: int = 0,
) -> Tuple[Callable, Callable]:
    """(train, eval) transforms: pad-by-1/8 random crop (+ flip, + Cutout) / none."""
    train = [T.RandomCrop(img_size, padding=img_size // 8)]
    if hflip:
        train.append(T.RandomHorizontalFlip())
    train += [T.ToTensor(), T.Normalize(mean, std)]
    if cutout:
        train.append(Cutout(cutout))
    evaluate = T.Compose([T.ToTensor(), T.Normalize(mean, std)])
    return T.Compose(train), evaluate


def create_datasets(
        name: str = 'digits',
        data_dir: Optional[str] = None,
        img_size: Optional[int] = None,
        download: bool = False,
        hflip: Optional[bool] = None,
        cutout: int = 0,
) -> Tuple[Dataset, Dataset, DatasetInfo]:
    """(train, val, info) for one of :data:`DATASETS`.

    Args:
        name: dataset name.
        data_dir: root folder (needed by every dataset but ``digits``).
        img_size: input side; None = the dataset's (32, 64 for Tiny-ImageNet, 224 for folders).
        download: let torchvision download CIFAR.
        hflip: random horizontal flips; None = on, except for digits.
        cutout: Cutout square side (0 = off).
    """
    if name not in DATASETS:
        raise ValueError(f'dataset must be one of {DATASETS}, got {name!r}')
    if name != 'digits' and not data_dir:
        raise ValueError(f'dataset {name!r} needs data_dir (--data-dir)')
    if cutout and (not isinstance(cutout, int) or cutout < 0):
        raise ValueError(f'cutout must be an int >= 0, got {cutout!r}')
    if cutout and name == 'folder':
        raise ValueError("cutout is for the paper's CIFAR-style datasets, not dataset='folder' (timm's transforms)")
    if name == 'digits':
        size = img_size or 32
        train_ds, val_ds = DigitsDataset('train', size), DigitsDataset('val', size)
        flat = torch.from_numpy(train_ds.images).float().div(255)
        mean, std = (float(flat.mean()),) * 3, (float(flat.std()),) * 3
        info = DatasetInfo(10, (3, size, size), mean, std)
        hflip = False if hflip is None else hflip
    elif name in ('cifar10', 'cifar100'):
        from timm.data import create_dataset
        size = img_size or 32
        try:
            train_ds = create_dataset(f'torch/{name}', root=data_dir, split='train', download=download)
            val_ds = create_dataset(f'torch/{name}', root=data_dir, split='validation', download=download)
        except RuntimeError as e:  # torchvision: "Dataset not found or corrupted"
            if download:
                raise
            raise ValueError(f'data_dir (--data-dir) {data_dir!r} holds no {name} data ({e}); '
                             'add download=True (--download) to fetch it') from None
        mean, std = (CIFAR10_MEAN, CIFAR10_STD) if name == 'cifar10' else (CIFAR100_MEAN, CIFAR100_STD)
        info = DatasetInfo(10 if name == 'cifar10' else 100, (3, size, size), mean, std)
    elif name == 'tiny-imagenet':
        size = img_size or 64
        train_ds, val_ds = TinyImageNet(data_dir, 'train'), TinyImageNet(data_dir, 'val')
        info = DatasetInfo(200, (3, size, size), TINY_MEAN, TINY_STD)
    else:
        from timm.data import create_dataset, create_transform, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
        size = img_size or 224
        if not os.path.isdir(data_dir):
            raise ValueError(f'data_dir (--data-dir) {data_dir!r} is not a folder (dataset folder reads '
                             f'<data_dir>/train/<class>/*.png and <data_dir>/val/<class>/*.png)')
        try:
            train_ds = create_dataset('', root=data_dir, split='train', is_training=True)
            val_ds = create_dataset('', root=data_dir, split='val')
        except RuntimeError as e:  # timm's folder reader: "Found 0 images in subfolders of ..."
            raise ValueError(f'data_dir (--data-dir) {data_dir!r}: {str(e).splitlines()[0]} (dataset folder reads '
                             f'<data_dir>/train/<class>/ and <data_dir>/val/<class>/)') from None
        num_classes = len(train_ds.reader.class_to_idx)
        info = DatasetInfo(num_classes, (3, size, size), IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
        train_ds.transform = create_transform(size, is_training=True, hflip=0.5 if hflip is not False else 0.0)
        val_ds.transform = create_transform(size, is_training=False)
        return train_ds, val_ds, info
    hflip = True if hflip is None else hflip
    train_ds.transform, val_ds.transform = paper_transforms(size, info.mean, info.std, hflip, cutout)
    return train_ds, val_ds, info
