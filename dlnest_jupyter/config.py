"""Loading a project's configuration: the root config, its child JSONs, a freq config and ``--set`` overrides.

The merged result is a plain dict (``args``) handed to user code; the root config's own bookkeeping keys
(file paths, class names, save root) are resolved here so the rest of the engine never re-reads JSON.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from .errors import DLNestError
from .usercode import check_classes

#: Keys of the root config that name files; any other top-level ``*_file_path(s)`` key is a typo.
FILE_KEYS = ("model_file_path", "dataset_file_path", "life_cycle_file_path")
FILE_LIST_KEYS = ("other_file_paths", "child_jsons")
CLASS_KEYS = {"model_name": "Model", "dataset_name": "Dataset", "life_cycle_name": "LifeCycle"}

DEFAULT_CHECKPOINT_ARGS = {
    "max_ckpt_in_fast_track": 2,
    "max_ckpt_in_slow_track": 0,
    "dilation_in_slow_track": 100,
    "max_ckpt_in_consistent_track": 1,
}


@dataclass
class ProjectConfig:
    """A fully merged configuration and where it came from."""

    args: dict[str, Any]
    root_path: Path  #: the root config file
    sources: list[Path] = field(default_factory=list)  #: every JSON file merged, in merge order

    @property
    def project_dir(self) -> Path:
        return self.root_path.parent

    def path_of(self, key: str) -> Path:
        """Absolute path of a file key (paths in configs are relative to the root config's folder)."""
        return (self.project_dir / self.args[key]).resolve()

    @property
    def save_root(self) -> Path:
        return (self.project_dir / self.args.get("save_root", "./Saves")).resolve()

    @property
    def checkpoint_args(self) -> dict[str, int]:
        return {**DEFAULT_CHECKPOINT_ARGS, **self.args.get("checkpoint_args", {})}

    def listed_files(self) -> list[Path]:
        """Files the config names explicitly (always part of the code snapshot)."""
        files = [self.path_of(k) for k in FILE_KEYS]
        files += [(self.project_dir / p).resolve() for p in self.args.get("other_file_paths", [])]
        return files + list(self.sources)


def read_json(path: Path, what: str = "config") -> dict[str, Any]:
    """Read a JSON object, turning every failure into one line that names the file (and line/column)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DLNestError(f"{what} file not found: {path}") from None
    except OSError as exc:
        raise DLNestError(f"cannot read {what} file {path}: {exc.strerror}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DLNestError(f"{path}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}") from None
    if not isinstance(data, dict):
        raise DLNestError(f"{path}: a config file must hold a JSON object, not {type(data).__name__}")
    return data


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` wins; nested dicts merge key by key instead of replacing each other."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _load_tree(path: Path, chain: tuple[Path, ...], sources: list[Path]) -> dict[str, Any]:
    """A config with its ``child_jsons`` merged in order (children override the parent, later ones earlier)."""
    if path in chain:
        cycle = " -> ".join(p.name for p in (*chain, path))
        raise DLNestError(f"{chain[-1]}: child_jsons form a cycle: {cycle}")
    data = read_json(path)
    sources.append(path)
    children = data.get("child_jsons", [])
    if not isinstance(children, list) or not all(isinstance(c, str) for c in children):
        raise DLNestError(f"{path}: child_jsons must be a list of paths")
    merged = {k: v for k, v in data.items() if k != "child_jsons"}
    for child in children:
        child_path = (path.parent / child).resolve()
        if not child_path.is_file():
            raise DLNestError(f"{path}: child_jsons names a missing file: {child}")
        merged = deep_merge(merged, _load_tree(child_path, (*chain, path), sources))
    return merged


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b=3`` -> (["a", "b"], 3). Values are JSON when they parse as JSON, else plain strings."""
    key, sep, raw = item.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(parts):
        raise DLNestError(f"--set expects key=value (dotted keys for nested values), got {item!r}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return parts, value


def apply_overrides(args: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    for item in overrides:
        parts, value = parse_override(item)
        node = args
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise DLNestError(f"--set {item}: {'.'.join(parts[: depth + 1])} is not a nested object")
            node = child
        node[parts[-1]] = value
    return args


def _validate(cfg: ProjectConfig) -> None:
    args, root = cfg.args, cfg.root_path
    for key in args:
        if (key.endswith("_file_path") and key not in FILE_KEYS) or (
            key.endswith("_file_paths") and key not in FILE_LIST_KEYS
        ):
            known = ", ".join(FILE_KEYS + FILE_LIST_KEYS)
            raise DLNestError(f"{root}: unknown file key {key!r} (known: {known})")
    for key in (*FILE_KEYS, *CLASS_KEYS):
        if not isinstance(args.get(key), str) or not args[key]:
            raise DLNestError(f"{root}: missing required key {key!r}")
    for key in FILE_KEYS:
        if not cfg.path_of(key).is_file():
            raise DLNestError(f"{root}: {key} names a missing file: {args[key]}")
    for rel in args.get("other_file_paths", []):
        if not (cfg.project_dir / rel).exists():
            raise DLNestError(f"{root}: other_file_paths names a missing file: {rel}")
    ckpt = args.get("checkpoint_args", {})
    if not isinstance(ckpt, dict) or not all(
        isinstance(v, int) and v >= 0 for k, v in ckpt.items() if k in DEFAULT_CHECKPOINT_ARGS
    ):
        raise DLNestError(f"{root}: checkpoint_args must map track settings to non-negative integers")


def load_config(
    root: str | Path, freq: str | Path | None = None, overrides: Iterable[str] = ()
) -> ProjectConfig:
    """Merge root config + child JSONs, then the freq config, then ``--set`` overrides, and validate."""
    root_path = Path(root).expanduser().resolve()
    sources: list[Path] = []
    args = _load_tree(root_path, (), sources)
    if freq is not None:
        freq_path = Path(freq).expanduser().resolve()
        args = deep_merge(args, _load_tree(freq_path, (), sources))
    args = apply_overrides(args, overrides)
    if isinstance(args.get("data_root"), str):  # user code reads it from any cwd, and continue from any later one
        args["data_root"] = str((root_path.parent / args["data_root"]).resolve())
    cfg = ProjectConfig(args=args, root_path=root_path, sources=sources)
    _validate(cfg)
    check_classes(cfg)
    return cfg
