"""Site configuration: strict decoding, errors naming file, line and key, documented keys."""

from __future__ import annotations

import re
from pathlib import Path
from typing import cast

import msgspec
import pytest
from click.testing import CliRunner

from edge_runtime import config as c
from edge_runtime.cli import main

README = Path(__file__).resolve().parents[2] / "README.md"

GOOD = """\
[site]
node_id = "home-1"

[[devices]]
id = "inverter"
kind = "goodwe"
host = "127.0.0.2"

[[devices]]
id = "grid-meter"
kind = "modbus"
profile = "sdm630"
host = "127.0.0.1"
port = 5020
"""


def error(text: str) -> str:
    with pytest.raises(c.ConfigError) as err:
        c.parse_config(text, "site.toml")
    return str(err.value)


def test_good_config_decodes_with_defaults() -> None:
    cfg = c.parse_config(GOOD, "site.toml")
    inverter, meter = cfg.devices
    assert (
        isinstance(inverter, c.GoodweDevice) and inverter.port == 8899 and inverter.kind == "goodwe"
    )
    assert isinstance(meter, c.ModbusDevice) and meter.port == 5020 and meter.transport == "tcp"
    assert cfg.store.commit_interval_ms == 1000 and cfg.store.max_size_mb == 1024


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            GOOD.replace("port = 5020", 'port = "5020"'),
            "site.toml:14: devices[1].port: Expected `int`, got `str`",
        ),
        (
            GOOD + "colour = 1\n",
            "site.toml:15: devices[1].colour: Object contains unknown field `colour`",
        ),
        (
            GOOD.replace('host = "127.0.0.2"\n', ""),
            "site.toml:4: devices[0].host: Object missing required field `host`",
        ),
        (
            GOOD.replace('"goodwe"', '"goodwee"'),
            "site.toml:6: devices[0].kind: Invalid value 'goodwee'",
        ),
        (
            GOOD.replace("node_id", "nodeid"),
            "site.toml:2: site.nodeid: Object contains unknown field `nodeid`",
        ),
        (
            GOOD.replace('"grid-meter"', '"inverter"'),
            "site.toml:10: devices[1].id: device id 'inverter' is used twice",
        ),
        (
            GOOD.replace("port = 5020", 'transport = "rtu"'),
            "site.toml:9: devices[1]: transport 'rtu' needs `serial_port`",
        ),
        (
            GOOD.replace("port = 5020", "port = 70000"),
            "site.toml:14: devices[1].port: Expected `int` <= 65535",
        ),
        (
            GOOD.replace('"home-1"', '"bad id!"'),
            "site.toml:2: site.node_id: Expected `str` matching regex",
        ),
        ("[site]\nnode_id = 'a'\n[store\n", "site.toml:3: not valid TOML"),
        ("[site]\n", "site.toml:1: site.node_id: Object missing required field `node_id`"),
    ],
)
def test_errors_name_file_line_and_key(text: str, expected: str) -> None:
    assert error(text).startswith(expected)


def test_missing_file() -> None:
    with pytest.raises(c.ConfigError, match=r"nope.toml: cannot read"):
        c.load_config("nope.toml")


def test_check_config_command(tmp_path: Path) -> None:
    good = tmp_path / "site.toml"
    good.write_text(GOOD)
    result = CliRunner().invoke(main, ["check-config", str(good)])
    assert result.exit_code == 0, result.output
    assert "ok: site home-1; devices: inverter (goodwe), grid-meter (modbus)" in result.output
    bad = tmp_path / "bad.toml"
    bad.write_text(GOOD.replace("port = 5020", 'port = "x"'))
    result = CliRunner().invoke(main, ["check-config", str(bad)])
    assert result.exit_code == 1
    assert f"{bad}:14: devices[1].port: Expected `int`, got `str`" in result.output


def documented_keys() -> list[str]:
    """Every key a site.toml may hold, spelled as the README's reference names it."""
    keys: list[str] = []
    sections: dict[str, type[msgspec.Struct]] = {
        "site": c.SiteSection,
        "store": c.StoreConfig,
        "http": c.HttpConfig,
        "mqtt": c.MqttConfig,
        "sync": c.SyncConfig,
    }
    for name, struct in sections.items():
        keys += [f"{name}.{f.name}" for f in msgspec.structs.fields(struct)]
    base = cast("type[msgspec.Struct]", c._Device)
    common = {f.name: f.default for f in msgspec.structs.fields(base)}
    keys += ["devices.kind", *(f"devices.{k}" for k in sorted(common))]
    kinds: tuple[type[msgspec.Struct], ...] = (
        c.GoodweDevice,
        c.ModbusDevice,
        c.DsmrDevice,
        c.HostDevice,
        c.SyntheticDevice,
    )
    for kind in kinds:
        tag = kind.__struct_config__.tag
        keys += [  # a kind's own keys, and common keys whose default it changes
            f"devices.{tag}.{f.name}"
            for f in msgspec.structs.fields(kind)
            if f.name not in common or f.default != common[f.name]
        ]
    return keys


def test_every_config_key_is_documented_in_the_readme() -> None:
    text = README.read_text()
    missing = [k for k in documented_keys() if f"`{k}`" not in text]
    assert missing == [], f"README lacks these configuration keys: {missing}"


def test_the_readme_example_config_is_valid() -> None:
    text = README.read_text()
    blocks = re.findall(r"```toml\n(.*?)```", text, re.S)
    examples = [b for b in blocks if "[site]" in b]
    assert examples, "the README has no example site.toml"
    for block in examples:
        c.parse_config(block, "README.md")


@pytest.mark.parametrize(
    ("sync", "message"),
    [
        ('enabled = true\nhub_url = "ftp://x"', "sync.hub_url: expected an http(s) URL"),
        ('enabled = true\nhub_url = "http://hub.example.org"', "plain http to another machine"),
        ("enabled = true\ninterval_s = 0.01", "sync.interval_s"),
    ],
)
def test_sync_section_errors(sync: str, message: str) -> None:
    text = f'[site]\nnode_id = "a"\n\n[sync]\n{sync}\n'
    with pytest.raises(c.ConfigError, match=re.escape(message)):
        c.parse_config(text, "site.toml")


def test_sync_to_loopback_http_or_when_allowed() -> None:
    base = '[site]\nnode_id = "a"\n[sync]\nenabled = true\n'
    assert c.parse_config(base + 'hub_url = "http://127.0.0.1:8100"\n').sync.enabled
    cfg = c.parse_config(base + 'hub_url = "http://10.0.0.5"\nallow_insecure_http = true\n')
    assert cfg.sync.allow_insecure_http
