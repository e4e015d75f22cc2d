"""The web front end (static HTML/JS/CSS) that the edge dashboard and the hub both serve."""

from pathlib import Path

__all__ = ("STATIC_DIR",)

STATIC_DIR = Path(__file__).resolve().parent / "static"
"""index.html, app.js, style.css and vendor/ (uPlot, copied from npm at build time)."""
