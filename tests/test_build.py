"""The build: protobuf code generated at build time, and the compiler-free pure build."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_nothing_generated_is_committed() -> None:
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True, timeout=60
    ).stdout.split()
    generated = [p for p in tracked if p.endswith(("_pb2.py", "_pb2.pyi", ".so", ".c"))]
    assert generated == []
    assert "proto/telemetry.proto" in tracked


@pytest.fixture(scope="module")
def pure_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    env = {**os.environ, "GRIDLET_PURE": "1"}
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(out), str(ROOT)],
        check=True, env=env, timeout=600, capture_output=True,
    )  # fmt: skip
    (wheel,) = out.glob("gridlet-*.whl")
    return wheel


def test_pure_build_has_no_extension_but_generated_protobuf(pure_wheel: Path) -> None:
    names = zipfile.ZipFile(pure_wheel).namelist()
    assert "proto/telemetry_pb2.py" in names
    assert "predictor_ext/_codec.py" in names and "predictor_ext/_codec.pyi" in names
    assert "predictor_ext/py.typed" in names
    assert not [n for n in names if n.endswith((".so", ".pyd", ".c"))]


def test_pure_build_runs_the_twin(pure_wheel: Path, tmp_path: Path) -> None:
    zipfile.ZipFile(pure_wheel).extractall(tmp_path)
    code = (
        "import predictor_ext, cloud_sync; "
        "s = cloud_sync.DeviceSchema('meter', 'x', (cloud_sync.default_field('p_w', 'W', 5),)); "
        "f = [cloud_sync.Frame('m', i, i, (float(i * 7),)) for i in range(50)]; "
        "b = cloud_sync.decode(cloud_sync.encode(f, {'m': s}, node_id='n', batch_id=1, "
        "created_ms=0)); "
        "assert all(abs(a.values[0] - g.values[0]) <= 5 for a, g in zip(f, b.frames)); "
        "print(predictor_ext.compiled, predictor_ext.implementation.__file__)"
    )
    env = {"PYTHONPATH": str(tmp_path), "PATH": os.environ.get("PATH", "")}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
        check=True, timeout=120,
    )  # fmt: skip
    compiled, path = out.stdout.split()
    assert compiled == "False"
    assert path.startswith(str(tmp_path)) and path.endswith("_codec.py")
