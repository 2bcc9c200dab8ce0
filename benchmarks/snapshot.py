"""Code-snapshot cost on a large project: time and added disk of ``snapshot.snapshot`` per run.

A synthetic project of 50 folders x 100 ``.py`` files (1-2 KB each, 5,000 files) with its save root inside
it (``Saves/``, as the default config has it) is snapshotted into a fresh package folder per run:
1. a first, cold snapshot (every file hashed and stored once, one tree of hard links built);
2. unchanged re-snapshots, repeated; the claim is one ``stat`` per file plus a symlink;
3. a snapshot after modifying one file (one new object, a new tree of hard links).
Added disk is ``du -s --block-size=1`` of the save root (hard links counted once) after minus before, with
the package folder created before "before", so only the snapshot is counted. Interleaved with the unchanged
runs, a floor is timed side by side: ``os.walk`` + ``os.stat`` of every file, the least any stat-based
change detection must do, and the ratio snapshot/floor is printed.
Goals: an unchanged snapshot takes <= 0.3 s and adds <= 1% of the project's own disk usage.
"""
from __future__ import annotations

import os
import random
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from dlnest_jupyter.snapshot import snapshot

N_DIRS, N_FILES, UNCHANGED_RUNS = 50, 100, 5
GOAL_S, GOAL_DISK = 0.3, 0.01


def disk(path: Path) -> int:
    out = subprocess.run(["du", "-s", "--block-size=1", str(path)], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0])


def make_project(root: Path) -> None:
    rng = random.Random(0)
    for d in range(N_DIRS):
        folder = root / f"pkg_{d:02d}"
        folder.mkdir(parents=True)
        for f in range(N_FILES):
            lines = [f"def f_{d}_{f}_{i}(x):\n    return x * {rng.randint(0, 10**6)}\n"
                     for i in range(rng.randint(20, 40))]  # ~1-2 KB
            (folder / f"mod_{f:03d}.py").write_text("".join(lines))


def floor(project: Path, skip: Path) -> float:
    t = time.perf_counter()
    for dirpath, dirnames, filenames in os.walk(project):
        dirnames[:] = [n for n in dirnames if os.path.join(dirpath, n) != str(skip)]
        for name in filenames:
            os.stat(os.path.join(dirpath, name))
    return time.perf_counter() - t


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="dlnest_snapshot_") as tmp:
        project = Path(tmp) / "project"
        make_project(project)
        project_disk = disk(project)
        save_root = project / "Saves"
        save_root.mkdir()
        counter = iter(range(10**6))

        def one() -> tuple[float, int, str]:
            pkg = save_root / f"pkg_{next(counter):03d}"
            pkg.mkdir()
            before = disk(save_root)
            t = time.perf_counter()
            tree = snapshot(project, save_root, listed=[], excluded=[], dest=pkg / "code")
            dt = time.perf_counter() - t
            return dt, disk(save_root) - before, tree

        first = one()
        unchanged, floors = [], []
        for _ in range(UNCHANGED_RUNS):
            floors.append(floor(project, save_root))
            unchanged.append(one())
        edited = project / "pkg_07" / "mod_042.py"
        edited.write_text(edited.read_text() + "# edited\n")
        third = one()

    n_files = N_DIRS * N_FILES
    u_time = statistics.median(r[0] for r in unchanged)
    u_disk = max(r[1] for r in unchanged)
    rows = [("1st, cold", first[0], first[1]),
            (f"2nd, unchanged (median of {UNCHANGED_RUNS})", u_time, u_disk),
            ("3rd, one file modified", third[0], third[1])]
    print(f"synthetic project: {n_files} .py files in {N_DIRS} folders, {project_disk:,} bytes on disk (du)")
    print(f"{'run':<32} {'time s':>8} {'added disk B':>14} {'% of project':>13}")
    for name, t, d in rows:
        print(f"{name:<32} {t:>8.3f} {d:>14,} {100 * d / project_disk:>12.2f}%")
    print("unchanged runs, s: " + " ".join(f"{r[0]:.3f}" for r in unchanged)
          + f"; added disk max over them: {u_disk:,} B; same tree id as 1st: "
          + ("yes" if all(r[2] == first[2] for r in unchanged) else "NO")
          + f"; 3rd run new tree: {'yes' if third[2] != first[2] else 'NO'}")
    f_time = statistics.median(floors)
    print(f"floor (os.walk + os.stat of every file), median {f_time:.3f} s; ratio unchanged snapshot/floor: "
          f"{u_time / f_time:.1f}")
    print(f"goals for an unchanged snapshot: <= {GOAL_S} s: {'met' if u_time <= GOAL_S else 'NOT met'} "
          f"({u_time:.3f} s); <= {GOAL_DISK:.0%} added disk: "
          f"{'met' if u_disk <= GOAL_DISK * project_disk else 'NOT met'} ({100 * u_disk / project_disk:.2f}%)")


if __name__ == "__main__":
    main()
