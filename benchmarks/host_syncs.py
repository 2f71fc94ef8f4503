"""Host synchronisations per step of every algorithm configuration, side by side.

A host sync is a call that hands a tensor's value to Python (``item``, ``tolist``,
``float()``, ``int()``, ``bool()``, indexing with a tensor, ``torch.equal``, ...): on a GPU
each one stalls the training loop until the device has caught up. The counter is the one
of ``tests/test_devices.py`` (``HostSyncCounter``): it counts such calls made by the
training thread inside ``after_backward`` and ``after_step`` (never in ``metrics()``),
in a real gloo world of 2 on the small model of that test.

    python benchmarks/host_syncs.py                       # this checkout
    python benchmarks/host_syncs.py --src /tmp/before/src --src src   # two versions

With ``--src`` each source tree runs in its own process (``PYTHONPATH``) and the columns
are printed side by side. Per configuration: the syncs at each step (steps with and
without communication) and their mean per step, rank 0, and the kinds seen.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent / "tests"


def measure(steps: int, dtype: str) -> dict[str, dict]:
    """Per configuration label: per-step sync counts (rank 0 and the max over ranks) and the
    kinds of call seen."""
    sys.path.insert(0, str(TESTS))
    from test_devices import CONFIGS, WORLD, drive
    from worlds import run_world

    results = run_world(drive, WORLD, list(CONFIGS), [dtype], steps)
    out = {}
    for label in CONFIGS:
        per_rank = [r[label, dtype]["syncs"] for r in results]
        kinds: Counter[str] = Counter()
        for rank_steps in per_rank:
            for counts in rank_steps:
                kinds.update(counts)
        out[label] = {
            "rank0": [sum(c.values()) for c in per_rank[0]],
            "max": [max(sum(r[s].values()) for r in per_rank) for s in range(steps)],
            "kinds": dict(kinds),
        }
    return out


def _run_tree(src: str, steps: int, dtype: str) -> dict[str, dict]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(Path(src).resolve()), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    proc = subprocess.run([sys.executable, __file__, "--json", "--steps", str(steps),
                           "--dtype", dtype], env=env, capture_output=True, text=True,
                          check=False)
    if proc.returncode:
        raise SystemExit(f"{src}: failed\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _cell(entry: dict | None) -> str:
    if entry is None:
        return "-"
    per_step = entry["max"]
    return f"{' '.join(str(n) for n in per_step)} ({sum(per_step) / len(per_step):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4,
                        help="steps per configuration (periods are 2 or 1)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16",
                                                                "float16"))
    parser.add_argument("--src", action="append", default=[],
                        help="a source tree to measure (repeatable); default: this checkout")
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.json:
        print(json.dumps(measure(args.steps, args.dtype)))
        return
    trees = args.src or [str(HERE.parent / "src")]
    columns = {src: _run_tree(src, args.steps, args.dtype) for src in trees}
    labels = list(dict.fromkeys(label for col in columns.values() for label in col))
    width = max(len(label) for label in labels) + 2
    cell = max(14, 3 * args.steps + 8)
    print(f"host syncs per step (max over ranks; mean per step in brackets), world 2, "
          f"{args.dtype}, steps 0..{args.steps - 1}")
    for i, src in enumerate(trees):
        print(f"  [{i}] {src}")
    print("config".ljust(width) + "".join(f"[{i}]".ljust(cell) for i in range(len(trees)))
          + "kinds (last column)")
    last = columns[trees[-1]]
    for label in labels:
        row = label.ljust(width)
        row += "".join(_cell(columns[src].get(label)).ljust(cell) for src in trees)
        kinds = last.get(label, {}).get("kinds", {})
        row += ", ".join(f"{k} x{v}" for k, v in sorted(kinds.items())) or "-"
        print(row)


if __name__ == "__main__":
    main()
