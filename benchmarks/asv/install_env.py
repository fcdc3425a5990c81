"""asv's install command (asv.conf.json): install one commit's peftdecl wheel and the benchmarks' packages.

Runs inside asv's virtualenv, from the checkout that runs asv (``{conf_dir}``), so that an old commit is installed
with today's constraints.txt and today's list of benchmark packages, whatever extras that commit declared.

``PEFTDECL_ASV_DEPS`` picks the packages beside the wheel: ``all`` (the default: torch, PEFT, transformers,
bitsandbytes, MLX, mlx-lm and the train extra's packages, for the torch, MLX, peer and training suites) or ``core``
(the wheel's own dependencies only: the NumPy suites, e.g. the CI regression gate). pip finds the packages installed
after the first commit, so later commits only swap the wheel.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

CONSTRAINTS = Path(__file__).resolve().parents[2] / "constraints.txt"
PACKAGES: dict[str, list[str]] = {
    "core": [],
    # torch and the peers (PEFT, bitsandbytes for QLoRA, mlx-lm), and what `peftdecl train` runs with (the train extra)
    "all": [
        "torch",
        "peft==0.21.2",
        "transformers",
        "bitsandbytes",
        "mlx[cpu]",
        "mlx-lm",
        "pyyaml",
        "rich",
        "matplotlib",
        "tokenizers",
    ],
}


def install_command(wheel: str, deps: str) -> list[str]:
    """The pip command that installs ``wheel`` with the package set ``deps`` under constraints.txt."""
    if deps not in PACKAGES:
        raise SystemExit(f"PEFTDECL_ASV_DEPS={deps!r}: expected one of {sorted(PACKAGES)}")
    return [sys.executable, "-m", "pip", "install", "-c", str(CONSTRAINTS), wheel, *PACKAGES[deps]]


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        raise SystemExit("usage: install_env.py WHEEL")
    command = install_command(argv[0], os.environ.get("PEFTDECL_ASV_DEPS", "all"))
    print(" ".join(command), flush=True)
    return subprocess.call(command)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
