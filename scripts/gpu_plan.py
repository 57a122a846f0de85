#!/usr/bin/env python3
"""The device calls of the next GPU lease, worked out here from the files on disk, so that
nothing is computed under the clock (docs/gpu-plan.md).

  python3 scripts/gpu_plan.py prepare --wheel WHEEL   # .gpu/ort (parts), .gpu/testset, .gpu/compact
  python3 scripts/gpu_plan.py [--json FILE]           # the calls in order: carry, command, MiB, seconds

The plan: the onnxruntime-gpu wheel in parts, one run each, back to back (ignored files stay
on the machine only while it is warm); the last part travels with the test images and runs
the ONNX Runtime CUDA sections; then either that run again (if it failed) or the rest run
(GPU-marked tests, a trained small model and its CUDA parity). Seconds are the section
budgets of scripts/gpu_check.sh (`GPU_CHECK_LIST=1`), which carry their own arithmetic,
plus CALL_S per call. Exits 1 when a call would carry more than the device tool takes, a
file is missing, or the lease does not hold the plan.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_ort import CARRY_LIMIT, REPO, checkout_bytes, part_size, split  # noqa: E402

LEASE_S = 900  # device time of a session, start-up, transfers and idle time included
START_S = 120  # starting the machine (1-2 minutes, ../shared/GPU.md)
CALL_S = 15  # per call: sending the tree and the turn between calls (not measured yet: no call timed so far)
PART_S = 5  # the command of a part run: `ls`
ORT, TESTSET, COMPACT = Path(".gpu/ort"), Path(".gpu/testset"), Path(".gpu/compact")
TEST_IMAGES = 1000  # the test images beside the last part: bench --limit 256, parity 32..1000 in the ORT sections
ORT_SECTIONS = ("env", "ort_join", "ort_probe", "ort_b16", "ort_policy", "ort_graphs")
REST_SECTIONS = ("env", "data", "gpu_tests", "cifar_small_run", "ort_probe", "ort_small")


@dataclass(frozen=True)
class Call:
    """One `run` of the device tool."""

    name: str
    carry: tuple[Path, ...]
    command: str
    seconds: int
    when: str

    def carried_bytes(self, repo: Path) -> int:
        return sum(_size(repo / p) for p in self.carry)


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def budgets() -> dict[str, int]:
    """Each section's budget in seconds, as scripts/gpu_check.sh states it."""
    listed = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh")], env={**os.environ, "GPU_CHECK_LIST": "1"},
                            capture_output=True, text=True, check=True).stdout
    return {name: int(budget) for name, budget in (line.split() for line in listed.splitlines())}


def check_command(sections: tuple[str, ...]) -> str:
    return f"OUT=$OUT GPU_CHECK_SECTIONS={','.join(s for s in sections if s != 'env')} bash scripts/gpu_check.sh"


def calls(repo: Path) -> list[Call]:
    """The lease's calls in order; the last two are alternatives (a rerun of the ORT run, or the rest)."""
    record = json.loads((repo / ORT / "wheel.json").read_text())
    parts = [ORT / p["name"] for p in record["parts"]]
    seconds = budgets()

    def run_seconds(sections: tuple[str, ...]) -> int:
        return CALL_S + sum(seconds[s] for s in sections)

    sequence = [Call(f"part {i + 1} of {len(parts)}", (ORT / "wheel.json", part), "ls -l .gpu/ort", CALL_S + PART_S,
                     "back to back: start the next call at once") for i, part in enumerate(parts[:-1])]
    ort = (ORT / "wheel.json", parts[-1], TESTSET)
    sequence.append(Call("ort", ort, check_command(ORT_SECTIONS), run_seconds(ORT_SECTIONS),
                         "at once after the last part run"))
    sequence.append(Call("ort again", ort, check_command(ORT_SECTIONS), run_seconds(ORT_SECTIONS),
                         "only if the ort run failed for a reason a rerun mends (instead of 'rest')"))
    sequence.append(Call("rest", (COMPACT,), check_command(REST_SECTIONS), run_seconds(REST_SECTIONS),
                         "if the ort run succeeded, while the machine is warm; then give_back"))
    return sequence


