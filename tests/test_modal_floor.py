"""The oldest `modal` client the rendered modules import under, measured on real releases.

Each release is installed from the package index with its dependencies (`pip install --target`,
kept in the test cache) and, in a fresh interpreter with it first on the path, every committed
example module plus one with every Modal option the renderer writes
(tests/fixtures/every_modal_option.toml) is imported with warnings as errors. The floor that
pyproject declares must import all of them, and the release just below it must not; `liftdeploy
check` must report a client below the floor.

Measured: 1.0.0 and 1.0.5 have no `Image.uv_pip_install`; 1.1.0, 1.1.1 and 1.1.3 (there is
no 1.1.2) reject `App.cls(startup_timeout=...)`; 1.1.4 and 1.6.4 import everything.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from liftdeploy.manifest import load
from liftdeploy.render import module_name, render
from tests.support.cache import cached

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

pytestmark = [pytest.mark.network, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
EVERY_OPTION = ROOT / "tests" / "fixtures" / "every_modal_option.toml"

# The newest release of each line below the floor, and how the rendered modules fail under it.
BELOW_FLOOR = {
    "1.0.5": "AttributeError: 'Image' object has no attribute 'uv_pip_install'",
    "1.1.3": "TypeError: _App.cls() got an unexpected keyword argument 'startup_timeout'",
}

IMPORT_ALL = """
import importlib.util, json, sys, warnings
from importlib import metadata
import modal
warnings.simplefilter("error")
out = {"version": metadata.version("modal"), "file": modal.__file__, "modules": {}}
for i, path in enumerate(sys.argv[1:]):
    spec = importlib.util.spec_from_file_location(f"rendered_{i}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        out["modules"][path] = None
    except Exception as exc:
        out["modules"][path] = f"{type(exc).__name__}: {exc}"
print(json.dumps(out))
"""


def declared_floor() -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    modal = next(Requirement(d) for d in deps if Requirement(d).name == "modal")
    return next(s.version for s in modal.specifier if s.operator == ">=")


def modal_release(version: str) -> Path:
    """A folder holding the real `modal==version` and its dependencies, installed once."""
    def install(target: Path) -> None:
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-compile",
                               "--disable-pip-version-check", "--target", str(target), f"modal=={version}"],
                              capture_output=True, text=True)
        assert proc.returncode == 0, f"pip install modal=={version} failed:\n{proc.stderr[-4000:]}"

    python = f"{sys.version_info[0]}.{sys.version_info[1]}"
    return cached(f"modal-{version}", {"modal": version, "python": python}, install)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> list[Path]:
    """The committed examples' modules, and one rendered with every Modal option on."""
    folder = tmp_path_factory.mktemp("every-option")
    loaded = load(EVERY_OPTION)
    every = folder / f"{module_name(loaded)}.py"
    every.write_text(render(loaded))
    return [*sorted((ROOT / "deployments").glob("*.py")), every]


def import_under(release: Path | None, modules: list[Path]) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODAL_")}
    if release is not None:
        env["PYTHONPATH"] = str(release)
    proc = subprocess.run([sys.executable, "-c", IMPORT_ALL, *map(str, modules)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.splitlines()[-1])


def test_the_declared_floor_imports_every_rendered_module(rendered):
    floor = declared_floor()
    result = import_under(modal_release(floor), rendered)
    assert result["version"] == floor and result["file"].startswith(str(modal_release(floor)))
    assert result["modules"] == {str(p): None for p in rendered}


def test_the_installed_client_imports_every_rendered_module(rendered):
    assert import_under(None, rendered)["modules"] == {str(p): None for p in rendered}


@pytest.mark.parametrize("version", sorted(BELOW_FLOOR))
def test_releases_below_the_floor_cannot_import_them(rendered, version):
    from packaging.version import Version

    assert Version(version) < Version(declared_floor())
    result = import_under(modal_release(version), rendered)
    assert result["version"] == version
    assert result["modules"] == {str(p): BELOW_FLOOR[version] for p in rendered}


def test_check_reports_a_client_below_the_floor(tmp_path):
    """`liftdeploy check` under a real modal 1.1.3 (first on the path): an error with the fix."""
    release = modal_release("1.1.3")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODAL_")}
    env["PYTHONPATH"] = os.pathsep.join([str(release), str(ROOT)])
    proc = subprocess.run([sys.executable, "-m", "liftdeploy.cli", "check", "deployments/qwen32b.toml"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)
    floor = declared_floor()
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert (f"error[modal-client]: deployments/qwen32b.toml: the installed `modal` client is 1.1.3; the rendered "
            f"module needs `modal>={floor},<2` (older clients lack options it passes)") in lines
    assert f"hint: pip install 'modal>={floor},<2'" in lines
    assert lines[-1] == "checked 2 manifest(s) and env(s): 1 error(s), 0 warning(s)"  # one finding, not one per env
