"""The error-bounded exponential-smoothing codec that edge and hub run identically.

``compiled`` tells which implementation is loaded: the Cython extension built from
``_codec.py`` (True) or that same file run as pure Python (False). Both give bit-identical
results; ``pure`` is always the pure twin, for tests and benchmarks. Setting the environment
variable ``GRIDLET_PURE=1`` loads the pure twin even where the extension is built.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

from ._errors import CodecError

__all__ = (
    "ALPHA_ONE",
    "LEVEL",
    "MISSING",
    "MISSING_BITS",
    "RESIDUAL_SPECIAL",
    "TREND",
    "CodecError",
    "bucket_stats",
    "compiled",
    "decode_block",
    "encode_block",
    "implementation",
    "merge_stats",
    "new_state",
    "pack_values",
    "pure",
    "unpack_values",
)


def _load_pure() -> ModuleType:
    """Import _codec.py as source under its own name, whatever extension sits beside it."""
    name = __name__ + "._codec_pure"
    if name in sys.modules:
        return sys.modules[name]
    path = Path(__file__).with_name("_codec.py")
    loader = importlib.machinery.SourceFileLoader(name, str(path))
    spec = importlib.util.spec_from_loader(name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    loader.exec_module(module)
    return module


pure = _load_pure()

if os.environ.get("GRIDLET_PURE", "") in ("", "0"):
    from . import _codec as implementation
else:
    implementation = pure

compiled: bool = not implementation.__file__.endswith(".py") if implementation.__file__ else False

ALPHA_ONE = implementation.ALPHA_ONE
LEVEL = implementation.LEVEL
TREND = implementation.TREND
MISSING = implementation.MISSING
MISSING_BITS = implementation.MISSING_BITS
RESIDUAL_SPECIAL = implementation.RESIDUAL_SPECIAL
new_state = implementation.new_state
encode_block = implementation.encode_block
decode_block = implementation.decode_block
bucket_stats = implementation.bucket_stats
merge_stats = implementation.merge_stats
pack_values = implementation.pack_values
unpack_values = implementation.unpack_values
