"""The skip policy (a pytest plugin; tests/conftest.py loads its hooks).

With TOKENWIRE_REQUIRE_ALL=1 (`make test` sets it) or `--require-all`, a skipped test is a
FAILURE unless its reason starts with one of ALLOWED_SKIPS: an end-to-end test that skips because
chromium, node/npm, pexpect or playwright is missing fails instead of passing quietly. The
allow-list is the one place that says which skips a complete run may have, and each allowed skip
is made by a marker handled here, from what the machine really has:

- `@pytest.mark.cpu_flags("avx2", "fma", ...)`: kernels for an instruction set; skipped when
  /proc/cpuinfo lacks a flag (reason "CPU lacks ...").
- `@pytest.mark.cuda`: needs a CUDA GPU through onnxruntime; skipped without one ("no CUDA GPU").
- `@pytest.mark.no_cuda`: expects CUDA to be unavailable; skipped where it is ("CUDA available").

Expected failures (xfail) are not skips and are left alone.
"""

from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path

import pytest

ENV = "TOKENWIRE_REQUIRE_ALL"

# The only skips a complete run (`make test`) may have: reason prefix -> why it is allowed.
ALLOWED_SKIPS = {
    "CPU lacks ": "kernels for an instruction set this CPU does not have (marker cpu_flags)",
    "no CUDA GPU": "CUDA tests on a machine without a GPU (marker cuda)",
    "CUDA available": "tests of the no-GPU message on a machine with CUDA (marker no_cuda)",
}


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as /proc/cpuinfo spells them (avx2, avx512f, avx512_vnni, ...)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


@functools.cache
def cuda_available() -> bool:
    """onnxruntime offers the CUDA provider and the machine has an NVIDIA device."""
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    has_device = Path("/dev/nvidiactl").exists() or shutil.which("nvidia-smi") is not None
    return "CUDAExecutionProvider" in ort.get_available_providers() and has_device


def cuda_provider_installed() -> bool:
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers()


def require_all(config: pytest.Config) -> bool:
    return bool(config.getoption("require_all", False)) or os.environ.get(ENV, "") not in ("", "0")


def allowed(reason: str) -> bool:
    reason = reason.removeprefix("Skipped: ")
    return any(reason.startswith(prefix) for prefix in ALLOWED_SKIPS)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--require-all", action="store_true", dest="require_all", default=False,
                     help=f"a skip not in tests/skip_policy.py ALLOWED_SKIPS fails (also {ENV}=1)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "cpu_flags(*flags): needs these /proc/cpuinfo flags; skipped without them")
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (onnxruntime-gpu); skipped without one")
    config.addinivalue_line("markers", "no_cuda: expects no CUDA provider; skipped where there is one")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The allowed skips, as skip markers (so a skip names the test, not this file)."""
    for item in items:
        for mark in item.iter_markers("cpu_flags"):
            missing = [flag for flag in mark.args if flag not in cpu_flags()]
            if missing:
                item.add_marker(pytest.mark.skip(reason=f"CPU lacks {', '.join(missing)} (/proc/cpuinfo)"))
        if item.get_closest_marker("cuda") and not cuda_available():
            item.add_marker(pytest.mark.skip(
                reason="no CUDA GPU (onnxruntime's CUDAExecutionProvider and an NVIDIA device)"))
        if item.get_closest_marker("no_cuda") and cuda_provider_installed():
            item.add_marker(pytest.mark.skip(reason="CUDA available: this test checks the message given without it"))


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr)


def _refuse(report, reason: str) -> None:
    report.outcome = "failed"
    report.longrepr = (
        f"skipped, but {ENV}=1 (make test) allows no skip but those in tests/skip_policy.py "
        f"ALLOWED_SKIPS {sorted(ALLOWED_SKIPS)}; install what it needs (make setup node browser) "
        f"or mark the test for the policy.\n{reason}")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call):
    report = yield
    if report.skipped and not hasattr(report, "wasxfail") and require_all(item.config):
        reason = _skip_reason(report)
        if not allowed(reason):
            _refuse(report, reason)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):
    """A whole module skipped at import (pytest.importorskip, pytest.skip(allow_module_level=True))."""
    report = yield
    if report.skipped and require_all(collector.config):
        reason = _skip_reason(report)
        if not allowed(reason):
            _refuse(report, reason)
    return report
