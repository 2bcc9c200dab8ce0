"""Framework overhead: the MNIST example trained through dlnest vs. the same work in a hand-written loop.

Both sides run the example's default config (digits data, batch 32, num_workers 0, seed 0, MNISTCNN, Adam
lr 3e-3, StepLR(4, 0.5)) for EPOCHS epochs on the CPU with one torch thread, and both time everything from
seeding to the last checkpoint (data loading, model build, training steps, a validation pass per epoch, a
checkpoint per epoch as the example's freq config asks, prints every 20 steps into a swallowed stdout):

- dlnest: ``training.train(pkg)`` on a fresh save package (package creation and code snapshot not timed);
  besides the above it runs the life-cycle hooks, writes metrics.jsonl per step, the record, the manifest
  and retention, and writes checkpoints atomically with fsync.
- plain: a for-loop calling the same model class and data helper, ``torch.save`` of the same state
  (registered objects, life-cycle state, log, epoch/iter, RNG streams) per epoch, no fsync.

The variants alternate (order swapped every round, as many rounds as fit in ~2 minutes); wall and process
CPU medians, the median of per-round ratios and the time dlnest spent inside ``os.fsync`` are printed. Both runs must end with identical losses/accuracies.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from dlnest_jupyter.config import load_config
from dlnest_jupyter.package import SavePackage
from dlnest_jupyter.scaffold import new_project
from dlnest_jupyter.training import train

EPOCHS, MAX_ROUNDS, MIN_ROUNDS, BUDGET_S = 8, 15, 5, 150.0
GOAL = 1.02

_fsync_s = 0.0
_real_fsync = os.fsync


def _timed_fsync(fd):  # counts the durability cost (only dlnest calls fsync)
    global _fsync_s
    t = time.perf_counter()
    try:
        return _real_fsync(fd)
    finally:
        _fsync_s += time.perf_counter() - t


def _import(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _since(t0: tuple[float, float]) -> tuple[float, float]:
    t1 = _clock()
    return t1[0] - t0[0], t1[1] - t0[1]


def run_dlnest(project: Path) -> tuple[tuple[float, float], float, list, list]:
    cfg = load_config(project / "root_config.json", overrides=[f"epochs={EPOCHS}"])
    pkg = SavePackage.create(cfg, command=["benchmarks/overhead.py"])
    fsync_before = _fsync_s
    with contextlib.redirect_stdout(io.StringIO()):
        t = _clock()
        run = train(pkg, torch.device("cpu"), command=["benchmarks/overhead.py"])
        dt = _since(t)
    return dt, _fsync_s - fsync_before, run.log["loss"], run.log["acc"]


def run_plain(args: dict, cnn_cls, load_digits, ckpt_dir: Path) -> tuple[tuple[float, float], float, list, list]:
    with contextlib.redirect_stdout(io.StringIO()):
        t = _clock()
        seed = args["seed"]
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        d, m = args["dataset"], args["model"]
        x_tr, y_tr, x_va, y_va = load_digits(d["val_fraction"])
        mean, std = x_tr.mean(), x_tr.std()
        train_ds = TensorDataset(torch.from_numpy((x_tr - mean) / std), torch.from_numpy(y_tr))
        val_ds = TensorDataset(torch.from_numpy((x_va - mean) / std), torch.from_numpy(y_va))
        train_loader = DataLoader(train_ds, batch_size=d["batch_size"], shuffle=True, num_workers=d["num_workers"])
        val_loader = DataLoader(val_ds, batch_size=d["val_batch_size"])
        net = cnn_cls(10, m["hidden"], m["dropout"])
        opt = torch.optim.Adam(net.parameters(), lr=m["lr"])
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
        log, it, best = {"loss": [], "acc": []}, 0, 0.0
        for epoch in range(1, args["epochs"] + 1):
            net.train()
            for x, y in train_loader:
                loss = F.cross_entropy(net(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                log["loss"].append(loss.detach().item())
                if it % args["freq"]["visualize_every"] == 0:
                    recent = log["loss"][-20:]
                    print(f"epoch {epoch - 1} iter {it}: loss {sum(recent) / len(recent):.4f}")
                it += 1
            net.eval()
            correct = total = 0
            with torch.no_grad():
                for x, y in val_loader:
                    correct += (net(x).argmax(1) == y).sum().item()
                    total += y.numel()
            log["acc"].append(torch.tensor(correct / max(total, 1)).item())
            sched.step()
            best = max(best, log["acc"][-1])
            if epoch % args["freq"]["save_every"] == 0:
                state = {"model": {"net": net.state_dict(), "optimizer": opt.state_dict(),
                                   "scheduler": sched.state_dict()},
                         "life_cycle": {"best_acc": best}, "log": log, "epoch": epoch, "iter": it,
                         "rng": {"python": random.getstate(), "numpy": np.random.get_state(),
                                 "torch": torch.get_rng_state()}}
                torch.save(state, ckpt_dir / f"epoch_{epoch:06d}.ckpt")
            print(f"epoch {epoch} | iter {it} | loss {log['loss'][-1]:.4g} | acc {log['acc'][-1]:.4g}")
        print(f"best validation accuracy: {best:.4f}")
        dt = _since(t)
    return dt, 0.0, log["loss"], log["acc"]


def main() -> None:
    torch.set_num_threads(1)
    os.fsync = _timed_fsync
    with tempfile.TemporaryDirectory(prefix="dlnest_overhead_") as tmp:
        project = new_project(Path(tmp) / "mnist", mnist=True)
        args = load_config(project / "root_config.json", overrides=[f"epochs={EPOCHS}"]).args
        cnn_cls = _import(project / "Model" / "MNISTCNN.py", "_bench_plain_mnistcnn").MNISTCNN
        load_digits = _import(project / "Dataset" / "Dataset.py", "_bench_plain_dataset").load_digits
        ckpt_root = Path(tmp) / "plain_ckpts"
        variants = {
            "dlnest": lambda: run_dlnest(project),
            "plain": lambda: run_plain(args, cnn_cls, load_digits, Path(tempfile.mkdtemp(dir=ckpt_root))),
        }
        ckpt_root.mkdir()
        results = {name: fn() for name, fn in variants.items()}  # warm-up (imports, sklearn data, allocator)
        same = results["dlnest"][2:] == results["plain"][2:]
        wall: dict[str, list[float]] = {k: [] for k in variants}
        cpu: dict[str, list[float]] = {k: [] for k in variants}
        fsyncs: list[float] = []
        start = time.monotonic()
        for rnd in range(MAX_ROUNDS):
            if rnd >= MIN_ROUNDS and time.monotonic() - start > BUDGET_S:
                break
            for name in (("dlnest", "plain") if rnd % 2 == 0 else ("plain", "dlnest")):
                (w, c), fs, loss, acc = variants[name]()
                wall[name].append(w)
                cpu[name].append(c)
                same &= (loss, acc) == tuple(results[name][2:])
                if name == "dlnest":
                    fsyncs.append(fs)
    med = lambda d, k: statistics.median(d[k])  # noqa: E731
    paired = statistics.median(a / b for a, b in zip(wall["dlnest"], wall["plain"]))
    ratio, cpu_ratio = med(wall, "dlnest") / med(wall, "plain"), med(cpu, "dlnest") / med(cpu, "plain")
    print(f"MNIST example (digits), {EPOCHS} epochs x {len(results['plain'][2]) // EPOCHS} steps, batch "
          f"{args['dataset']['batch_size']}, 1 torch thread, CPU; {len(wall['plain'])} interleaved rounds "
          f"after 1 warm-up each")
    print("  dlnest: training.train() on a fresh package (hooks, metrics.jsonl, record, fsynced atomic "
          "checkpoint + manifest + retention)")
    print("  plain : hand-written loop, same model/optimizer/scheduler/data, validation + torch.save of the "
          "same state per epoch (no fsync)")
    print(f"{'variant':<8} {'wall med s':>10} {'min':>6} {'max':>6} {'cpu med s':>10}   wall runs")
    for k in variants:
        print(f"{k:<8} {med(wall, k):>10.3f} {min(wall[k]):>6.2f} {max(wall[k]):>6.2f} {med(cpu, k):>10.3f}   "
              + " ".join(f"{x:.2f}" for x in wall[k]))
    print(f"dlnest time in os.fsync: median {statistics.median(fsyncs):.3f} s per run")
    print(f"ratio dlnest/plain: wall {ratio:.3f} (medians), {paired:.3f} (median of paired rounds), "
          f"cpu {cpu_ratio:.3f}; goal <= {GOAL}: {'met' if ratio <= GOAL else 'NOT met'}")
    print(f"identical losses and accuracies on both sides: {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
