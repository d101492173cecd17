"""Run any module's ``SERVICE`` definition as a process, the way ``dtx serve`` runs the real ones.

    python tests/support/run_service.py tests.support.sleepy_service

The repository root is put on ``sys.path`` so that test-only modules import.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: run_service.py <module with SERVICE>", file=sys.stderr)
        return 2
    for path in (ROOT / "services", ROOT):
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))
    from dtx_runtime import run_service

    module = importlib.import_module(argv[0])
    return run_service(module.SERVICE)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
