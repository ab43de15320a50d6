"""The locks, generated from pyproject.toml by uv, and the check that they still agree with it.

    ./run lock           # re-resolve: requirements/lock.txt (the [all] runtime) and requirements/dev.txt (the [dev] tools)
    ./run lock --check   # offline: fail when pyproject.toml changed since the locks were made, or a pin misses a requirement

The locks target what CI runs on (CPython 3.11, manylinux x86-64), with requirements/constraints.txt holding torch
at the release this project tests (pip takes it from this machine's disk). Each lock records the digest of what it
was resolved from, so ``--check`` needs no network. ``./run`` installs both locks into the project's virtualenv.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent
REQ = ROOT / "requirements"
LOCKS = {"lock.txt": ["--extra", "all", "-c", "requirements/constraints.txt"], "dev.txt": ["--extra", "dev", "-c", "requirements/lock.txt"]}
TARGET = {"python_version": "3.11", "python_full_version": "3.11.7", "sys_platform": "linux", "platform_machine": "x86_64",
          "platform_system": "Linux", "os_name": "posix", "implementation_name": "cpython", "platform_python_implementation": "CPython"}
STAMP = "# resolved from: "


def source_digest() -> str:
    """What the locks are resolved from: pyproject's dependency tables and the constraints."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    text = repr((project["dependencies"], project["optional-dependencies"], project["requires-python"]))
    text += (REQ / "constraints.txt").read_text()
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def lock() -> None:
    for name, args in LOCKS.items():
        out = REQ / name
        subprocess.run(["uv", "pip", "compile", "pyproject.toml", *args, "--python-version", "3.11",
                        "--python-platform", "x86_64-manylinux_2_28", "--custom-compile-command", "./run lock",
                        "--quiet", "-o", str(out)], cwd=ROOT, check=True)
        out.write_text(f"{STAMP}pyproject.toml and constraints.txt {source_digest()}\n" + out.read_text())
        print(f"wrote {out.relative_to(ROOT)}")


def pins(path: Path) -> dict[str, str]:
    found = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;]+)", line)
        if m:
            found[canonical(m.group(1))] = m.group(2)
    return found


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def check() -> list[str]:
    """Problems: a stale lock, or a requirement of pyproject no pin satisfies."""
    from packaging.requirements import Requirement
    from packaging.version import Version

    problems = []
    digest = source_digest()
    for name in LOCKS:
        first = (REQ / name).read_text().splitlines()[:1]
        if not first or digest not in first[0]:
            problems.append(f"requirements/{name} was not resolved from the current pyproject.toml/constraints.txt: run ./run lock")
    pinned = {**pins(REQ / "lock.txt"), **pins(REQ / "dev.txt")}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [(None, r) for r in project["dependencies"]]
    wanted += [(extra, r) for extra, reqs in project["optional-dependencies"].items() for r in reqs]
    for extra, text in wanted:
        req = Requirement(text)
        if canonical(req.name) == "lightning-btard":
            continue  # [all] names the other extras, checked themselves
        if req.marker and not req.marker.evaluate({**TARGET, "extra": extra or ""}):
            continue
        version = pinned.get(canonical(req.name))
        where = f"[{extra}]" if extra else "dependencies"
        if version is None:
            problems.append(f"{req} ({where}) has no pin in the locks: run ./run lock")
        elif not req.specifier.contains(Version(version), prereleases=True):
            problems.append(f"{req} ({where}) is not satisfied by the pin {req.name}=={version}: run ./run lock")
    return problems


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="check the locks against pyproject.toml (offline)")
    args = p.parse_args()
    if not args.check:
        lock()
    problems = check()
    for problem in problems:
        print(f"lock: {problem}", file=sys.stderr)
    if problems:
        raise SystemExit(1)
    print("lock: requirements/lock.txt and requirements/dev.txt agree with pyproject.toml")


if __name__ == "__main__":
    main()
