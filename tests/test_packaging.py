"""fastpref as installed: nothing in the repository hides an installed distribution, and
fastpref.kernels is the project's Triton kernels from the source tree and from a wheel.

Running from the repository root puts the root first on ``sys.path`` (``python -m``, ``torchrun -m``,
a script saved there), and pytest puts ``tests/`` there: any regular module or package in those
folders is found before site-packages. transformers 5.25 imports the Hub's ``kernels`` distribution
whenever it is installed, and the root's ``kernels/`` folder once hid it; the same can happen to any
name, so every name of both folders is checked against every installed distribution.
"""
import importlib.machinery
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.smoke
ROOT = Path(__file__).resolve().parent.parent
# Folders that land on sys.path when something runs from a checkout.
ON_SYS_PATH = [ROOT, ROOT / "tests"]
# What the root may hold as regular modules or packages: the package itself, and the build script
# setuptools expects there.
ROOT_MODULES = {"fastpref", "setup"}


def _regular_modules(folder: Path) -> set:
    """Names that import as a regular module or package from `folder` (a namespace portion, a folder
    without __init__.py, never hides a module found later on sys.path, so it is left out)."""
    names = set()
    for entry in folder.iterdir():
        name = entry.name.split(".")[0]
        if not name.isidentifier():
            continue
        spec = importlib.machinery.PathFinder.find_spec(name, [str(folder)])
        if spec is not None and spec.origin not in (None, "namespace"):
            names.add(name)
    return names


def _installed_top_level_names() -> dict:
    """{top-level import name: [distributions providing it]} of everything installed but fastpref."""
    provided = importlib.metadata.packages_distributions()
    return {name: [d for d in dists if d != "fastpref"] for name, dists in provided.items()
            if any(d != "fastpref" for d in dists)}


def _python(code: str, cwd: Path, **env) -> str:
    result = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True,
                            env={**os.environ, **env}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip()


def test_the_root_holds_no_module_but_the_package_and_its_build_script():
    assert _regular_modules(ROOT) == ROOT_MODULES


@pytest.mark.parametrize("folder", ON_SYS_PATH, ids=["root", "tests"])
def test_no_name_on_sys_path_hides_an_installed_distribution(folder):
    installed = _installed_top_level_names()
    hidden = {name: installed[name] for name in _regular_modules(folder) if name in installed}
    assert not hidden, (f"these names in {folder.name}/ hide the installed distributions that provide "
                        f"them whenever {folder.name}/ is on sys.path: {hidden}")


def _project_kernel(path: str) -> bool:
    path = Path(path)
    return path.parent.name == "kernels" and path.read_bytes() == (
        ROOT / "kernels" / "linear_logprobs_forward.py").read_bytes()


def test_from_the_root_kernels_is_the_installed_distribution_and_fastpref_kernels_the_projects():
    """What failed when transformers began importing the Hub's `kernels`, from the root."""
    hub_kernels = "kernels" in _installed_top_level_names()
    code = ("import importlib.util; spec = importlib.util.find_spec('kernels'); print(spec.origin if spec else None); "
            + ("import transformers.integrations.hub_kernels; " if hub_kernels else "")
            + "import fastpref.kernels.linear_logprobs_forward as forward; print(forward.__file__)")
    origin, kernel = _python(code, ROOT).splitlines()
    if hub_kernels:
        assert Path(origin).parent != ROOT / "kernels", origin
    else:
        assert origin in ("None", "namespace"), origin
    assert _project_kernel(kernel), kernel


@pytest.mark.slow
def test_fastpref_kernels_from_elsewhere_are_the_project_kernels(tmp_path):
    code = "import fastpref.kernels.linear_logprobs_forward as forward; print(forward.__file__)"
    assert _project_kernel(_python(code, tmp_path))


@pytest.mark.slow
def test_a_wheel_holds_the_kernels_as_fastpref_kernels(tmp_path):
    """A regular install: built without the CUDA extension (the Python files are the same)."""
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path / "wheel"), str(ROOT)],
        capture_output=True, text=True, env={**os.environ, "FASTPREF_BUILD_CUDA": "0"}, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = (tmp_path / "wheel").glob("fastpref-*.whl")
    target = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-3000:]
    kernel_files = sorted(p.name for p in (ROOT / "kernels").glob("*.py"))
    assert sorted(p.name for p in (target / "fastpref" / "kernels").glob("*.py")) == kernel_files
    code = ("import fastpref, fastpref.kernels.linear_logprobs_forward as forward; "
            "print(fastpref.__file__); print(forward.__file__)")
    # The wheel's folder first on sys.path: found before the editable install's finder (the last).
    package, kernel = _python(f"import sys; sys.path.insert(0, {str(target)!r}); {code}",
                              tmp_path, PYTHONNOUSERSITE="1").splitlines()
    assert package.startswith(str(target)) and kernel.startswith(str(target / "fastpref" / "kernels"))


@pytest.mark.slow
def test_torchrun_from_the_root_trains(tmp_path):
    """The README's torchrun command, from the repository root (its workers run `python -m` there)."""
    torchrun = Path(sys.executable).with_name("torchrun")
    output = tmp_path / "run"
    command = [str(torchrun), "--nproc-per-node", "2", "-m", "fastpref.cli", "train", "--parallel", "fsdp",
               "--max-steps", "2", "--max-length", "64", "--max-prompt-length", "32", "--progress", "false",
               "--output-dir", str(output)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    summary = json.loads((output / "summary.json").read_text())
    assert summary["steps"] == 2
