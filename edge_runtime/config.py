"""The site configuration: one TOML file decoded into strict msgspec Structs.

Unknown keys are errors; every error names the file, the line where it can be placed and the
key path (``site.toml:14: devices[1].port: Expected `int`, got `str```). Every key is
documented in the README's configuration reference (a test checks that).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import msgspec

from .tomlerrors import format_path, line_of, parse_toml, read_text, split_error

__all__ = (
    "ConfigError",
    "DeviceConfig",
    "DsmrDevice",
    "GoodweDevice",
    "HostDevice",
    "HttpConfig",
    "ModbusDevice",
    "MqttConfig",
    "SiteConfig",
    "SiteSection",
    "StoreConfig",
    "SyntheticDevice",
    "load_config",
    "parse_config",
)

Seconds = Annotated[float, msgspec.Meta(gt=0, le=86400)]
Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]
DeviceId = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]


class ConfigError(ValueError):
    """The configuration file is missing, not TOML, or does not fit the schema."""


class _Strict(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    pass


class SiteSection(_Strict, frozen=True):
    node_id: DeviceId
    """This edge installation's id, unique among the sites a hub mirrors."""
    name: str = ""
    """A human name for the site, shown on the dashboard."""


class StoreConfig(_Strict, frozen=True):
    path: str = "gridlet.db"
    """SQLite file; relative paths are relative to the configuration file's folder."""
    commit_interval_ms: Annotated[int, msgspec.Meta(ge=10, le=60000)] = 1000
    """At most one commit this often: the loss window on a power cut."""
    raw_retention_days: Annotated[float, msgspec.Meta(gt=0)] = 7
    rollup_retention_days: Annotated[float, msgspec.Meta(gt=0)] = 365
    max_size_mb: Annotated[float, msgspec.Meta(gt=0)] = 1024
    """Size cap; oldest synced data is evicted first, and every eviction is counted."""


class HttpConfig(_Strict, frozen=True):
    enabled: bool = True
    host: str = "0.0.0.0"  # the dashboard is for the LAN
    port: Port = 8000
    live_rate: Annotated[int, msgspec.Meta(ge=1, le=50)] = 10
    """At most this many live updates a second to each browser."""
    password_hash: str | None = None
    """Made by `gridlet hash-password`; None leaves the dashboard open on the LAN."""


class MqttConfig(_Strict, frozen=True):
    enabled: bool = False
    host: str = "127.0.0.1"
    port: Port = 1883
    username: str | None = None
    password: str | None = None
    topic_prefix: str = "gridlet"
    client_id: str = ""
    """Empty: gridlet-<node_id>."""
    keepalive_s: Annotated[int, msgspec.Meta(ge=5, le=3600)] = 30
    tolerances: dict[str, float] = {}
    """Per field name, the tolerance to keep instead of the default for its unit."""


class _Device(_Strict, tag_field="kind", kw_only=True, frozen=True):
    id: DeviceId
    enabled: bool = True
    interval_s: Seconds = 1.0
    timeout_s: Seconds = 2.0

    @property
    def kind(self) -> str:
        """The ``kind`` key that selected this device type."""
        return str(self.__struct_config__.tag)


class GoodweDevice(_Device, tag="goodwe", kw_only=True, frozen=True):
    host: str
    port: Port = 8899
    """8899 is the UDP protocol of the LAN/WiFi module; 502 is Modbus TCP."""
    family: Literal["ET", "DT", "ES"] | None = None
    """Pin the inverter family; None detects it."""
    wake_after_failures: Annotated[int, msgspec.Meta(ge=1)] = 3
    """Send the discovery broadcast that wakes a stuck LAN module after this many failures."""


class ModbusDevice(_Device, tag="modbus", kw_only=True, frozen=True):
    profile: str
    """A shipped register profile (sdm630, sdm120, generic) or a path to a profile file."""
    transport: Literal["tcp", "rtu", "rtu-over-tcp"] = "tcp"
    host: str | None = None
    port: Port = 502
    serial_port: str | None = None
    baudrate: int = 9600
    parity: Literal["N", "E", "O"] = "N"
    stopbits: Literal[1, 2] = 1
    unit_id: Annotated[int, msgspec.Meta(ge=0, le=247)] = 1
    request_gap_ms: Annotated[int, msgspec.Meta(ge=0, le=10000)] = 20
    """Pause between requests on a shared serial line."""


class DsmrDevice(_Device, tag="dsmr", kw_only=True, frozen=True):
    serial_port: str
    baudrate: int = 115200
    timeout_s: Seconds = 12.0
    """DSMR 5 meters send every second, DSMR 4 every 10 s: offline after this long."""


class HostDevice(_Device, tag="host", kw_only=True, frozen=True):
    interval_s: Seconds = 10.0


class SyntheticDevice(_Device, tag="synthetic", kw_only=True, frozen=True):
    """Generated waveforms, for benchmarks and soak tests; no hardware."""

    fields: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 10


DeviceConfig = GoodweDevice | ModbusDevice | DsmrDevice | HostDevice | SyntheticDevice


class SiteConfig(_Strict, frozen=True):
    site: SiteSection
    store: StoreConfig = StoreConfig()
    http: HttpConfig = HttpConfig()
    mqtt: MqttConfig = MqttConfig()
    devices: list[DeviceConfig] = []

    def __post_init__(self) -> None:
        seen: set[str] = set()
        for i, dev in enumerate(self.devices):
            if dev.id in seen:
                raise ValueError(f"device id {dev.id!r} is used twice - at `$.devices[{i}].id`")
            seen.add(dev.id)
            if isinstance(dev, ModbusDevice):
                needs = "serial_port" if dev.transport == "rtu" else "host"
                if getattr(dev, needs) is None:
                    raise ValueError(
                        f"transport {dev.transport!r} needs `{needs}` - at `$.devices[{i}]`"
                    )


def load_config(path: str | Path) -> SiteConfig:
    """Read and validate a configuration file; raise ConfigError naming file, line and key."""
    p = Path(path)
    return parse_config(read_text(p, ConfigError), str(p))


def parse_config(text: str, filename: str = "<config>") -> SiteConfig:
    raw = parse_toml(text, filename, ConfigError)
    try:
        return msgspec.convert(raw, SiteConfig, strict=True)
    except msgspec.ValidationError as exc:
        raise ConfigError(_locate(str(exc), text, filename)) from exc


def _locate(message: str, text: str, filename: str) -> str:
    """Turn msgspec's ``... - at `$.devices[0].port``` into ``file:line: devices[0].port: ...``."""
    msg, parts = split_error(message)
    key = format_path(parts)
    line = line_of(text, parts)
    where = f"{filename}:{line}" if line else filename
    return f"{where}: {key}: {msg}" if key else f"{where}: {msg}"
