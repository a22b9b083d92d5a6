"""The skip policy (tests/skip_policy.py) in a child pytest on generated test files: with
TOKENWIRE_REQUIRE_ALL=1 a skip for a missing chromium, npm or module fails the run, the
allow-listed skips (a CPU flag, no GPU) stay skips; without it every skip is a skip."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from skip_policy import ALLOWED_SKIPS, ENV, allowed, cpu_flags

TESTS = Path(__file__).resolve().parent

CASES = '''
import os
from pathlib import Path

import pytest

CHROMIUM = os.environ["FAKE_CHROMIUM"]  # a path that does not exist: chromium is missing
PRESENT = os.environ["FAKE_CHROMIUM_PRESENT"]  # one that does


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} missing: `make browser` installs it")
def test_browser():
    pass


@pytest.mark.skipif(not Path(PRESENT).exists(), reason=f"{PRESENT} missing: `make browser` installs it")
def test_browser_present():
    pass


@pytest.fixture
def npm():
    pytest.skip("npm is not installed and clients/node/node_modules is missing")


def test_node(npm):
    pass


def test_skips_in_its_body():
    pytest.skip("pexpect is not installed")


def test_allowed_words_later_in_the_reason_do_not_count():
    pytest.skip("chromium missing, though the CPU lacks nothing")


@pytest.mark.cpu_flags("avx2", "no_such_flag_tokenwire")
def test_kernel_for_a_missing_instruction_set():
    pass


@pytest.mark.cpu_flags()
def test_kernel_with_every_flag():
    pass


@pytest.mark.xfail(reason="a known bug", strict=True)
def test_expected_failure():
    assert False


def test_passes():
    pass
'''

MODULE_SKIP = '''
import pytest

pytest.importorskip("no_such_module_tokenwire")


def test_never_collected():
    pass
'''


def run_child(tmp_path: Path, *files: str, env: dict[str, str], args: tuple[str, ...] = ()) -> tuple[int, dict]:
    """Runs pytest on the files in tmp_path with the policy plugin; {test name: outcome}."""
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "skip_policy", "-p", "no:cacheprovider", "-rA", "-v",
         "--rootdir", str(tmp_path), "-c", os.devnull, *args, *files],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1",
             "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]), **env})
    outcomes = dict((name, word) for name, word in re.findall(
        r"^\S+::(\w+) (PASSED|FAILED|SKIPPED|XFAIL|XPASS|ERROR)\b", done.stdout, re.M))
    return done.returncode, {"stdout": done.stdout + done.stderr, **outcomes}


@pytest.fixture
def cases(tmp_path: Path) -> Path:
    (tmp_path / "test_cases.py").write_text(CASES)
    (tmp_path / "test_module_skip.py").write_text(MODULE_SKIP)
    return tmp_path


def chromium(cases: Path) -> dict[str, str]:
    return {"FAKE_CHROMIUM": str(cases / "no-chromium"), "FAKE_CHROMIUM_PRESENT": sys.executable}


FILES = ("test_cases.py", "test_module_skip.py", "--continue-on-collection-errors")


def test_without_the_flag_skips_are_skips(cases: Path) -> None:
    code, out = run_child(cases, *FILES, env={ENV: "", **chromium(cases)})
    assert code == 0, out["stdout"]
    assert "6 skipped" in out["stdout"] and "3 passed" in out["stdout"], out["stdout"]


def test_under_the_flag_a_missing_tool_fails_and_allowed_skips_stay(cases: Path) -> None:
    code, out = run_child(cases, *FILES, env={ENV: "1", **chromium(cases)})
    assert code == 1, out["stdout"]
    for name in ("test_browser", "test_node", "test_skips_in_its_body",
                 "test_allowed_words_later_in_the_reason_do_not_count"):
        # a skip in setup (skipif, a fixture) reads ERROR, in the test's body FAILED
        assert out.get(name) in ("FAILED", "ERROR"), (name, out["stdout"])
    assert out.get("test_kernel_for_a_missing_instruction_set") == "SKIPPED", out["stdout"]
    for name in ("test_browser_present", "test_kernel_with_every_flag", "test_passes"):
        assert out.get(name) == "PASSED", (name, out["stdout"])
    assert out.get("test_expected_failure") == "XFAIL"
    assert "no-chromium missing" in out["stdout"] and "ALLOWED_SKIPS" in out["stdout"]
    # the module skipped at import (pytest.importorskip) is a collection error
    assert re.search(r"^ERROR test_module_skip.py\b", out["stdout"], re.M), out["stdout"]
    assert "no_such_module_tokenwire" in out["stdout"]
    assert "3 errors" in out["stdout"] and "2 failed" in out["stdout"], out["stdout"]


def test_the_option_works_like_the_variable(cases: Path) -> None:
    code, out = run_child(cases, "test_module_skip.py", env={ENV: ""}, args=("--require-all",))
    assert code != 0 and "ALLOWED_SKIPS" in out["stdout"] and "no_such_module_tokenwire" in out["stdout"], out["stdout"]


def test_allow_list() -> None:
    assert all(allowed(prefix + "x") for prefix in ALLOWED_SKIPS)
    assert allowed("Skipped: CPU lacks avx512f (/proc/cpuinfo)")
    assert not allowed("/usr/bin/chromium missing: `make browser` installs it")
    assert not allowed("could not import 'pexpect': No module named 'pexpect'")


def test_cpu_flags_are_this_machines() -> None:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    line = next((line for line in text.splitlines() if line.startswith("flags")), "flags :")
    assert cpu_flags() == frozenset(line.split(":", 1)[1].split())
