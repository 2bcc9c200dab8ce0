"""Checkpoint stall: what a checkpoint costs the training loop, and whether dlnest's background save overlaps training.

``train_loop`` calls ``Checkpoints.save_in_background`` once per epoch: it copies the state to host memory
(``to_host``) and writes it on a thread (temp file + fsync + rename + manifest + retention); the loop only
blocks on the copy. The claim checked here: the stall per checkpoint is no more than that copy, and the write
itself is hidden behind the next training steps. On one model (an MLP of 2048x2048 Linear layers, Adam state
populated, ~100 MB checkpoint, CPU, one torch thread) each repetition times, in a rotating order:

- copy      : ``to_host(state)``, the copy a safe background save must make (training mutates the tensors);
- floor     : ``copy_`` of every tensor into buffers allocated once, the copy without fresh allocations;
- plain     : a synchronous ``torch.save(state, path)`` without fsync, what a hand-written loop would do;
- durable   : a synchronous ``Checkpoints.save`` (dlnest's write path: temp file, fsync, rename, manifest);
- steps     : N training steps (forward/backward/Adam on a fixed batch) with no save in flight;
- bg        : ``save_in_background`` (timed until it returns: the dlnest stall), then the same N steps, then
              ``wait()`` for the rest of the write. The module's ``to_host`` is wrapped with a timer so the
              stall splits into its own copy and the handoff (thread start, then getting the GIL back from
              the writer, which starts pickling at once).

N is calibrated so that N steps take ~1.5x a durable save, so the write can be fully hidden in principle.
``os.sync()`` runs (untimed) before every item, so no item pays for an earlier item's writeback. The hidden
fraction is 1 - (bg steps + remaining wait - steps alone) / durable save: 1 means the write added nothing to
the training time after the stall, 0 means it cost as much as a synchronous save. Ratios are medians of the
per-repetition ratios; the stall goal is judged against the copy timed inside the same call, because a
separately timed ``to_host`` swings 2-4x with the allocator (fresh pages fault in or are reused). The last background checkpoint is loaded back and compared with the state it was
taken from, to show the overlapped steps did not leak into it.
"""
from __future__ import annotations

import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import dlnest_jupyter.checkpoint as dl_checkpoint
from dlnest_jupyter.checkpoint import Checkpoints, to_host
from dlnest_jupyter.engine import rng_state

WIDTH, DEPTH, BATCH, REPS, MAX_STEPS = 2048, 2, 64, 15, 40
POLICY = {"max_ckpt_in_fast_track": 1, "max_ckpt_in_slow_track": 0, "dilation_in_slow_track": 0,
          "max_ckpt_in_consistent_track": 0}


def build() -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for _ in range(DEPTH):
        layers += [torch.nn.Linear(WIDTH, WIDTH), torch.nn.ReLU()]
    net = torch.nn.Sequential(*layers, torch.nn.Linear(WIDTH, 10))
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    return net, opt, torch.randn(BATCH, WIDTH), torch.randint(0, 10, (BATCH,))


def steps(net, opt, x, y, n: int, log: dict) -> None:
    for _ in range(n):
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        log["loss"].append(loss.item())


def make_state(net, opt, log: dict, epoch: int) -> dict:  # shaped like engine.Run.state()
    return {"model": {"net": net.state_dict(), "optimizer": opt.state_dict()}, "life_cycle": {},
            "log": log, "epoch": epoch, "iter": len(log["loss"]), "rng": rng_state({})}


