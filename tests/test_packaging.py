"""The wheel users install holds every module of the source tree, the ``py.typed`` marker and the
one version number (``.ci/run`` also installs it into a fresh environment and runs the README)."""

from __future__ import annotations

import pathlib
import subprocess
import sys
import zipfile

import lightning_kr

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_wheel_ships_every_module_and_the_type_marker(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("lightning_kr-*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    sources = {
        f"lightning_kr/{path.relative_to(ROOT / 'lightning_kr').as_posix()}"
        for path in (ROOT / "lightning_kr").rglob("*.py")
    } | {
        f"lightning_kr/callbacks/{path.relative_to(ROOT / 'callbacks').as_posix()}"
        for path in (ROOT / "callbacks").rglob("*.py")
    }
    assert sources - shipped == set(), "modules missing from the wheel"
    assert "lightning_kr/py.typed" in shipped
    assert wheel.name.startswith(f"lightning_kr-{lightning_kr.__version__}-")
