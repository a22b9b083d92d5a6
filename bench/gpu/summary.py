"""Gathers what bench/gpu_check.sh measured into OUT/summary.json and prints the figures.

    python bench/gpu/summary.py WORK OUT MODE

WORK holds steps.tsv (name, exit status, seconds), env.json, pytest.xml and gpu-*.csv (nvidia-smi
samples per step); OUT the JSON the steps wrote (probe, cuda_checks, single, concurrency). MODE is
gpu, cpu (the rehearsal) or blocked. Standard library only: it runs before anything is installed.
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def steps(work: Path) -> list[dict]:
    rows = []
    try:
        lines = (work / "steps.tsv").read_text().splitlines()
    except OSError:
        return rows
    for line in lines:
        name, rc, seconds = (line.split("\t") + ["", ""])[:3]
        rows.append({"step": name, "rc": int(rc) if rc.lstrip("-").isdigit() else rc,
                     "seconds": float(seconds) if seconds else None})
    return rows


def pytest_counts(work: Path) -> dict | None:
    try:
        root = ET.parse(work / "pytest.xml").getroot()
    except (OSError, ET.ParseError):
        return None
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    if suite is None:
        return None
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["failed"] = [case.get("name") for case in suite.iter("testcase")
                        if case.find("failure") is not None or case.find("error") is not None]
    return counts


def gpu_peaks(work: Path) -> dict[str, dict]:
    """Per step: the largest memory.used (MiB) and utilization (%) nvidia-smi sampled."""
    peaks = {}
    for csv in sorted(work.glob("gpu-*.csv")):
        mem, util = [], []
        for line in csv.read_text().splitlines():
            cells = [c.strip() for c in line.split(",")]
            if len(cells) >= 2 and cells[0].isdigit():
                mem.append(int(cells[0]))
                util.append(int(cells[1]) if cells[1].isdigit() else 0)
        if mem:
            peaks[csv.stem.removeprefix("gpu-")] = {"memory_used_mib_max": max(mem), "utilization_max": max(util),
                                                    "samples": len(mem)}
    return peaks


def figures(out: Path) -> dict:
    """The headline numbers, from the benchmarks' JSON."""
    found: dict = {}
    single = load(out / "single.json")
    if single:
        found["single_stream"] = single.get("median")
        found["single_stream_memory"] = single.get("memory")
    conc = load(out / "concurrency.json")
    if conc and conc.get("levels"):
        found["streams"] = [{k: lv[k] for k in ("n", "aggregate_tps", "per_stream_tps", "ttft_p50_ms", "itl_p50_ms")}
                            for lv in conc["levels"]]
        found["streams_memory"] = conc.get("memory_after_levels")
    probe = load(out / "probe.json")
    if probe:
        found["engine"] = {k: probe.get(k) for k in ("providers", "ops_on_cpu", "prefill_ms", "decode_tok_s",
                                                     "row_bookkeeping", "gpu_memory_mb")}
    checks = load(out / "cuda_checks.json")
    if checks:
        found["checks"] = checks
    return found


def main() -> None:
    work, out, mode = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    env = load(work / "env.json") or {}
    ran = steps(work)
    tests = pytest_counts(work)
    failed = [s["step"] for s in ran if s["rc"] not in (0, "skipped")]
    if mode == "blocked":
        status = "blocked: no CUDA provider in this onnxruntime"
    elif failed:
        status = "failed: " + ", ".join(failed)
    elif mode == "gpu" and tests is not None and tests["skipped"]:
        status = f"failed: {tests['skipped']} CUDA tests skipped on the GPU machine (the skip policy saw no GPU)"
    else:
        status = "ok" if mode == "gpu" else "ok (CPU rehearsal: no GPU figures)"
    summary = {"status": status, "mode": mode, "steps": ran, "total_seconds": sum(s["seconds"] or 0 for s in ran),
               "tests": tests, "gpu_peaks": gpu_peaks(work), "environment": env, **figures(out)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"status: {status}")
    for s in ran:
        print(f"  {s['step']:<18} rc={s['rc']!s:<8} {s['seconds'] or 0:7.1f}s")
    print(f"  {'total':<18} {'':<11} {summary['total_seconds']:7.1f}s")
    if tests:
        print(f"tests: {tests['tests']} run, {tests['failures'] + tests['errors']} failed, {tests['skipped']} skipped")
    for key in ("single_stream", "streams", "engine", "gpu_peaks"):
        if summary.get(key):
            print(f"{key}: {json.dumps(summary[key])}")


if __name__ == "__main__":
    main()
