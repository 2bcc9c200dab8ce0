"""A run's live objects, built from a save package: what training, ``continue`` and analysis share."""
from __future__ import annotations

import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import Checkpoints
from .config import ProjectConfig
from .dataset import Dataset
from .errors import DLNestError
from .lifecycle import LifeCycle
from .model import Model
from .package import SavePackage
from .usercode import ROLES, UserCodeError, call_user, import_classes

BASES = {"Model": Model, "Dataset": Dataset, "LifeCycle": LifeCycle}


def resolve_device(cpu: bool) -> torch.device:
    """``--cpu`` means the CPU; otherwise a CUDA device must exist (a GPU task never silently runs on CPU)."""
    if cpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DLNestError("no CUDA GPU is available on this machine; add --cpu to run on the CPU")
    return torch.device("cuda", torch.cuda.current_device())


def seed_everything(seed: int) -> None:
    """The config's ``seed``: makes a fresh run repeatable (a continued one restores the saved streams)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state(loaders: dict[str, Any]) -> dict[str, Any]:
    """Every random stream a run draws from, as plain types and tensors."""
    np_state = np.random.get_state(legacy=False)
    state = {
        "python": random.getstate(),
        "numpy": {**np_state, "state": {"key": np_state["state"]["key"].tolist(), "pos": np_state["state"]["pos"]}},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
        "loaders": {name: gen.get_state() for name, gen in loaders.items()},
    }
    return state


def set_rng_state(state: dict[str, Any], loaders: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np_state = state["numpy"]
    np.random.set_state({**np_state, "state": {"key": np.array(np_state["state"]["key"], dtype=np.uint32),
                                                "pos": np_state["state"]["pos"]}})
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for name, gen in loaders.items():
        if name in state["loaders"]:
            gen.set_state(state["loaders"][name])


def loader_generators(train_loader: Any, val_loader: Any) -> dict[str, torch.Generator]:
    """Generators owned by the loaders or their samplers (they drive shuffling when the user passes one)."""
    found = {}
    for lname, loader in (("train", train_loader), ("val", val_loader)):
        for part, obj in (("loader", loader), ("sampler", getattr(loader, "sampler", None))):
            gen = getattr(obj, "generator", None)
            if isinstance(gen, torch.Generator) and all(gen is not g for g in found.values()):
                found[f"{lname}.{part}"] = gen
    return found


@dataclass
class Run:
    """The user's objects for one package, ready to train or analyse (the ``self`` of analysis scripts)."""

    package: SavePackage
    config: ProjectConfig
    device: torch.device
    model: Model
    dataset: Dataset
    life_cycle: LifeCycle
    dataset_info: dict[str, Any]
    train_loader: Any
    val_loader: Any
    log: dict[str, Any]
    rank: int = 0
    world_size: int = 1
    epoch: int = 0  #: completed epochs
    iter: int = 0  #: completed steps
    checkpoint_epoch: int | None = None  #: the checkpoint loaded, if any
    checkpoints: Checkpoints = field(init=False)

    def __post_init__(self) -> None:
        self.checkpoints = Checkpoints(self.package.checkpoints_dir, self.config.checkpoint_args)

    @property
    def args(self) -> dict[str, Any]:
        return self.config.args

    @property
    def record(self) -> dict[str, Any]:
        return self.package.record()

    @property
    def code_dir(self) -> Path:
        return self.config.project_dir

    @classmethod
    def build(cls, package: SavePackage, device: torch.device, *, rank: int = 0, world_size: int = 1,
              private_prefix: str | None = None) -> "Run":
        """Import the snapshot's classes and run the user's ``init`` hooks.

        A failure here is a set-up mistake: it becomes one line naming the user's file, without traceback."""
        try:
            return cls._build(package, device, rank, world_size, private_prefix)
        except UserCodeError as exc:
            raise DLNestError(str(exc)) from exc

    @classmethod
    def _build(cls, package: SavePackage, device: torch.device, rank: int, world_size: int,
               private_prefix: str | None) -> "Run":
        cfg = package.config()
        code = cfg.project_dir
        classes = import_classes(cfg, private_prefix)
        for role, base in BASES.items():
            if not issubclass(classes[role], base):
                raise DLNestError(f"{cfg.args[ROLES[role][0]]}: class {classes[role].__name__} must subclass dlnest_jupyter.{role}")
        args = cfg.args
        dataset = classes["Dataset"]()
        dataset._bind(args, rank, world_size)
        result = call_user(code, f"{type(dataset).__name__}.init", dataset.init, args)
        if not (isinstance(result, tuple) and len(result) == 3 and isinstance(result[0], dict)):
            raise DLNestError(f"{cfg.args['dataset_file_path']}: {type(dataset).__name__}.init must return "
                              f"(info: dict, train_loader, val_loader)")
        info, train_loader, val_loader = result
        model = classes["Model"]()
        model._bind(args, device, rank, world_size)
        call_user(code, f"{type(model).__name__}.init", model.init, args, info)
        call_user(code, f"{type(model).__name__}.init_optimizer", model.init_optimizer)
        log = call_user(code, f"{type(model).__name__}.init_log", model.init_log)
        if not isinstance(log, dict):
            raise DLNestError(f"{cfg.args['model_file_path']}: {type(model).__name__}.init_log must return a dict")
        life_cycle = classes["LifeCycle"]()
        life_cycle._bind(model, dataset)
        return cls(package, cfg, device, model, dataset, life_cycle, info, train_loader, val_loader, log,
                   rank, world_size)

    @property
    def generators(self) -> dict[str, torch.Generator]:
        return loader_generators(self.train_loader, self.val_loader)

    def state(self) -> dict[str, Any]:
        """Everything a checkpoint holds, taken at an epoch boundary. Under DDP every rank must call it: the
        RNG streams of all ranks are gathered (rank 0 writes them; each rank restores its own)."""
        rng = rng_state(self.generators)
        if self.world_size > 1:
            import torch.distributed as dist

            ranks: list[Any] = [None] * self.world_size
            dist.all_gather_object(ranks, rng)
            rng = {"per_rank": ranks}
        return {
            "model": self.model.state_dict(),
            "life_cycle": self.life_cycle.state_dict(),
            "log": self.log,
            "epoch": self.epoch,
            "iter": self.iter,
            "world_size": self.world_size,
            "rng": rng,
        }

    def restore(self, epoch: int | None = None, rng: bool = True) -> None:
        """Load the newest (or ``epoch``'s) checkpoint into the live objects."""
        state = self.checkpoints.load(epoch, map_location=self.device)
        code = self.code_dir
        call_user(code, "Model.load_state_dict", self.model.load_state_dict, state["model"])
        call_user(code, "LifeCycle.load_state_dict", self.life_cycle.load_state_dict, state["life_cycle"])
        self.log, self.epoch, self.iter = state["log"], state["epoch"], state["iter"]
        self.checkpoint_epoch = state["epoch"]
        if rng:
            saved = state["rng"]
            if "per_rank" in saved:
                if len(saved["per_rank"]) != self.world_size:
                    raise DLNestError(f"checkpoint of epoch {self.epoch} was written by {len(saved['per_rank'])} "
                                      f"ranks; continue with the same number for an exact resume")
                saved = saved["per_rank"][self.rank]
            set_rng_state(saved, self.generators)


def prepare_import_path(live_project: Path) -> None:
    """Keep the live project off ``sys.path`` (``python -m`` adds the cwd), so only the snapshot imports."""
    live = live_project.resolve()
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != live]
