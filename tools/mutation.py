"""Mutation testing of the fast tier: `make mutation` (MUTATION_BUDGET, MUTATION_JOBS, MODULES).

mutmut (the dev extra) mutates the modules of [tool.mutmut] only_mutate in pyproject.toml one
change at a time and runs the fast tests that reach the changed function; a mutant no test
notices ("survived") is a behaviour the tests do not pin down.

Our packages are mapped (server/ is tokenwire.server, ...) and installed editable, while mutmut
names a mutant after its file's path and puts its copy first on sys.path. So the run happens in
build/mutation/: the project copied as the installed layout (src/tokenwire/{server,bridge,clients}
and proto/tokenwire's files), tests/ and pyproject.toml beside it. There `import tokenwire` finds
the mutated copy before the editable install (its finder comes after sys.path), and mutmut's own
checks stop the run when it does not (a forced failure that does not fail; no test reaching a
mutant's function under its name).

The run stops after --budget seconds (a Ctrl-C to mutmut, which keeps what it finished); the
mutants already tried are kept while the sources and tests stay the same, so running it again goes
on where it stopped (--fresh starts over). Then it prints per module: mutants, killed, survived,
no tests (no fast test reaches the function), timeout, not run; and every survivor as file:line and
the change, also written to build/mutation/report.txt.

    .venv/bin/python tools/mutation.py [--budget 900] [--jobs 2] [--fresh] [server/engine/sampling.py ...]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import tomllib
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "build" / "mutation"
# The installed layout: package-dir of pyproject.toml, as (repo folder, folder in the copy).
LAYOUT = [("proto/tokenwire", "src/tokenwire"), ("server", "src/tokenwire/server"),
          ("bridge", "src/tokenwire/bridge"), ("clients", "src/tokenwire/clients")]
SKIP = shutil.ignore_patterns("__pycache__", "*.pyc", "node_modules", ".pytest_cache")
STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", 34: "skipped",
          36: "timeout", 24: "timeout", -24: "timeout", 152: "timeout", 255: "timeout",
          37: "caught by type check", None: "not run", 2: "not run"}
COLUMNS = ("killed", "survived", "no tests", "timeout", "not run")


def to_copy(repo_path: str) -> str:
    for repo, copy in sorted(LAYOUT, key=lambda pair: -len(pair[0])):
        if repo_path == repo or repo_path.startswith(repo + "/"):
            return copy + repo_path[len(repo):]
    raise SystemExit(f"{repo_path}: not in a package folder ({', '.join(r for r, _ in LAYOUT)})")


def to_repo(copy_path: str) -> str:
    for repo, copy in sorted(LAYOUT, key=lambda pair: -len(pair[1])):
        if copy_path.startswith(copy + "/"):
            return repo + copy_path[len(copy):]
    return copy_path


def inputs() -> list[Path]:
    files = [ROOT / "pyproject.toml"]
    for folder in [repo for repo, _ in LAYOUT] + ["tests"]:
        files += [p for p in (ROOT / folder).rglob("*")
                  if p.is_file() and "__pycache__" not in p.parts and "node_modules" not in p.parts]
    return sorted(files)


def digest(modules: list[str]) -> str:
    h = hashlib.sha256(json.dumps(modules).encode())
    for path in inputs():
        h.update(str(path.relative_to(ROOT)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def stage(modules: list[str], fresh: bool) -> None:
    """build/mutation/ for these modules; kept (with mutmut's results) if nothing changed."""
    key = digest(modules)
    stamp = WORK / "inputs.sha256"
    if not fresh and stamp.is_file() and stamp.read_text() == key:
        print(f"mutation: sources unchanged, resuming in {WORK.relative_to(ROOT)}")
        return
    shutil.rmtree(WORK, ignore_errors=True)
    for repo, copy in LAYOUT:
        shutil.copytree(ROOT / repo, WORK / copy, ignore=SKIP, dirs_exist_ok=True)
    shutil.copytree(ROOT / "tests", WORK / "tests", ignore=SKIP)
    text = (ROOT / "pyproject.toml").read_text()
    chosen = "only_mutate = " + json.dumps(modules)
    text, n = re.subn(r"^only_mutate = \[[^\]]*\]", chosen.replace("\\", "\\\\"), text, count=1, flags=re.M)
    assert n == 1, "pyproject.toml: [tool.mutmut] only_mutate not found"
    (WORK / "pyproject.toml").write_text(text)
    (WORK / "modules.json").write_text(json.dumps(modules))
    stamp.write_text(key)


def run_mutmut(budget: float, jobs: int) -> int:
    mutmut = Path(sys.executable).with_name("mutmut")
    cmd = [str(mutmut), "run", "--max-children", str(jobs)]
    print(f"mutation: {' '.join(cmd)} in {WORK.relative_to(ROOT)}, budget {budget:.0f} s", flush=True)
    env = {**os.environ, "TOKENWIRE_REQUIRE_ALL": "", "PYTHONDONTWRITEBYTECODE": "1", "GRPC_VERBOSITY": "ERROR"}
    proc = subprocess.Popen(cmd, cwd=WORK, env=env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    reader = threading.Thread(target=relay, args=(proc.stdout,), daemon=True)
    reader.start()
    try:
        code = proc.wait(timeout=budget)
    except subprocess.TimeoutExpired:
        print(f"\nmutation: budget of {budget:.0f} s spent, stopping mutmut (results so far are kept)", flush=True)
        os.killpg(proc.pid, signal.SIGINT)
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            code = proc.wait()
    reader.join(5)
    return code


def relay(stream) -> None:
    """mutmut's output without its spinner (segments ended by \\r): finished lines, and the
    progress line every 30 s."""
    line, shown, buffer = "", time.monotonic(), ""
    while chunk := stream.read1(4096).decode(errors="replace"):
        buffer += chunk
        *parts, buffer = re.split(r"(\r|\n)", buffer)
        for part in parts:
            if part == "\n":
                if line.strip():
                    print(line.lstrip("\u2800\u280b\u2819\u2839\u2838\u283c\u2834\u2826\u2827\u2807\u280f "),
                          flush=True)
                line = ""
            elif part != "\r":
                line = part
        if time.monotonic() - shown > 30 and line.strip():
            print("  " + line.strip(), flush=True)
            shown = time.monotonic()
    if (line + buffer).strip():
        print(line + buffer, flush=True)


def line_of(source: list[str], diff: str) -> int | None:
    """The original file's line of a mutant's first removed line."""
    removed = [line[1:].strip() for line in diff.splitlines() if line.startswith("-") and not line.startswith("---")]
    first_function_line = next((line[1:].strip() for line in diff.splitlines()
                                if line.startswith(" ") or (line.startswith("-") and not line.startswith("---"))), "")
    start = next((i for i, text in enumerate(source) if text.strip() == first_function_line), 0)
    for target in removed:
        for i in range(start, len(source)):
            if source[i].strip() == target:
                return i + 1
    return None


def report(modules: list[str]) -> str:
    os.chdir(WORK)  # mutmut's functions read ./pyproject.toml and ./mutants
    from mutmut.mutation.diff_apply import get_diff_for_mutant

    lines, survivors, no_tests = [], [], []
    header = f"{'module':44} {'mutants':>7} " + " ".join(f"{c:>8}" for c in COLUMNS) + f" {'survival':>8}"
    lines += [header, "-" * len(header)]
    for module in modules:
        meta = WORK / "mutants" / (module + ".meta")
        codes = json.loads(meta.read_text())["exit_code_by_key"] if meta.is_file() else {}
        counts = Counter(STATUS.get(code, "suspicious") for code in codes.values())
        tried = counts["killed"] + counts["survived"] + counts["timeout"] + counts["no tests"]
        # survival: of the mutants tried, those no test noticed (survived or reached by no test)
        rate = f"{(counts['survived'] + counts['no tests']) / tried:8.0%}" if tried else f"{'-':>8}"
        lines.append(f"{to_repo(module):44} {len(codes):>7} " + " ".join(f"{counts[c]:>8}" for c in COLUMNS)
                     + f" {rate}")
        # lines of the file as it is now (it may have changed since the run), else of the run's copy
        current = ROOT / to_repo(module)
        source = (current if current.is_file() else WORK / module).read_text().splitlines()
        unreached = Counter(name.split("__mutmut_")[0].rsplit(".", 1)[-1] for name, code in codes.items()
                            if STATUS.get(code) == "no tests")
        if unreached:
            no_tests.append(f"  {to_repo(module)}: " + ", ".join(
                f"{function.removeprefix('xǁ').removeprefix('x_').replace('ǁ', '.')} ({n})"
                for function, n in sorted(unreached.items())))
        for name, code in sorted(codes.items()):
            if STATUS.get(code) == "survived":
                diff = get_diff_for_mutant(name, path=module)
                survivors.append((to_repo(module), line_of(source, diff), name, diff))
    lines += ["", "survival = (survived + no tests) / tried; 'no tests': no fast test reaches the function.",
              "", "functions no fast test reaches (mutants):", *no_tests, "", f"survivors ({len(survivors)}):"]
    for module, line, name, diff in survivors:
        change = [d for d in diff.splitlines()[2:] if d.startswith(("-", "+"))]
        lines.append(f"  {module}:{line or '?'}  {name.rsplit('.', 1)[-1]}")
        lines += [f"      {d}" for d in change]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("modules", nargs="*", help="repo paths (default: pyproject.toml [tool.mutmut] only_mutate)")
    parser.add_argument("--budget", type=float, default=float(os.environ.get("MUTATION_BUDGET", 900)),
                        help="seconds of mutmut run (default 900, or MUTATION_BUDGET)")
    parser.add_argument("--jobs", type=int, default=int(os.environ.get("MUTATION_JOBS", os.cpu_count() or 2)))
    parser.add_argument("--fresh", action="store_true", help="forget earlier results")
    parser.add_argument("--report-only", action="store_true", help="print the last run's results")
    args = parser.parse_args()

    configured = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mutmut"]["only_mutate"]
    modules = [to_copy(m) for m in args.modules] if args.modules else configured
    if args.report_only and not args.modules and (WORK / "modules.json").is_file():
        modules = json.loads((WORK / "modules.json").read_text())  # those of the last run
    if not args.report_only:
        stage(modules, args.fresh)
        started = time.monotonic()
        code = run_mutmut(args.budget, args.jobs)
        print(f"mutation: mutmut exited {code} after {time.monotonic() - started:.0f} s")
    text = report(modules)
    (WORK / "report.txt").write_text(text + "\n")
    print(text)
    print(f"\n(also in {(WORK / 'report.txt').relative_to(ROOT)}; a mutant's diff: "
          f"cd {WORK.relative_to(ROOT)} && ../../.venv/bin/mutmut show NAME)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
