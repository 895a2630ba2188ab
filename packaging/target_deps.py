"""Print the requirements the TARGET interpreter needs that are missing from a wheel directory.

``pip download --platform/--python-version`` picks wheels for the target, but evaluates the
environment markers of dependencies against the interpreter running pip (e.g. redis needs
``async-timeout; python_full_version < "3.11.3"``: Debian 12's 3.11.2 needs it, a 3.11.7 build
host does not). This reads every wheel's METADATA, evaluates its Requires-Dist markers for the
target and prints, one per line, each needed requirement whose project has no wheel there.

usage: target_deps.py WHEEL_DIR ROOT_REQUIREMENT PYTHON_FULL_VERSION MACHINE
"""

from __future__ import annotations

import re
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

try:
    from packaging.markers import default_environment
    from packaging.requirements import Requirement
except ImportError:  # pip vendors it
    from pip._vendor.packaging.markers import default_environment  # type: ignore[no-redef,assignment,unused-ignore]
    from pip._vendor.packaging.requirements import Requirement  # type: ignore[no-redef,assignment,unused-ignore]


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def metadata(wheel: Path) -> tuple[str, list[str]]:
    with zipfile.ZipFile(wheel) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        msg = Parser().parsestr(zf.read(name).decode("utf-8"))
    return canonical(msg["Name"]), msg.get_all("Requires-Dist") or []


def main(argv: list[str]) -> int:
    wheel_dir, root, full_version, machine = argv[1:5]
    env: dict[str, str] = {key: str(value) for key, value in default_environment().items()}
    env.update(python_full_version=full_version, python_version=".".join(full_version.split(".")[:2]),
               implementation_version=full_version, platform_machine=machine,
               sys_platform="linux", platform_system="Linux", os_name="posix",
               implementation_name="cpython", platform_python_implementation="CPython")
    wheels = {name: reqs for name, reqs in map(metadata, Path(wheel_dir).glob("*.whl"))}
    root_req = Requirement(root)
    todo = [(canonical(root_req.name), set(root_req.extras))]
    seen: set[tuple[str, frozenset[str]]] = set()
    missing: dict[str, str] = {}
    while todo:
        name, extras = todo.pop()
        key = (name, frozenset(extras))
        if key in seen:
            continue
        seen.add(key)
        if name not in wheels:
            continue
        for line in wheels[name]:
            req = Requirement(line)
            if req.marker is not None and not any(
                    req.marker.evaluate({**env, "extra": extra}) for extra in extras | {""}):
                continue
            dep = canonical(req.name)
            if dep not in wheels:
                req.marker = None
                missing.setdefault(dep, str(req))
            todo.append((dep, set(req.extras)))
    for req_text in missing.values():
        print(req_text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
