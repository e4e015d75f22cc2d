"""The upload wire format: telemetry.proto and the Python code generated from it at build time."""
