#!/usr/bin/env python
"""Run every benchmark of bench/ in turn (`make bench`); exit 1 if any missed its figures.

Each script can also run alone; see bench/README.md for what they measure and their options.
"""

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHES = [
    ["pipeline_bench.py"],
    ["viewers_bench.py"],
    ["roles_bench.py"],
    ["node_bench.py"],
    ["rollout_bench.py"],
    ["rollout_bench.py", "--no-big", "--rounds", "2", "--activation-seconds", "2"],
    ["fleet_bench.py"],
    ["sync_bench.py"],
    ["jump_bench.py"],
    ["audit_bench.py"],
    ["audit_bench.py", "--database-url", "postgres://postgres@127.0.0.1:5432/panel_audit_bench"],
]


def main() -> int:
    failed = []
    for args in BENCHES:
        print(f"\n=== {' '.join(args)} ===", flush=True)
        if subprocess.run([sys.executable, str(HERE / args[0]), *args[1:]], cwd=HERE.parent).returncode != 0:
            failed.append(" ".join(args))
    if failed:
        print("\nmissed figures in: " + ", ".join(failed))
        return 1
    print("\nall benchmarks met their figures")
    return 0


if __name__ == "__main__":
    sys.exit(main())
