"""The page faults of each timed call of ``fastllm bench``, per contender: the measurement
behind the bench's kept C heap (fastllm.bench.common.HEAP_TUNABLES), which shows whose
outputs are page-faulted afresh on every call under glibc's defaults.

    PYTHONPATH=. python benchmarks/micro/bench_call_faults.py FAMILY PATTERN [PATTERN ...]
        [--system-heap] [--last 8]

Runs ``fastllm bench FAMILY --only PATTERN ... --no-thp-rerun --in-process`` in a child
process -- with glibc's malloc defaults (``--system-heap``) or with the bench's kept heap --
whose timed calls are wrapped to count the process's minor page faults (getrusage) around
each; prints the bench's table, then per case and contender the time (ms) and page faults of
its last ``--last`` calls.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

CHILD = r"""
import collections, resource, sys
import fastllm.bench.common as common

calls = collections.defaultdict(list)
names = {}
build = common.Case.build
def named_build(self, contender, inputs, backend, device=common.CPU):
    call = build(self, contender, inputs, backend, device)
    names[id(call)] = f"{self.id} {contender}"
    return call
common.Case.build = named_build
call_seconds = common._call_seconds
def counted(fn, device):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    seconds = call_seconds(fn, device)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    if id(fn) in names:
        calls[names[id(fn)]].append((seconds * 1e3, faults))
    return seconds
common._call_seconds = counted

from fastllm.cli import main
family, last, patterns = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
status = main(["bench", family, *[a for p in patterns for a in ("--only", p)],
               "--no-thp-rerun", "--in-process"])
print(f"per call (its last {last}): time ms / page faults")
for name, taken in calls.items():
    print(f"  {name}: " + ", ".join(f"{ms:.2f}/{faults}" for ms, faults in taken[-last:]))
sys.exit(status)
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("family")
    parser.add_argument("patterns", nargs="+", metavar="PATTERN")
    parser.add_argument("--system-heap", action="store_true",
                        help="glibc's malloc defaults instead of the bench's kept heap")
    parser.add_argument("--last", type=int, default=8)
    args = parser.parse_args()

    from fastllm.bench.common import kept_heap_env, system_heap_env

    # glibc's malloc defaults (other tunables stay), or the bench's kept heap
    env = (system_heap_env if args.system_heap else kept_heap_env)(dict(os.environ))
    command = [sys.executable, "-c", CHILD, args.family, str(args.last), *args.patterns]
    return subprocess.run(command, env=env, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
