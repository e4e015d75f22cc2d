"""The site configuration: one TOML file decoded into strict msgspec Structs.

Unknown keys are errors; every error names the file, the line where it can be placed and the
key path (``site.toml:14: devices[1].port: Expected `int`, got `str```). Every key is
documented in the README's configuration reference (a test checks that).
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

import msgspec

from cloud_sync.tomlerrors import decode_toml, read_text

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
    "SyncConfig",
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


class SyncConfig(_Strict, frozen=True):
    enabled: bool = False
    hub_url: str = ""
    """The hub's base URL, e.g. https://hub.example.org (the uploader POSTs /api/v1/batches)."""
    key_file: str = "node.key"
    """This node's private signing key (made by `gridlet keygen`); relative paths are relative
    to the store's folder."""
    interval_s: Annotated[float, msgspec.Meta(ge=0.2, le=60)] = 5.0
    """Live batches go this often: the hub's copy lags the site by about this much."""
    max_rows: Annotated[int, msgspec.Meta(ge=1, le=10000)] = 600
    """Rows per device in one batch (a backlog drains in batches of this many)."""
    allow_insecure_http: bool = False
    """Allow http:// to a hub that is not on this machine (a private network's choice)."""


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
    sync: SyncConfig = SyncConfig()
    devices: list[DeviceConfig] = []

    def __post_init__(self) -> None:
        _check_sync(self.sync)
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


def _check_sync(sync: SyncConfig) -> None:
    if not sync.enabled:
        return
    url = urlsplit(sync.hub_url)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise ValueError(f"expected an http(s) URL, got {sync.hub_url!r} - at `$.sync.hub_url`")
    if url.scheme == "http" and not sync.allow_insecure_http and not _loopback(url.hostname):
        raise ValueError(
            "plain http to another machine sends readings in clear; use https or set"
            " sync.allow_insecure_http = true - at `$.sync.hub_url`"
        )


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_config(path: str | Path) -> SiteConfig:
    """Read and validate a configuration file; raise ConfigError naming file, line and key."""
    p = Path(path)
    return parse_config(read_text(p, ConfigError), str(p))


def parse_config(text: str, filename: str = "<config>") -> SiteConfig:
    return decode_toml(text, filename, SiteConfig, ConfigError)
