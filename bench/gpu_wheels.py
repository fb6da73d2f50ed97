"""Downloads the wheels that TRL's side-by-side (bench/bench_trl.py in bench/gpu_check.sh) needs on
the GPU machine, which has no package registry: trl 1.16, liger-kernel, datasets and whichever of
their dependencies the machine's image lacks, for its CPython 3.12 on manylinux x86_64.

    python bench/gpu_wheels.py gpu-wheels        (make gpu-wheels)

How it leaves out torch and everything else the image has: pip resolves the packages for Python
3.12 without installing anything (`pip install --dry-run --report`, which reads each candidate's
metadata, not its wheel), constrained to the image's versions (bench/gpu_image_packages.txt) except
its torch stack (torch, triton, nvidia-*, cuda-*: torch 2.11's nvidia-cudnn-cu13 has no wheel for
the platforms pip is told here, which failed the resolution). Then only the packages that trl,
liger-kernel and datasets need, directly or through another such package, and that the image
does not list, are downloaded, each pinned to its resolved version and with --no-deps (the image's
own packages bring what they need already); what they require of the torch stack is checked
against the image's torch and triton instead. gpu_check.sh installs them offline with --no-deps,
so the machine's own torch and packages are never replaced.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

try:
    from packaging.requirements import Requirement
except ImportError:  # a bare venv (make gpu-wheels needs no dependencies): pip's own copy
    from pip._vendor.packaging.requirements import Requirement

REQUIREMENTS = ("trl>=1.16,<1.17", "liger-kernel", "datasets")
IMAGE_PACKAGES = Path(__file__).resolve().parent / "gpu_image_packages.txt"
# The GPU machine's interpreter and platform (pip needs the platform spelled out with --python-version).
TARGET = ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
          *[arg for tag in ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_27_x86_64",
                            "manylinux_2_28_x86_64", "manylinux_2_34_x86_64") for arg in ("--platform", tag)]]
# Environment markers of that interpreter (requirements of extras are left out: extra "").
TARGET_MARKERS = {"python_version": "3.12", "python_full_version": "3.12.3", "implementation_name": "cpython",
                  "platform_python_implementation": "CPython", "sys_platform": "linux", "platform_system": "Linux",
                  "platform_machine": "x86_64", "os_name": "posix", "extra": ""}
# Packages that come with the machine's torch build, whatever their names in the image's list.
TORCH_STACK = re.compile(r"^(torch|triton|nvidia-.*|cuda-.*)$")


def canonical(name: str) -> str:
    """PEP 503's normalized name: pyyaml, PyYAML and py_yaml are one package."""
    return re.sub(r"[-_.]+", "-", name).lower()


def image_packages() -> dict[str, Requirement]:
    """The image's packages by normalized name, each with its version where known."""
    lines = IMAGE_PACKAGES.read_text().splitlines()
    requirements = [Requirement(line) for line in lines if line.strip() and not line.startswith("#")]
    return {canonical(requirement.name): requirement for requirement in requirements}


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True)


def resolve(image: dict[str, Requirement]) -> list[dict]:
    """The metadata of every package an empty Python 3.12 would install for REQUIREMENTS, under
    the image's versions (its torch stack left free)."""
    with tempfile.TemporaryDirectory() as scratch:
        constraints, report = Path(scratch) / "constraints.txt", Path(scratch) / "report.json"
        constraints.write_text("".join(f"{requirement}\n" for name, requirement in image.items()
                                       if not TORCH_STACK.match(name)))
        pip("install", "--dry-run", "--quiet", "--ignore-installed", "--report", str(report), *TARGET,
            "--target", str(Path(scratch) / "target"), "--constraint", str(constraints), *REQUIREMENTS)
        return [item["metadata"] for item in json.loads(report.read_text())["install"]]


def needed_beyond_image(resolved: list[dict], image: dict[str, Requirement]) -> list[dict]:
    """The resolved packages that REQUIREMENTS need and the image lacks: from REQUIREMENTS, through
    the requirements of each package the image lacks (a package the image has, or the torch
    stack, ends the walk there)."""
    by_name = {canonical(package["name"]): package for package in resolved}
    todo = [canonical(Requirement(requirement).name) for requirement in REQUIREMENTS]
    needed: dict[str, dict] = {}
    while todo:
        name = todo.pop()
        if name in needed or name in image or TORCH_STACK.match(name):
            continue
        needed[name] = by_name[name]
        todo += [canonical(requirement.name) for requirement in map(Requirement, needed[name].get("requires_dist", []))
                 if requirement.marker is None or requirement.marker.evaluate(TARGET_MARKERS)]
    return list(needed.values())


def check_torch_stack(package: dict, image: dict[str, Requirement]) -> None:
    """Raises SystemExit where package requires a torch or triton other than the image's."""
    for line in package.get("requires_dist", []):
        requirement = Requirement(line)
        pinned = image.get(canonical(requirement.name))
        if (pinned is None or not TORCH_STACK.match(canonical(requirement.name))
                or (requirement.marker and not requirement.marker.evaluate(TARGET_MARKERS))):
            continue
        (version,) = [spec.version for spec in pinned.specifier] or [None]
        if version and not requirement.specifier.contains(version, prereleases=True):
            raise SystemExit(f"gpu-wheels: {package['name']} {package['version']} requires {requirement}, but the GPU "
                             f"image has {pinned}: pin an older {package['name']} in bench/gpu_wheels.py")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="where the wheels go (git ignores gpu-wheels/)")
    folder = parser.parse_args().folder
    image = image_packages()
    lacking = needed_beyond_image(resolve(image), image)
    for package in lacking:
        check_torch_stack(package, image)
    missing = sorted(f"{package['name']}=={package['version']}" for package in lacking)
    print(f"gpu-wheels: the GPU image lacks {', '.join(missing)}")
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.whl"):  # one version of each package, or the offline install stops
        stale.unlink()
    pip("download", "--quiet", "--no-deps", *TARGET, "--dest", str(folder), *missing)
    size = sum(wheel.stat().st_size for wheel in folder.glob("*.whl"))
    print(f"gpu-wheels: {len(missing)} wheels, {size / 2**20:.1f} MiB in {folder}/ (carry it to the GPU machine)")


if __name__ == "__main__":
    main()
