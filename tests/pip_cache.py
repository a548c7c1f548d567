"""Packages some tests need beside the installed environment (another transformers, Triton's
interpreter, ...), pip-installed once into .cache/ with --target and used from a subprocess with
that folder on PYTHONPATH, so the environment under test is never changed."""

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def pip_target(packages: list[str]) -> Path:
    """A folder holding exactly `packages` (pinned, installed without their dependencies)."""
    digest = hashlib.sha1(" ".join(packages).encode()).hexdigest()[:8]
    target = REPO / ".cache" / f"{packages[0].replace('==', '-')}-{digest}"
    if not target.is_dir():
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(partial),
                        *packages], check=True, timeout=600)
        partial.rename(target)
    return target