def plan(repo: Path = REPO) -> dict:
    """The calls with their bytes and seconds, and the problems that stop the plan."""
    if not (repo / ORT / "wheel.json").is_file():
        raise SystemExit(f"error: no {ORT}/wheel.json: run `python3 scripts/gpu_plan.py prepare --wheel WHEEL` first")
    checkout = checkout_bytes(repo)
    problems, rows = [], []
    for call in calls(repo):
        missing = [str(p) for p in call.carry if not (repo / p).exists()]
        carried = call.carried_bytes(repo)
        if missing:
            problems.append(f"{call.name}: missing {', '.join(missing)} (run `gpu_plan.py prepare`)")
        if checkout + carried > CARRY_LIMIT:
            problems.append(f"{call.name}: {(checkout + carried) / 2**20:.2f} MiB is over the 64 MiB one call carries")
        rows.append({"call": call.name, "carry": [str(p) for p in call.carry], "command": call.command,
                     "timeout_s": call.seconds - CALL_S + 30, "mib": round((checkout + carried) / 2**20, 2),
                     "margin_mib": round((CARRY_LIMIT - checkout - carried) / 2**20, 2), "seconds": call.seconds,
                     "when": call.when})
    *chain, again, rest = rows
    total = START_S + sum(r["seconds"] for r in chain) + max(again["seconds"], rest["seconds"])
    if total > LEASE_S:
        problems.append(f"the plan takes {total} s of the lease's {LEASE_S} s")
    return {"lease_s": LEASE_S, "start_s": START_S, "call_s": CALL_S, "checkout_mib": round(checkout / 2**20, 2),
            "calls": rows, "total_s": total, "spare_s": LEASE_S - total, "problems": problems}


def prepare(wheel: Path, data_dir: Path, repo: Path = REPO) -> None:
    """Everything the plan carries: the wheel's parts, the test images for the ORT run, the compact bundles."""
    record = split(wheel, repo / ORT, part_size(checkout_bytes(repo)))
    print(f"{len(record['parts'])} parts in {ORT}")
    with open(data_dir / "cifar-10-batches-py" / "test_batch", "rb") as f:
        test = pickle.load(f, encoding="latin1")
    folder = repo / TESTSET / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"batch_label": f"the first {TEST_IMAGES} test images", "data": np.ascontiguousarray(test["data"][:TEST_IMAGES]),
                     "labels": list(test["labels"][:TEST_IMAGES])}, f, protocol=4)
    if (data_dir / "cifar-10-batches-py" / "batches.meta").is_file():
        shutil.copyfile(data_dir / "cifar-10-batches-py" / "batches.meta", folder / "batches.meta")
    print(f"the first {TEST_IMAGES} test images in {TESTSET}")
    shutil.copytree(data_dir / "compact", repo / COMPACT, dirs_exist_ok=True, copy_function=shutil.copyfile)
    print(f"the compact bundles in {COMPACT}")


def show(result: dict) -> None:
    print(f"checkout {result['checkout_mib']} MiB; start-up {result['start_s']} s; {result['call_s']} s per call "
          "for sending and turning (not measured)")
    for i, row in enumerate(result["calls"], 1):
        print(f"\n{i}. {row['call']} ({row['when']}): {row['mib']} MiB (margin {row['margin_mib']}), "
              f"<= {row['seconds']} s")
        print(f"   run carry={json.dumps(row['carry'])} timeout_s={row['timeout_s']}")
        print(f"   command: {row['command']}")
    print(f"\ntotal {result['total_s']} s of {result['lease_s']} ({result['spare_s']} s spare), "
          "counting the longer of 'ort again' and 'rest'")
    for problem in result["problems"]:
        print(f"problem: {problem}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="also write the plan as JSON")
    verbs = parser.add_subparsers(dest="verb")
    p = verbs.add_parser("prepare")
    p.add_argument("--wheel", type=Path, required=True, help="the onnxruntime-gpu wheel for Python 3.12")
    p.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data",
                   help="folder with cifar-10-batches-py and compact/")
    args = parser.parse_args()
    if args.verb == "prepare":
        prepare(args.wheel, args.data_dir)
        return
    result = plan()
    show(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    sys.exit(1 if result["problems"] else 0)


if __name__ == "__main__":
    main()
