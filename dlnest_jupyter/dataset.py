"""``Dataset``: builds the loaders. ``sampler()`` is the seam that makes user loaders DDP-ready."""
from __future__ import annotations

from typing import Any


class Dataset:
    """Subclass and implement ``init``."""

    rank: int = 0
    world_size: int = 1
    args: dict[str, Any]

    def _bind(self, args: dict[str, Any], rank: int = 0, world_size: int = 1) -> None:
        self.args, self.rank, self.world_size = args, rank, world_size

    def sampler(self, dataset: Any, shuffle: bool = True) -> Any:
        """A sampler for ``DataLoader(sampler=...)``: distributed across ranks under DDP, plain otherwise.

        The training loop calls ``set_epoch`` on distributed samplers, so shuffling differs per epoch."""
        import torch.utils.data as tud

        if self.world_size > 1:
            return tud.DistributedSampler(dataset, num_replicas=self.world_size, rank=self.rank, shuffle=shuffle)
        return tud.RandomSampler(dataset) if shuffle else tud.SequentialSampler(dataset)

    def init(self, args: dict[str, Any]) -> tuple[dict[str, Any], Any, Any]:
        """Return ``(info, train_loader, val_loader)``; ``info`` is passed to ``Model.init``."""
        raise NotImplementedError("Dataset.init(args) must return (info, train_loader, val_loader)")
