"""The sync contract between edge and hub: the frame model, the batch codec, node signing
keys, the HTTP conversation (``protocol``), the rollups both sides compute, and the edge's
uploader.

``encode(frames, schemas, ...) -> bytes`` and ``decode(bytes, schemas) -> Batch``; every bad
body raises ``BatchError``.
"""

from .batch import (
    MAX_BODY_BYTES,
    MAX_VALUES,
    WIRE_VERSION,
    Batch,
    BatchError,
    ChainError,
    UnknownSchemaError,
    decode,
    encode,
)
from .model import DeviceHealth, DeviceSchema, Field, Frame, Loss, NodeStatus, default_field

__all__ = (
    "MAX_BODY_BYTES",
    "MAX_VALUES",
    "WIRE_VERSION",
    "Batch",
    "BatchError",
    "ChainError",
    "DeviceHealth",
    "DeviceSchema",
    "Field",
    "Frame",
    "Loss",
    "NodeStatus",
    "UnknownSchemaError",
    "decode",
    "default_field",
    "encode",
)
