"""``LifeCycle``: hooks around the run, each epoch and each step, and the predicates that steer it.

``epoch`` in the predicates counts completed epochs (1 after the first one)."""
from __future__ import annotations

from typing import Any


class LifeCycle:
    model: Any
    dataset: Any

    def _bind(self, model: Any, dataset: Any) -> None:
        self.model, self.dataset = model, dataset

    def before_all(self) -> None: ...
    def after_all(self) -> None: ...
    def before_epoch(self, epoch: int) -> None: ...
    def after_epoch(self, epoch: int) -> None: ...
    def before_step(self, iter: int, epoch: int) -> None: ...
    def after_step(self, iter: int, epoch: int) -> None: ...
    def before_validation(self) -> None: ...
    def after_validation(self) -> None: ...
    def before_save(self) -> None: ...
    def after_save(self) -> None: ...

    def need_validation(self, epoch: int, log: dict[str, Any], args: dict[str, Any]) -> bool:
        return True

    def need_visualize(self, epoch: int, iter: int, log: dict[str, Any], args: dict[str, Any]) -> bool:
        return False

    def need_save(self, epoch: int, log: dict[str, Any], args: dict[str, Any]) -> bool:
        return True

    def hold_checkpoint(self, epoch: int, log: dict[str, Any], args: dict[str, Any]) -> bool:
        """Keep this epoch's checkpoint in the kept track (e.g. the best validation score so far)."""
        return False

    def need_continue(self, epoch: int, log: dict[str, Any], args: dict[str, Any]) -> bool:
        """Asked before every epoch; the default trains for ``args["epochs"]`` epochs (1 if unset)."""
        return epoch < int(args.get("epochs", 1))

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...
