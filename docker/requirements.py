"""Print, one per line, the pip requirements an image installs before cnai itself, read from pyproject.toml.

Usage: python3 requirements.py PYPROJECT [--gpu]

Lists cnai's runtime dependencies (never the `convert` extra: no torch in an image) and its build backend, so that
cnai's own wheel then builds with no index. --gpu swaps onnxruntime for the `gpu` extra: onnxruntime-gpu ships the
same `onnxruntime` module, and the two must never be installed side by side.
"""
from __future__ import annotations

import re
import sys
import tomllib


def distribution(requirement: str) -> str:
    name = re.split(r"[\s<>=!~;\[(@]", requirement.strip(), maxsplit=1)[0]
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(pyproject: dict, gpu: bool = False) -> list[str]:
    project = pyproject["project"]
    runtime = list(project["dependencies"])
    if gpu:
        gpu_extra = project["optional-dependencies"]["gpu"]
        replaced = {distribution(r) for r in gpu_extra} | {"onnxruntime"}
        runtime = [r for r in runtime if distribution(r) not in replaced] + gpu_extra
    return runtime + list(pyproject["build-system"]["requires"])


def main(argv: list[str]) -> None:
    args = [a for a in argv if not a.startswith("--")]
    unknown = [a for a in argv if a.startswith("--") and a != "--gpu"]
    if len(args) != 1 or unknown:
        raise SystemExit(__doc__.strip().splitlines()[2])
    with open(args[0], "rb") as f:
        print("\n".join(requirements(tomllib.load(f), gpu="--gpu" in argv)))


if __name__ == "__main__":
    main(sys.argv[1:])
