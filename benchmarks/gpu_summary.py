"""The last stage of benchmarks/gpu_check.sh: one JSON of the whole run, and the tables for summary.md.

    python -m benchmarks.gpu_summary DIR     # DIR: the check's folder (stages.tsv, its stages' outputs)

Writes DIR/gpu_check.json: the commit (``git rev-parse HEAD``, else $RBD_COMMIT), the device
(nvidia-smi's GPU name, else the CPU), torch and Python versions, every stage's result and time,
the SM clock samples' range, and every stage's own JSON (probe, launch_count, each ops_bench run),
with the issue's throughput targets checked for the fused ops at D = 1e8, d = 1000, fp32. Appends
the tables to DIR/summary.md. Exits non-zero when a stage did not pass.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks import common

# Issue 19: H200, D = 1e8, d = 1000, fp32, G entries/s per product.
TARGETS = {("normal", "project"): 1300, ("normal", "expand"): 1350, ("uniform", "project"): 1500,
           ("uniform", "expand"): 1800, ("rademacher", "project"): 7500, ("rademacher", "expand"): 15000}
TARGET_SHAPE = (100_000_000, 1000)


def _run(cmd: list[str]) -> str | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=common.REPO).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def stages(folder: Path) -> list[dict]:
    rows = []
    path = folder / "stages.tsv"
    for line in path.read_text().splitlines() if path.exists() else []:
        name, result, seconds, status = line.split("\t")
        rows.append({"stage": name, "result": result, "seconds": int(seconds), "passed": status == "0"})
    return rows


def sm_clock(folder: Path) -> dict | None:
    """min / median / max of the SM clock samples (nvidia-smi, MHz) in clocks.csv, if any."""
    path = folder / "clocks.csv"
    if not path.exists():
        return None
    mhz = []
    for line in path.read_text().splitlines()[1:]:
        cells = [c.strip() for c in line.split(",")]
        if len(cells) > 1 and cells[1].endswith("MHz"):
            mhz.append(float(cells[1].split()[0]))
    return {"samples": len(mhz), "min": min(mhz), "median": statistics.median(mhz), "max": max(mhz)} if mhz else None


def targets(benches: dict[str, dict]) -> list[dict]:
    """The fused ops at the target shape against the issue's targets, where the run has them."""
    out = []
    for data in benches.values():
        for r in data.get("rows", []):
            key = (r["dist"], r["op"])
            if (r["D"], r["d"]) == TARGET_SHAPE and r["dtype"] == "float32" and key in TARGETS \
                    and r["method"] == "fused":
                out.append({"dist": r["dist"], "op": r["op"], "Gps": r["Gps"],
                            "target_Gps": TARGETS[key], "met": r["Gps"] >= TARGETS[key]})
    return out


def device_name() -> str:
    gpu = _run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"])
    if gpu:
        return gpu.splitlines()[0]
    return common.machine_info("cpu", [])["cpu"]


def markdown(res: dict) -> str:
    lines = []
    if res["targets"]:
        lines += ["## Targets at D = 1e8, d = 1000, fp32 (G entries/s per product)", "",
                  "| distribution | op | measured | target | met |", "|---|---|---|---|---|"]
        lines += [f"| {t['dist']} | {t['op']} | {t['Gps']:.0f} | {t['target_Gps']} | "
                  f"{'yes' if t['met'] else 'NO'} |" for t in res["targets"]]
        lines.append("")
    folder = Path(res["folder"])
    for rel in ["launch_count.md", *sorted(str(p.relative_to(folder)) for p in folder.glob("bench*/ops_bench.md"))]:
        if (folder / rel).exists():
            lines += [f"## {rel}", "", (folder / rel).read_text(), ""]
    if res["probe"] is not None:
        lines += ["## gpu_probe.json", "", "```", json.dumps(res["probe"], indent=1), "```", ""]
    if res["sm_clock_mhz"]:
        c = res["sm_clock_mhz"]
        lines.append(f"SM clock during the run (MHz, {c['samples']} samples): min {c['min']:.0f}, "
                     f"median {c['median']:.0f}, max {c['max']:.0f}")
        lines.append("")
    failed = [s["stage"] for s in res["stages"] if not s["passed"]]
    lines.append(f"gpu-check ({res['mode']}) at commit {res['commit']}: "
                 + (f"FAILED stages: {', '.join(failed)}" if failed else "every stage passed"))
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or not Path(argv[0]).is_dir():
        print("usage: python -m benchmarks.gpu_summary DIR (the gpu-check folder)", file=sys.stderr)
        return 2
    folder = Path(argv[0])

    def load(path: Path):
        return json.loads(path.read_text()) if path.exists() else None

    benches = {str(p.parent.relative_to(folder)): load(p) for p in sorted(folder.glob("bench*/ops_bench.json"))}
    res = {
        "commit": _run(["git", "rev-parse", "HEAD"]) or os.environ.get("RBD_COMMIT") or "unknown",
        "mode": os.environ.get("RBD_GPU_CHECK_MODE", "gpu"),
        "device": device_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "folder": str(folder),
        "stages": stages(folder),
        "sm_clock_mhz": sm_clock(folder),
        "probe": load(folder / "gpu_probe.json"),
        "launch_count": load(folder / "launch_count.json"),
        "benches": benches,
        "targets": targets(benches),
    }
    common.write_json(folder / "gpu_check.json", res)
    text = markdown(res)
    with open(folder / "summary.md", "a") as f:
        f.write("\n" + text)
    print(text)
    return 0 if res["stages"] and all(s["passed"] for s in res["stages"]) else 1


if __name__ == "__main__":
    sys.exit(main())
