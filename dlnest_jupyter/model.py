"""``Model``: the user's training logic. The framework owns devices, DDP wrapping and checkpointing of
everything registered, so user code stays a plain PyTorch step."""
from __future__ import annotations

from typing import Any

import torch

from .errors import DLNestError


def to_device(batch: Any, device: torch.device) -> Any:
    """Move tensors nested in tuples, lists and dicts to ``device``; other values pass through."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(to_device(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


class Model:
    """Subclass and implement ``init`` and ``run_one_step``; the rest has sensible defaults."""

    device: torch.device = torch.device("cpu")
    rank: int = 0
    world_size: int = 1
    args: dict[str, Any]

    def _bind(self, args: dict[str, Any], device: torch.device, rank: int = 0, world_size: int = 1) -> None:
        """Called by the framework before ``init`` (so user classes need no ``__init__`` of their own)."""
        self.args, self.device, self.rank, self.world_size = args, device, rank, world_size
        self._registered: dict[str, Any] = {}

    # -- framework services -------------------------------------------------------------------------
    def register(self, obj: Any, name: str | None = None, sync_batchnorm: bool = False) -> Any:
        """Register a module, optimizer or LR scheduler: modules move to ``self.device``; all are checkpointed.

        Returns the object to use: the module itself, or under DDP its ``DistributedDataParallel`` wrapper
        (``sync_batchnorm=True`` converts its BatchNorm layers to SyncBatchNorm first)."""
        if not hasattr(obj, "state_dict") or not hasattr(obj, "load_state_dict"):
            raise DLNestError(f"register() takes modules, optimizers and schedulers, not {type(obj).__name__}")
        if name is None:
            base = type(obj).__name__
            name, n = base, 1
            while name in self._registered:
                n += 1
                name = f"{base}_{n}"
        elif name in self._registered:
            raise DLNestError(f"register(): the name {name!r} is already taken")
        if isinstance(obj, torch.nn.Module):
            obj = obj.to(self.device)
            if self.world_size > 1:
                from torch.nn.parallel import DistributedDataParallel

                if sync_batchnorm:
                    obj = torch.nn.SyncBatchNorm.convert_sync_batchnorm(obj)
                ids = [self.device] if self.device.type == "cuda" else None
                obj = DistributedDataParallel(obj, device_ids=ids)
        self._registered[name] = obj
        return obj

    @staticmethod
    def _plain(obj: Any) -> Any:
        """The module inside a DDP wrapper (checkpoints hold plain modules, loadable at any world size)."""
        return getattr(obj, "module", obj) if type(obj).__name__ == "DistributedDataParallel" else obj

    def to_device(self, batch: Any) -> Any:
        """Move a batch (tensors in nested tuples/lists/dicts) to ``self.device``, e.g. in ``validate``."""
        return to_device(batch, self.device)

    def reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        """Mean of ``t`` over all ranks (``t`` itself when training on one process)."""
        if self.world_size == 1:
            return t
        import torch.distributed as dist

        t = t.detach().clone()
        dist.all_reduce(t)
        return t / self.world_size

    def state_dict(self) -> dict[str, Any]:
        return {name: self._plain(obj).state_dict() for name, obj in self._registered.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = set(self._registered) - set(state)
        if missing:
            raise DLNestError(f"checkpoint lacks registered objects: {', '.join(sorted(missing))}")
        for name, obj in self._registered.items():
            self._plain(obj).load_state_dict(state[name])

    def modules(self) -> list[torch.nn.Module]:
        return [m for m in self._registered.values() if isinstance(m, torch.nn.Module)]

    def train(self, mode: bool = True) -> None:
        """Put every registered module in training (or eval) mode."""
        for m in self.modules():
            m.train(mode)

    def eval(self) -> None:
        self.train(False)

    # -- user hooks ---------------------------------------------------------------------------------
    def init(self, args: dict[str, Any], dataset_info: dict[str, Any]) -> None:
        raise NotImplementedError("Model.init(args, dataset_info) must build and register the modules")

    def init_optimizer(self) -> None:
        """Build and register optimizers and schedulers (called after ``init``, modules already on device)."""

    def init_log(self) -> dict[str, Any]:
        """The log dict: lists in it that grow are written to ``metrics.jsonl``."""
        return {}

    def run_one_step(self, batch: Any, log: dict[str, Any], iter: int, epoch: int) -> None:
        raise NotImplementedError("Model.run_one_step(batch, log, iter, epoch) must do one training step")

    def validate(self, val_loader: Any, log: dict[str, Any]) -> None:
        """Evaluate on ``val_loader`` and append results to ``log``."""

    def visualize(self, log: dict[str, Any], iter: int, epoch: int) -> None:
        """Report progress (print, plot, TensorBoard)."""
