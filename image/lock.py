#!/usr/bin/env python3
"""./dev lock: pin kproxy's Python dependencies, with hashes, from pyproject.toml.

Writes three files with pip-compile (pip-tools, in a throwaway virtualenv under
dist/), from PyPI alone: this machine's pip configuration (extra indexes,
find-links, constraints) is ignored, so the result does not depend on it.

* image/requirements.lock: kproxy's runtime dependencies. The image installs
  exactly these (image/build.py, Dockerfile).
* image/requirements-test.lock: the same pins (taken as constraints) plus the
  test extras. ./dev installs .venv from it, so the tests run the versions the
  image ships; tests/test_image.py checks that they agree.
* image/build.lock: what builds the image: hatchling (kproxy's build backend)
  and pip (which installs the wheels inside the image build).

Pass --upgrade to move every pin to the newest release pyproject.toml allows;
without it, pip-compile keeps the existing pins where they still fit.
"""

from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path

from build import pip_env

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ROOT / "dist" / "lock-venv"
PIP_TOOLS = "pip-tools==7.6.2"
COMMON = ["--generate-hashes", "--strip-extras", "--no-emit-index-url", "--no-emit-find-links", "--quiet"]


def run(argv: list[str], env: dict[str, str]) -> None:
    print("lock:", " ".join(argv[:1] + argv[-3:]), file=sys.stderr)
    subprocess.run(argv, cwd=ROOT, env=env, check=True)


def main(argv: list[str]) -> int:
    upgrade = ["--upgrade"] if "--upgrade" in argv else []
    env = pip_env(CUSTOM_COMPILE_COMMAND="./dev lock")
    python = TOOLS / "bin" / "python"
    if not (TOOLS / "bin" / "pip-compile").exists():
        venv.create(TOOLS, with_pip=True, clear=True)
        run([str(python), "-m", "pip", "install", "--quiet", PIP_TOOLS], env)
    compile_ = [str(TOOLS / "bin" / "pip-compile"), *COMMON, *upgrade]
    run([*compile_, "--output-file", "image/requirements.lock", "pyproject.toml"], env)
    run([*compile_, "--extra", "test", "--constraint", "image/requirements.lock",
         "--output-file", "image/requirements-test.lock", "pyproject.toml"], env)
    run([*compile_, "--allow-unsafe", "--output-file", "image/build.lock", "image/build.in"], env)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
