"""The one exception type of the codec, shared by the compiled and the pure implementation."""

__all__ = ("CodecError",)


class CodecError(ValueError):
    """A coded block is corrupt, truncated or inconsistent with its declared sizes."""
