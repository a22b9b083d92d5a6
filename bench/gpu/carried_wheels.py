"""Which carried wheels (.whl/, from bench/gpu_wheels.sh) this interpreter needs: prints their paths.

    python bench/gpu/carried_wheels.py .whl

A wheel is needed when its distribution is not installed, or is installed in an older version
than the carried one; the image's newer or equal versions stay. Reads metadata only.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path


def parse(version: str) -> tuple:
    try:
        from packaging.version import Version

        return (Version(version),)
    except Exception:  # noqa: BLE001 - no packaging, or a version it cannot read: compare numbers
        return tuple(int(n) for n in re.findall(r"\d+", version))


def needed(folder: Path) -> list[tuple[Path, str, str | None]]:
    """(wheel, its version, the installed version or None) for each wheel to install."""
    found = []
    for wheel in sorted(folder.glob("*.whl")):
        name, version = wheel.name.split("-")[:2]
        try:
            installed = metadata.version(name.replace("_", "-"))
        except metadata.PackageNotFoundError:
            installed = None
        if installed is None or parse(installed) < parse(version):
            found.append((wheel, version, installed))
    return found


def main() -> None:
    for wheel, version, installed in needed(Path(sys.argv[1])):
        print(f"{wheel.name}: carried {version}, installed {installed or 'none'}", file=sys.stderr)
        print(wheel)


if __name__ == "__main__":
    main()
