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


# Triton 3.6's interpreter holds a kernel's scalars as 1-element arrays and turns them into loop
# bounds with int(array), which NumPy 2.4 refuses for arrays of one dimension ("only 0-dimensional
# arrays can be converted"): a loop over a runtime bound (`range(start, end, step)`) fails. The
# subprocess takes the element instead.
INTERPRETER_FIX = """
import triton.runtime.interpreter as _interp
_patch_lang_tensor = _interp._patch_lang_tensor
def _patch_with_index(tensor, scope):
    _patch_lang_tensor(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))
_interp._patch_lang_tensor = _patch_with_index
"""


def run_interpreted(code: str, interpret: bool = True):
    """Runs `code` with Triton's interpreter on the CPU (TRITON_INTERPRET=1; `interpret=False`: without it,
    e.g. to compile kernels for a GPU target), Triton 3.6.0 as installed or from `pip_target`, the repository
    on PYTHONPATH, in a subprocess; returns the value its last printed line holds (a Python literal)."""
    import importlib.metadata
    import os
    try:  # a GPU machine has it already (and may reach no package index)
        installed = importlib.metadata.version("triton") == "3.6.0"
    except importlib.metadata.PackageNotFoundError:
        installed = False
    path = f"{REPO}" if installed else f"{REPO}:{pip_target(['triton==3.6.0'])}"  # no dependencies: numpy runs it
    env = dict(os.environ, TRITON_INTERPRET="1" if interpret else "0", PYTHONPATH=path)
    out = subprocess.run([sys.executable, "-c", INTERPRETER_FIX + code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return eval(out.stdout.strip().splitlines()[-1])
