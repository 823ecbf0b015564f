"""Bytes communicated per step and accuracy after the same number of steps, FC-MNIST on W CPU
processes: RBD with shared bases, RBD with independent bases, DDP + SGD with the random-bases
communication hook, and DDP + SGD with its usual all-reduce of the whole gradient.

    python -m benchmarks.comm_bench --nproc 2 --steps 600 --out benchmarks/results/comm

Each scheme is one ``torchrun --standalone --nproc_per_node=W -m examples.distributed_mnist``
run (gloo, one thread per process); its JSON is collected into ``comm_bench.json`` and a markdown
table ``comm_bench.md`` under ``--out``. Bytes are counted by the code that calls the collectives:
the payload is the size of the message a rank hands to each collective (the coefficients, or the
gradient buckets for DDP, counted by a pass-through hook around DDP's own all-reduce); the ring
figure is what ring algorithms make each rank send for it.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

SCHEMES = ("shared", "independent", "hook", "ddp")
REPO = Path(__file__).resolve().parent.parent


def run_scheme(scheme: str, args: argparse.Namespace, out: Path) -> dict:
    path = out / f"{scheme}.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
               "-m", "examples.distributed_mnist", "--scheme", scheme, "--steps", str(args.steps),
               "--batch-size", str(args.batch_size), "--distribution", args.distribution,
               "--seed", str(args.seed), "--json", str(path), "--no-progress"]
    if args.data_root:
        command += ["--data-root", args.data_root]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    done = subprocess.run(command, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=args.timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{scheme}: torchrun exited with {done.returncode}:\n{done.stderr[-4000:]}")
    result = json.loads(path.read_text())
    result["wall_seconds"] = time.perf_counter() - start
    return result


def fmt_bytes(n: float) -> str:
    return f"{n / 1024:,.1f} KiB" if n >= 1024 else f"{n:,.0f} B"


def markdown(results: list[dict]) -> str:
    dense = next((r["comm_per_step"]["payload_bytes"] for r in results if r["scheme"] == "ddp"), None)
    header = ("| scheme | collective | payload / step / rank | ring: sent / step / rank | DDP payload ÷ this "
              "| s / step | val acc % | test acc % |")
    lines = [header, "|---|---|---|---|---|---|---|---|"]
    kind = {"shared": "all-reduce of Σd coefficients", "independent": "all-gather of Σd coefficients",
            "hook": "all-reduce of d per bucket", "ddp": "all-reduce of the gradient"}
    for r in results:
        c = r["comm_per_step"]
        ratio = f"{dense / c['payload_bytes']:,.0f}×" if dense else "–"
        lines.append(f"| {r['scheme']} | {kind[r['scheme']]} | {fmt_bytes(c['payload_bytes'])} | "
                     f"{fmt_bytes(c['ring_sent_bytes'])} | {ratio} | {r['seconds_per_step']:.3f} | "
                     f"{r['val_acc']:.2f} | {r['test_acc']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc", type=int, default=2, help="processes (ranks)")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=32, help="images per rank per step")
    p.add_argument("--distribution", default="rademacher", choices=("normal", "uniform", "rademacher"),
                   help="entries of the random bases (default rademacher: the fastest CPU kernel)")
    p.add_argument("--schemes", nargs="+", default=list(SCHEMES), choices=SCHEMES)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-root")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per scheme")
    p.add_argument("--out", default="results/comm_bench")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = [run_scheme(s, args, out) for s in tqdm(args.schemes, desc="schemes")]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], check=False, cwd=REPO,
                            capture_output=True, text=True).stdout.strip() or "unknown"
    report = {"command": " ".join(["python -m benchmarks.comm_bench", *(argv or sys.argv[1:])]),
              "machine": {"platform": platform.platform(), "processor": platform.processor(),
                          "cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version()},
              "commit": commit, "results": results}
    (out / "comm_bench.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(results)
    (out / "comm_bench.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