def tensors(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in tensors(v)]
    return []


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    torch.set_num_threads(1)
    inner_copy: list[float] = []

    def timed_to_host(state):  # save_in_background's own copy, to split its stall into copy + thread handoff
        t = time.perf_counter()
        host = to_host(state)
        inner_copy.append(time.perf_counter() - t)
        return host

    dl_checkpoint.to_host = timed_to_host  # restored below
    net, opt, x, y = build()
    log = {"loss": [float(i) for i in range(1000)]}
    steps(net, opt, x, y, 3, log)  # populate Adam's state
    size_mb = sum(t.numel() * t.element_size() for t in tensors(make_state(net, opt, log, 0))) / 2**20
    with tempfile.TemporaryDirectory(prefix="dlnest_ckpt_bench_") as tmp:
        root = Path(tmp)
        sync_ck, bg_ck = Checkpoints(root / "sync", POLICY), Checkpoints(root / "bg", POLICY)
        plain_path = root / "plain.ckpt"
        buffers = [t.clone() for t in tensors(make_state(net, opt, log, 0))]
        reference = [t.clone() for t in tensors(make_state(net, opt, log, 0))]

        # warm-up and calibration of N
        step_s = min(timed(lambda: steps(net, opt, x, y, 1, log)) for _ in range(3))
        to_host(make_state(net, opt, log, 0))
        torch.save(make_state(net, opt, log, 0), plain_path)
        save_s = min(timed(lambda: sync_ck.save(make_state(net, opt, log, e), e, 0)) for e in (1, 2))
        n = max(3, min(MAX_STEPS, math.ceil(1.5 * save_s / step_s)))

        def bg(epoch: int, out: dict) -> None:
            t0 = time.perf_counter()
            bg_ck.save_in_background(make_state(net, opt, log, epoch), epoch, 0)
            t1 = time.perf_counter()
            steps(net, opt, x, y, n, log)
            t2 = time.perf_counter()
            bg_ck.wait()
            out.update(stall=t1 - t0, handoff=t1 - t0 - inner_copy[-1], bg_steps=t2 - t1,
                       wait=time.perf_counter() - t2)

        keys = ["copy", "floor", "plain", "durable", "steps", "bg"]
        res: dict[str, list[float]] = {k: [] for k in ["copy", "floor", "plain", "durable", "steps", "stall",
                                                        "handoff", "bg_steps", "wait"]}
        for rep in range(REPS):
            epoch = 10 + rep
            items = {
                "copy": lambda: res["copy"].append(timed(lambda: to_host(make_state(net, opt, log, epoch)))),
                "floor": lambda: res["floor"].append(timed(
                    lambda: [b.copy_(t) for b, t in zip(buffers, tensors(make_state(net, opt, log, epoch)))])),
                "plain": lambda: res["plain"].append(timed(
                    lambda: torch.save(make_state(net, opt, log, epoch), plain_path))),
                "durable": lambda: res["durable"].append(timed(
                    lambda: sync_ck.save(make_state(net, opt, log, epoch), epoch, 0))),
                "steps": lambda: res["steps"].append(timed(lambda: steps(net, opt, x, y, n, log))),
            }
            for k in keys[rep % len(keys):] + keys[:rep % len(keys)]:
                os.sync()
                if k == "bg":
                    if rep == REPS - 1:  # reference for the final check, into the preallocated buffers
                        for b, t in zip(reference, tensors(make_state(net, opt, log, epoch))):
                            b.copy_(t)
                    out: dict[str, float] = {}
                    bg(epoch, out)
                    for name, v in out.items():
                        res[name].append(v)
                else:
                    items[k]()
        saved = bg_ck.load()
        same = all(torch.equal(a, b) for a, b in zip(tensors(saved["model"]), reference))  # model tensors come first
        leftovers = sorted(p.name for p in (root / "bg").iterdir())
    dl_checkpoint.to_host = to_host

    med = {k: statistics.median(v) for k, v in res.items()}
    paired = lambda f: statistics.median(f(i) for i in range(REPS))  # noqa: E731
    r = res
    stall_plain = paired(lambda i: r["stall"][i] / r["plain"][i])
    stall_durable = paired(lambda i: r["stall"][i] / r["durable"][i])
    stall_copy = paired(lambda i: r["stall"][i] / r["copy"][i])
    stall_own = paired(lambda i: r["stall"][i] / (r["stall"][i] - r["handoff"][i]))
    stall_floor = paired(lambda i: r["stall"][i] / r["floor"][i])
    slowdown = paired(lambda i: r["bg_steps"][i] / r["steps"][i])
    hidden = paired(lambda i: 1 - (r["bg_steps"][i] + r["wait"][i] - r["steps"][i]) / r["durable"][i])
    net_gain = paired(lambda i: 1 - (r["stall"][i] + r["bg_steps"][i] + r["wait"][i] - r["steps"][i])
                      / r["durable"][i])

    print(f"MLP {DEPTH}x Linear({WIDTH},{WIDTH}) + head, Adam; checkpoint tensors {size_mb:.1f} MB; CPU, "
          f"torch.set_num_threads(1), {os.cpu_count()} cores; {REPS} interleaved reps (rotating order, "
          f"os.sync() before each item), medians")
    print(f"overlap window: N={n} training steps (step ~{step_s * 1e3:.0f} ms, batch {BATCH}); "
          f"target ~1.5x a durable save")
    rows = [("copy", "to_host(state) (dlnest's copy to host memory)"),
            ("floor", "copy_ into buffers allocated once (copy floor)"),
            ("plain", "torch.save(state, path), no fsync (sync stall)"),
            ("durable", "Checkpoints.save: tmp+fsync+rename+manifest (sync stall)"),
            ("stall", "save_in_background() until it returns (dlnest stall)"),
            ("handoff", "  of which not its to_host: thread start + taking the GIL back"),
            ("steps", f"{n} training steps, nothing in flight"),
            ("bg_steps", f"{n} training steps while the background write runs"),
            ("wait", "wait() for the rest of the background write")]
    print(f"{'item':<9} {'median ms':>10} {'min':>8} {'max':>8}  what")
    for k, what in rows:
        print(f"{k:<9} {med[k] * 1e3:>10.1f} {min(res[k]) * 1e3:>8.1f} {max(res[k]) * 1e3:>8.1f}  {what}")
    print(f"dlnest stall / plain torch.save      : {stall_plain:.3f}")
    print(f"dlnest stall / durable sync save     : {stall_durable:.3f}")
    print(f"dlnest stall / copy-to-host          : {stall_copy:.3f}  (copy timed separately; noisy, since to_host's "
          f"fresh allocations page-fault or not)")
    print(f"dlnest stall / its own to_host       : {stall_own:.3f}  (goal <= 1, up to 1.05 = thread start) -> "
          f"{'met' if stall_own <= 1.05 else 'NOT met'}")
    print(f"dlnest stall / copy floor            : {stall_floor:.3f}")
    print(f"training slowdown while writing      : {slowdown:.3f}x  (bg steps / steps alone; GIL + CPU sharing)")
    print(f"hidden fraction of the write         : {hidden:.2f}  (1 - (bg steps + wait - steps) / durable save)")
    print(f"net saving vs synchronous durable    : {net_gain:.2f}  of a durable save per checkpoint (stall included)")
    print(f"last background checkpoint equals the state at save time: {'yes' if same else 'NO'}; "
          f"files left in its folder: {', '.join(leftovers)}")


if __name__ == "__main__":
    main()
