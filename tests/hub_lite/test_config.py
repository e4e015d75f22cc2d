"""hub.toml: strict keys, errors naming file, line and key, every key in the README."""

from __future__ import annotations

import re
from pathlib import Path

import msgspec
import pytest

from hub_lite import config as hc

README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[hub]\nport = 'x'\n", "hub.toml:2: hub.port: Expected `int`, got `str`"),
        ("[ingest]\nmax_body_bytes = 5\n", "hub.toml:2: ingest.max_body_bytes"),
        ("[hub]\nflavour = 1\n", "hub.toml:2: hub.flavour: Object contains unknown field"),
        ("[storage]\nurl = 'mysql://x'\n", "storage.url"),
        ("[hub]\nworkers = 2\n", "several workers need PostgreSQL"),
        ("[hub\n", "hub.toml:1: not valid TOML"),
    ],
)
def test_errors_name_file_line_and_key(text: str, message: str) -> None:
    with pytest.raises(hc.HubConfigError, match=re.escape(message)):
        hc.parse_hub_config(text, "hub.toml")


def test_every_hub_key_is_documented_in_the_readme() -> None:
    readme = README.read_text(encoding="utf-8")
    sections: dict[str, type[msgspec.Struct]] = {
        "hub": hc.HubSection,
        "storage": hc.StorageConfig,
        "ingest": hc.IngestConfig,
        "retention": hc.RetentionConfig,
    }
    for name, struct in sections.items():
        for f in msgspec.structs.fields(struct):
            assert f"`{name}.{f.name}`" in readme, f"README lacks {name}.{f.name}"


def test_defaults_load() -> None:
    cfg = hc.parse_hub_config("")
    assert cfg.storage.url == "sqlite:///hub.db"
    assert cfg.hub.host == "127.0.0.1"
