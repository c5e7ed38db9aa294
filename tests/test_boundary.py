"""The Ray boundary is a fact, not a claim: every module of ``ecgad`` outside ``ecgad.ray`` imports without Ray.

Why it matters: the preparation, the model, scoring and the file formats are used where no Ray is installed or
wanted (the CLI, a notebook, the tests that run without a cluster), and importing Ray costs seconds. Modules are
discovered with ``pkgutil``, so a new module is covered the day it is added. All of them are imported in one fresh
interpreter (this test process may have imported Ray through other tests). Only when Ray shows up does a second
interpreter name the culprits: there an import of ``ray`` raises, so every module that needs Ray fails to import,
and the failure's innermost line in this repository is the import that pulled it in.
"""

from __future__ import annotations

import json
import os
import pkgutil
import subprocess
import sys

import ecgad
from ecgad.settings import REPO_ROOT

RAY_PACKAGE = "ecgad.ray"

#: Run in a fresh interpreter with ``MODULES`` and ``BLOCK`` defined: imports every module and prints JSON
#: ``{"ray_loaded": bool, "culprits": {module: "file:line: source"}}``.
_PROBE = """
import importlib, json, sys, traceback

class BlockRay:
    def find_spec(self, name, path=None, target=None):
        if name == "ray" or name.startswith("ray."):
            raise ImportError(f"{name} is blocked by tests/test_boundary.py")

if BLOCK:
    sys.meta_path.insert(0, BlockRay())
culprits = {}
for name in MODULES:
    try:
        importlib.import_module(name)
    except ImportError as exc:
        if not BLOCK:
            raise
        ours = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename.startswith(REPO)]
        culprits[name] = f"{ours[-1].filename[len(REPO) + 1:]}:{ours[-1].lineno}: {ours[-1].line}" if ours else str(exc)
print(json.dumps({"ray_loaded": "ray" in sys.modules, "culprits": culprits}))
"""


def _modules_outside_ray() -> list[str]:
    return sorted(info.name for info in pkgutil.walk_packages(ecgad.__path__, prefix="ecgad.")
                  if info.name != RAY_PACKAGE and not info.name.startswith(RAY_PACKAGE + "."))


def _probe(modules: list[str], block: bool) -> dict:
    """Import ``modules`` in a fresh interpreter (this checkout's ``ecgad`` first); the probe's JSON answer."""
    code = f"MODULES = {modules!r}\nBLOCK = {block!r}\nREPO = {str(REPO_ROOT)!r}\n{_PROBE}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH"))
                                                         if p)}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, f"importing the modules of ecgad failed:\n{done.stderr[-3000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_every_module_outside_ecgad_ray_imports_without_ray():
    modules = _modules_outside_ray()
    assert "ecgad.model" in modules and "ecgad.preprocess" in modules      # discovery works
    if _probe(modules, block=False)["ray_loaded"]:
        culprits = _probe(modules, block=True)["culprits"]
        lines = "\n".join(f"  {name}  <- {where}" for name, where in culprits.items())
        raise AssertionError(f"importing these modules loads ray; what imports Ray belongs in {RAY_PACKAGE}/:\n"
                             f"{lines or '  (none fails when ray is blocked: it is imported lazily or optionally)'}")
