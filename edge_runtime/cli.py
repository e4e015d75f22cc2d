"""The `gridlet` command line: one entry point for the edge runtime's commands."""

from __future__ import annotations

import click

import predictor_ext

__all__ = ("main",)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="gridlet")
def main() -> None:
    """gridlet: edge runtime for energy sites (inverters, meters, ESP32 nodes)."""


@main.command("codec-info")
def codec_info() -> None:
    """Say which predictor codec implementation is loaded (compiled or pure)."""
    impl = "compiled (Cython extension)" if predictor_ext.compiled else "pure Python twin"
    click.echo(f"predictor_ext: {impl}")
