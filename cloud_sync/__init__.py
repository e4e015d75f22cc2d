"""The sync contract between edge and hub: the frame model and the batch codec.

``encode(frames, schemas, ...) -> bytes`` and ``decode(bytes, schemas) -> Batch``; every bad
body raises ``BatchError``.
"""

from .batch import (
    MAX_BODY_BYTES,
    MAX_VALUES,
    WIRE_VERSION,
    Batch,
    BatchError,
    UnknownSchemaError,
    decode,
    encode,
)
from .model import DeviceSchema, Field, Frame, default_field

__all__ = (
    "MAX_BODY_BYTES",
    "MAX_VALUES",
    "WIRE_VERSION",
    "Batch",
    "BatchError",
    "DeviceSchema",
    "Field",
    "Frame",
    "UnknownSchemaError",
    "decode",
    "default_field",
    "encode",
)
