"""MNIST-style digits: real MNIST from IDX files under data_root, or scikit-learn's bundled digits offline."""
import gzip
import urllib.request
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

import dlnest_jupyter

MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "val_images": "t10k-images-idx3-ubyte",
    "val_labels": "t10k-labels-idx1-ubyte",
}


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped): magic 0x00 0x00 dtype ndim, big-endian dims, then data."""
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4)
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(tuple(int(d) for d in dims))


def find_or_download(root: Path, name: str) -> Path:
    for candidate in (root / name, root / f"{name}.gz"):
        if candidate.exists():
            return candidate
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"{name}.gz"
    try:
        with urllib.request.urlopen(MNIST_URL + target.name, timeout=30) as response:
            target.write_bytes(response.read())
    except OSError as exc:
        raise RuntimeError(
            f"MNIST file {name} is not in {root} and could not be downloaded ({exc}); "
            f"put the IDX files there or set dataset.source to \"digits\""
        ) from None
    return target


def load_mnist(root: Path):
    arrays = {key: read_idx(find_or_download(root, name)) for key, name in MNIST_FILES.items()}
    to_x = lambda a: a.astype(np.float32)[:, None] / 255.0  # noqa: E731
    return (to_x(arrays["train_images"]), arrays["train_labels"].astype(np.int64),
            to_x(arrays["val_images"]), arrays["val_labels"].astype(np.int64))


def load_digits(val_fraction: float):
    from sklearn.datasets import load_digits as sk_digits

    digits = sk_digits()
    x = (digits.images.astype(np.float32) / 16.0)[:, None]
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(y))  # a fixed split, independent of the run's seed
    n_val = int(len(y) * val_fraction)
    val, train = order[:n_val], order[n_val:]
    return x[train], y[train], x[val], y[val]


class MNISTDataset(dlnest_jupyter.Dataset):
    def init(self, args):
        cfg = args["dataset"]
        if cfg["source"] == "mnist":
            x_train, y_train, x_val, y_val = load_mnist(Path(args["data_root"]))
        else:
            x_train, y_train, x_val, y_val = load_digits(cfg["val_fraction"])
        mean, std = x_train.mean(), x_train.std()
        norm = lambda a: torch.from_numpy((a - mean) / std)  # noqa: E731
        train = TensorDataset(norm(x_train), torch.from_numpy(y_train))
        val = TensorDataset(norm(x_val), torch.from_numpy(y_val))
        train_loader = DataLoader(train, batch_size=cfg["batch_size"], sampler=self.sampler(train, shuffle=True),
                                  num_workers=cfg["num_workers"])
        val_loader = DataLoader(val, batch_size=cfg["val_batch_size"], sampler=self.sampler(val, shuffle=False))
        info = {"num_classes": 10, "image_size": x_train.shape[-1], "train_size": len(train), "val_size": len(val)}
        return info, train_loader, val_loader
