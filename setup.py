"""Build: the Cython codec extension and the protobuf code generated from proto/*.proto.

GRIDLET_PURE=1 builds without a C compiler: no extension, and predictor_ext runs its pure twin.
"""

from __future__ import annotations

import os
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildWithProto(build_py):
    """Generate proto/*_pb2.py (and .pyi stubs) with the protoc that grpcio-tools bundles."""

    def run(self) -> None:
        super().run()
        out = ROOT if getattr(self, "editable_mode", False) else Path(self.build_lib)
        generate_proto(out)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        outputs = super().get_outputs(include_bytecode)
        if not getattr(self, "editable_mode", False):
            for proto in sorted((ROOT / "proto").glob("*.proto")):
                for suffix in ("_pb2.py", "_pb2.pyi"):
                    outputs.append(str(Path(self.build_lib) / "proto" / (proto.stem + suffix)))
        return outputs


def generate_proto(out: Path) -> None:
    import grpc_tools
    from grpc_tools import protoc

    include = Path(grpc_tools.__file__).parent / "_proto"
    (out / "proto").mkdir(parents=True, exist_ok=True)
    for proto in sorted((ROOT / "proto").glob("*.proto")):
        args = [
            "protoc",
            f"-I{ROOT}",
            f"-I{include}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            str(proto.relative_to(ROOT)),
        ]
        if protoc.main(args) != 0:
            raise SystemExit(f"protoc failed on {proto}")


def extensions() -> list:
    if os.environ.get("GRIDLET_PURE", "") not in ("", "0"):
        return []
    from Cython.Build import cythonize
    from setuptools import Extension

    ext = Extension(
        "predictor_ext._codec",
        ["predictor_ext/_codec.py"],
        # No contraction of a*b+c into FMA: the twin and every CPU must round alike.
        extra_compile_args=["-O3", "-ffp-contract=off", "-fno-fast-math"],
    )
    return cythonize(
        [ext],
        language_level=3,
        compiler_directives={
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": False,
        },
    )


setup(ext_modules=extensions(), cmdclass={"build_py": BuildWithProto})
