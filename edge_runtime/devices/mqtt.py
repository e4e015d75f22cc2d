"""ESP32 nodes over MQTT: discovery, telemetry frames, heartbeats, status and local commands.

The only module that imports paho. One ``MqttNodes`` driver is the source of every node that
publishes under ``<prefix>/<device_id>/``:

- ``telemetry``: envelope ``{"v":2,"seq":N,"boot":B,"type":"telemetry","ts":ms,"data":{...}}``;
  ``data`` maps field names (carrying their units, ``grid_power_w``) to numbers. The node's
  schema is built from those keys and grows when a new key appears.
- ``hello``: the same envelope with ``type "hello"``; ``data`` holds ``fw``, ``uptime_s``,
  ``free_mem_bytes``, ``rssi_dbm``, which go to the node's ``DeviceStatus.info``.
- ``status``: the retained last-will, ``online``/``offline`` as plain text, or an envelope
  whose ``data.state`` says so.
- ``cmd`` (edge -> node) ``{"v":2,"id":...,"cmd":...,"args":{...}}`` and ``cmd/ack``
  (node -> edge) ``{"v":2,"id":...,...}`` (or an envelope whose ``data`` holds the ``id``).

Sequence numbers: every envelope a node publishes (telemetry, hello, and an ack when it is an
envelope) carries the node's one message counter, so they share one ``(boot, seq)`` sequence.
Same boot and ``seq <= last``: a duplicate, dropped and counted. ``seq > last + 1``: the
missing ``seq - last - 1`` messages are counted in ``seq_gaps``. Another boot: a reboot,
counted, and the sequence restarts from whatever seq comes.

paho runs its network loop on its own thread (``loop_start``) and reconnects by itself; every
callback hands over to the event loop with ``call_soon_threadsafe``, so statuses, schemas and
the sink are only ever touched on the event loop thread, and no exception escapes a callback.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, NamedTuple, TypeGuard

import msgspec
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from cloud_sync import DeviceSchema, Field
from edge_runtime.config import MqttConfig
from edge_runtime.devices.base import (
    DeviceGoneError,
    DeviceStatus,
    DeviceTimeoutError,
    Sink,
    field_from_name,
    now_ms,
)

__all__ = (
    "COMMANDS",
    "ENVELOPE_VERSION",
    "MAX_FIELDS",
    "MAX_PAYLOAD_BYTES",
    "MqttNodes",
    "validate_command",
)

log = logging.getLogger(__name__)

ENVELOPE_VERSION: Final = 2
MAX_PAYLOAD_BYTES: Final = 64 * 1024
"""Larger messages are malformed: a node has no reason to send them, and they would be held
in memory whole."""
MAX_FIELDS: Final = 128
"""Per node: a firmware bug that puts a counter into key names must not grow the schema (and
the runtime's recorded schema versions) forever."""

COMMANDS: Final[Mapping[str, Mapping[str, tuple[float, float]]]] = {
    "set_interval": {"interval_s": (0.1, 3600.0)},
    "identify": {},
    "reboot": {},
}
"""The only commands the edge sends: name -> argument -> allowed (min, max). Every argument
is a required number."""

NODE_KIND: Final = "node"
NODE_MODEL: Final = "mqtt-node"
NODE_COUNTERS: Final = ("seq_gaps", "duplicates", "reboots", "malformed")

# paho's delays are whole seconds (typed int). Doubling from 1 s capped at 4 s puts a connect
# attempt within 4 s of the broker's return, so the driver is back within 5 s; a cap of 5
# would allow 5 s plus the connect itself.
_RECONNECT_MIN_S: Final = 1
_RECONNECT_MAX_S: Final = 4

# An envelope ts outside this window is a node clock that is not set (ms since boot) or
# wrong; the frame gets the edge's time instead. Seven days: raw retention on the edge.
_TS_PAST_MS: Final = 7 * 86_400_000
_TS_FUTURE_MS: Final = 5 * 60_000

_DEVICE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # as config.DeviceId
_FIELD_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
_KINDS: Final = ("telemetry", "hello", "status", "cmd/ack")
_HELLO_FACTS: Final[Mapping[str, tuple[type, ...]]] = {
    "fw": (str,),
    "uptime_s": (int, float),
    "free_mem_bytes": (int,),
    "rssi_dbm": (int, float),
}
_MAX_TEXT = 256


class _MalformedError(Exception):
    """A message that does not fit the protocol; the text is the dead letter's reason."""


class _Envelope(NamedTuple):
    seq: int
    boot: int | str
    ts: float
    data: dict[str, Any]


@dataclass
class _Node:
    device_id: str
    schema: DeviceSchema | None = None
    boot: int | str | None = None
    seq: int = -1


def validate_command(name: str, args: Mapping[str, object] | None = None) -> dict[str, float]:
    """The arguments of a whitelisted command, checked; ValueError for anything else."""
    spec = COMMANDS.get(name)
    if spec is None:
        raise ValueError(f"command {name!r} is not allowed (allowed: {', '.join(COMMANDS)})")
    given = dict(args or {})
    unknown = sorted(set(given) - set(spec))
    if unknown:
        raise ValueError(f"command {name!r} takes no argument {', '.join(unknown)}")
    out: dict[str, float] = {}
    for arg, (lo, hi) in spec.items():
        if arg not in given:
            raise ValueError(f"command {name!r} needs {arg}")
        value = given[arg]
        if not isinstance(value, int | float) or isinstance(value, bool) or not lo <= value <= hi:
            raise ValueError(f"command {name!r}: {arg} must be a number in [{lo:g}, {hi:g}]")
        out[arg] = value
    return out


class MqttNodes:
    """The MQTT broker as a push source of ESP32 nodes (``PushDriver``); each node seen
    becomes a device of kind ``node``; the driver's own status is the device ``mqtt``."""

    device_id = "mqtt"
    kind = "mqtt"

    def __init__(self, cfg: MqttConfig, node_id: str) -> None:
        for key, tol in cfg.tolerances.items():
            field_from_name(key, tol=tol)  # ValueError now rather than at the first frame
        self._cfg = cfg
        self._client_id = cfg.client_id or f"gridlet-{node_id}"
        self._prefix = cfg.topic_prefix.rstrip("/")
        self._nodes: dict[str, _Node] = {}
        self._pending: dict[tuple[str, str], asyncio.Future[dict[str, object]]] = {}
        self._client: mqtt.Client | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sink: Sink | None = None
        self._warned: set[str] = set()  # devices whose malformed messages were logged once
        self._unreachable_logged = False

    # -- public ------------------------------------------------------------------------

    @property
    def nodes(self) -> tuple[str, ...]:
        """The device ids of the nodes seen so far."""
        return tuple(self._nodes)

    def schema_of(self, device_id: str) -> DeviceSchema | None:
        """The current schema of a node (None before its first telemetry)."""
        node = self._nodes.get(device_id)
        return node.schema if node else None

    async def run(self, sink: Sink) -> None:
        """Receive until cancelled. A broker that is down or goes away is retried by paho
        (1 s doubling to 4 s); meanwhile the ``mqtt`` status is offline. Never raises for a
        lost broker: the scheduler has nothing better to do than paho's retries."""
        if self._client is not None:
            raise RuntimeError("MqttNodes.run() is already running")
        loop = asyncio.get_running_loop()
        self._loop, self._sink = loop, sink
        own = self._own_status()
        own.online = False
        own.info.update(broker=f"{self._cfg.host}:{self._cfg.port}", client_id=self._client_id)
        for name in ("connects", "disconnects", "malformed"):
            own.counters.setdefault(name, 0)
        client = self._make_client(loop)
        self._client = client
        self._unreachable_logged = False
        log.info("MQTT: connecting to %s:%d as %s", self._cfg.host, self._cfg.port, self._client_id)
        try:
            client.connect_async(self._cfg.host, self._cfg.port, keepalive=self._cfg.keepalive_s)
            client.loop_start()
            await loop.create_future()  # until cancelled
        finally:
            self._client = None  # from here on, callbacks still queued are ignored
            client.disconnect()
            own.online = False
            for node in self._nodes.values():
                self._node_status(node.device_id).online = False
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(DeviceGoneError("the MQTT driver stopped"))
            # loop_stop joins paho's thread, which may sit in a connect attempt for its
            # 5 s timeout: join it off the event loop.
            await asyncio.to_thread(client.loop_stop)
            log.info("MQTT: disconnected from %s:%d", self._cfg.host, self._cfg.port)

    async def send_command(
        self,
        device_id: str,
        name: str,
        args: Mapping[str, object] | None = None,
        *,
        timeout_s: float = 5.0,
    ) -> dict[str, object]:
        """Send a whitelisted command to a node and return its ack (the JSON object that
        holds the ``id``; ``ok: false`` is the node's refusal, returned as is).

        ValueError: not whitelisted, bad arguments or bad device id. DeviceGoneError: not
        connected to the broker. DeviceTimeoutError: no ack within ``timeout_s``."""
        clean = validate_command(name, args)
        if not _DEVICE_ID.match(device_id) or device_id == self.device_id:
            raise ValueError(f"{device_id!r} is not a node device id")
        client, loop = self._client, self._loop
        # Not connected: refuse now. paho would queue the message and send it on reconnect,
        # and a reboot executed minutes later is worse than an error.
        if client is None or loop is None or not client.is_connected():
            raise DeviceGoneError("not connected to the MQTT broker")
        cmd_id = uuid.uuid4().hex
        key = (device_id, cmd_id)
        fut: asyncio.Future[dict[str, object]] = loop.create_future()
        self._pending[key] = fut
        payload = msgspec.json.encode(
            {"v": ENVELOPE_VERSION, "id": cmd_id, "cmd": name, "args": clean}
        )
        try:
            info = client.publish(self._topic(device_id, "cmd"), payload, qos=1)
            if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                raise DeviceGoneError(f"cannot publish {name}: {mqtt.error_string(info.rc)}")
            log.info("MQTT: %s <- %s %s (id %s)", device_id, name, clean, cmd_id)
            async with asyncio.timeout(timeout_s):
                return await fut
        except TimeoutError as exc:
            raise DeviceTimeoutError(
                f"{device_id}: no ack for {name} within {timeout_s:g} s"
            ) from exc
        finally:
            self._pending.pop(key, None)

    # -- paho's thread -----------------------------------------------------------------

    def _make_client(self, loop: asyncio.AbstractEventLoop) -> mqtt.Client:
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self._client_id,
            clean_session=True,
            protocol=mqtt.MQTTv311,
        )
        if self._cfg.username:
            client.username_pw_set(self._cfg.username, self._cfg.password)
        client.reconnect_delay_set(min_delay=_RECONNECT_MIN_S, max_delay=_RECONNECT_MAX_S)
        paho_log = logging.getLogger(f"{__name__}.paho")
        if paho_log.isEnabledFor(logging.DEBUG):
            # paho logs routine states (e.g. every retry while the broker is down) as errors;
            # this module logs what matters at the right level, paho's own story is detail.
            def on_log(c: mqtt.Client, userdata: Any, level: int, buf: str) -> None:
                paho_log.debug("%s", buf)

            client.on_log = on_log

        def handover(fn: Callable[..., None], *args: object) -> None:
            # Runs on paho's thread: an exception here would end paho's loop.
            try:
                loop.call_soon_threadsafe(self._guarded, fn, client, *args)
            except RuntimeError:  # the event loop is closed: run() is over
                pass
            except Exception:
                log.exception("MQTT: cannot hand %s over to the event loop", fn.__name__)

        def on_connect(
            c: mqtt.Client,
            userdata: Any,
            flags: mqtt.ConnectFlags,
            rc: ReasonCode,
            props: Properties | None,
        ) -> None:
            try:
                if rc.is_failure:
                    handover(self._on_refused, str(rc))
                    return
                # Subscribing here re-subscribes after every reconnect (clean session).
                c.subscribe([(self._topic("+", kind), 1) for kind in _KINDS])
                handover(self._on_connected)
            except Exception:
                log.exception("MQTT: on_connect failed")

        def on_subscribe(
            c: mqtt.Client,
            userdata: Any,
            mid: int,
            rcs: list[ReasonCode],
            props: Properties | None,
        ) -> None:
            try:
                failed = [str(r) for r in rcs if r.is_failure]
                handover(self._on_subscribed, ", ".join(failed))
            except Exception:
                log.exception("MQTT: on_subscribe failed")

        def on_disconnect(
            c: mqtt.Client,
            userdata: Any,
            flags: mqtt.DisconnectFlags,
            rc: ReasonCode,
            props: Properties | None,
        ) -> None:
            handover(self._on_disconnected, str(rc))

        def on_connect_fail(c: mqtt.Client, userdata: Any) -> None:
            handover(self._on_unreachable)

        def on_message(c: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
            try:
                topic = msg.topic
            except UnicodeDecodeError:  # brokers refuse such topics; never trust that
                topic = "<not UTF-8>"
            handover(self._on_message, topic, msg.payload)

        client.on_connect = on_connect
        client.on_subscribe = on_subscribe
        client.on_disconnect = on_disconnect
        client.on_connect_fail = on_connect_fail
        client.on_message = on_message
        return client

    # -- the event loop's thread -------------------------------------------------------

    def _guarded(self, fn: Callable[..., None], client: mqtt.Client, *args: object) -> None:
        if client is not self._client:
            return  # queued by a run() that has ended
        try:
            fn(*args)
        except Exception:
            log.exception("MQTT: handling %s failed", getattr(fn, "__name__", fn))

    def _on_connected(self) -> None:
        self._unreachable_logged = False
        self._own_status().count("connects")
        log.info("MQTT: connected to %s:%d", self._cfg.host, self._cfg.port)

    def _on_subscribed(self, failed: str) -> None:
        own = self._own_status()
        if failed:
            own.last_error = f"subscription refused: {failed}"
            log.error("MQTT: the broker refused the subscriptions: %s", failed)
            return
        # Online means receiving: only once the subscriptions are in place.
        own.online = True
        own.last_seen_ms = now_ms()
        own.last_error = None

    def _on_refused(self, reason: str) -> None:
        own = self._own_status()
        own.online = False
        own.last_error = f"broker refused the connection: {reason}"
        if not self._unreachable_logged:
            self._unreachable_logged = True
            log.error("MQTT: %s refused the connection: %s", self._cfg.host, reason)

    def _on_unreachable(self) -> None:
        own = self._own_status()
        own.online = False
        own.last_error = f"cannot reach the broker at {self._cfg.host}:{self._cfg.port}"
        if not self._unreachable_logged:  # once per outage, not every retry
            self._unreachable_logged = True
            log.warning("MQTT: %s; retrying", own.last_error)

    def _on_disconnected(self, reason: str) -> None:
        own = self._own_status()
        was_online, own.online = own.online, False
        own.count("disconnects")
        own.last_error = f"connection lost: {reason}"
        # Without the broker we cannot see any node; the next message or retained status
        # says they are back.
        for node in self._nodes.values():
            self._node_status(node.device_id).online = False
        if was_online:
            log.warning("MQTT: connection to %s lost: %s", self._cfg.host, reason)

    def _on_message(self, topic: str, payload: bytes) -> None:
        device_id, kind = self._split_topic(topic)
        if device_id is None or not _DEVICE_ID.match(device_id) or device_id == self.device_id:
            self._malformed(None, topic, payload, f"not a node topic: {topic!r}")
            return
        node = self._node(device_id)
        if len(payload) > MAX_PAYLOAD_BYTES:
            reason = f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD_BYTES}"
            self._malformed(node, topic, payload, reason)
            return
        if log.isEnabledFor(logging.DEBUG):  # hex of every message costs on a Pi
            log.debug("MQTT: %s %s", topic, payload.hex())
        try:
            if kind == "telemetry":
                self._telemetry(node, payload)
            elif kind == "hello":
                self._hello(node, payload)
            elif kind == "status":
                self._status(node, payload)
            else:
                self._ack(node, payload)
        except _MalformedError as exc:
            self._malformed(node, topic, payload, str(exc))

    def _telemetry(self, node: _Node, payload: bytes) -> None:
        env = _envelope(payload, "telemetry")
        reading = _reading(env.data)
        known = [f.name for f in node.schema.fields] if node.schema else []
        new = sorted(set(reading) - set(known))
        if len(known) + len(new) > MAX_FIELDS:
            raise _MalformedError(f"more than {MAX_FIELDS} fields")
        status = self._node_status(node.device_id)
        if not self._in_sequence(node, status, env.boot, env.seq):
            return
        if new or node.schema is None:
            node.schema = self._grow(node.schema, new)
            log.info(
                "MQTT: node %s schema: %s",
                node.device_id,
                ", ".join(f.name for f in node.schema.fields),
            )
        values = [reading.get(f.name) for f in node.schema.fields]
        ts = self._plausible_ts(env.ts, status)
        status.seen()
        self._require_sink().frame(node.device_id, node.schema, values, ts_ms=ts)

    def _hello(self, node: _Node, payload: bytes) -> None:
        env = _envelope(payload, "hello")
        facts: dict[str, object] = {}
        for key, value in env.data.items():
            want = _HELLO_FACTS.get(key)
            if want is not None:
                ok = isinstance(value, want) and not isinstance(value, bool)
                if ok and isinstance(value, float):
                    ok = math.isfinite(value)
                if ok and isinstance(value, str):
                    ok = len(value) <= _MAX_TEXT
                if not ok:
                    raise _MalformedError(f"hello {key} has the wrong type")
            elif not (_FIELD_NAME.match(key) and _is_scalar(value)):
                raise _MalformedError(f"hello {key!r} is not a named scalar")
            facts[key] = value
        status = self._node_status(node.device_id)
        if not self._in_sequence(node, status, env.boot, env.seq):
            return
        now = now_ms()
        status.info.update(facts)
        status.info["last_hello_ms"] = now
        # A heartbeat is proof of life but not a reading: `reads` stays as it is.
        status.online = True
        status.last_seen_ms = now

    def _status(self, node: _Node, payload: bytes) -> None:
        if not payload:
            return  # an empty retained message only clears the retained status
        state: object = payload.strip().decode("ascii", "replace")
        if state not in ("online", "offline"):
            if not payload.lstrip().startswith(b"{"):
                raise _MalformedError("status must be online or offline")
            obj = _json_object(payload)
            _check_version(obj)
            data = obj.get("data")
            state = data.get("state") if isinstance(data, dict) else None
            if obj.get("type", "status") != "status" or state not in ("online", "offline"):
                raise _MalformedError("status must be online or offline")
        status = self._node_status(node.device_id)
        status.online = state == "online"
        status.info["state"] = state
        log.info("MQTT: node %s is %s", node.device_id, state)

    def _ack(self, node: _Node, payload: bytes) -> None:
        obj = _json_object(payload)
        _check_version(obj)
        data = obj.get("data")
        ack = obj if "id" in obj or not isinstance(data, dict) else data
        cmd_id = ack.get("id")
        if not isinstance(cmd_id, str) or not cmd_id:
            raise _MalformedError("ack without an id")
        status = self._node_status(node.device_id)
        seq, boot = obj.get("seq"), obj.get("boot")
        # An ack sent as an envelope is part of the node's sequence; a duplicate is dropped.
        if _is_seq(seq) and _is_boot(boot) and not self._in_sequence(node, status, boot, seq):
            return
        fut = self._pending.get((node.device_id, cmd_id))
        if fut is None or fut.done():
            status.count("unmatched_acks")  # late (after its timeout) or not ours
            log.info("MQTT: node %s acked unknown command %s", node.device_id, cmd_id)
            return
        fut.set_result(ack)

    # -- helpers -----------------------------------------------------------------------

    @staticmethod
    def _in_sequence(node: _Node, status: DeviceStatus, boot: int | str, seq: int) -> bool:
        """Update the node's (boot, seq) and count; False for a duplicate to drop."""
        if node.boot is None:
            node.boot, node.seq = boot, seq
            return True
        if boot != node.boot:
            status.count("reboots")
            log.info("MQTT: node %s rebooted (boot %s -> %s)", node.device_id, node.boot, boot)
            node.boot, node.seq = boot, seq
            return True
        if seq <= node.seq:
            status.count("duplicates")
            return False
        if seq > node.seq + 1:
            status.count("seq_gaps", seq - node.seq - 1)
        node.seq = seq
        return True

    def _grow(self, schema: DeviceSchema | None, new: list[str]) -> DeviceSchema:
        # Existing fields keep their places: values already recorded stay aligned.
        fields: list[Field] = list(schema.fields) if schema else []
        for key in new:
            fields.append(field_from_name(key, tol=self._cfg.tolerances.get(key)))
        return DeviceSchema(kind=NODE_KIND, model=NODE_MODEL, fields=tuple(fields))

    @staticmethod
    def _plausible_ts(ts: float, status: DeviceStatus) -> int:
        now = now_ms()
        if now - _TS_PAST_MS <= ts <= now + _TS_FUTURE_MS:
            return int(ts)
        status.count("ts_implausible")
        return now

    def _malformed(self, node: _Node | None, topic: str, payload: bytes, reason: str) -> None:
        device_id = node.device_id if node else self.device_id
        status = self._node_status(device_id) if node else self._own_status()
        status.count("malformed")
        status.last_error = f"malformed message on {topic}: {reason}"
        level = logging.DEBUG if device_id in self._warned else logging.WARNING
        self._warned.add(device_id)
        log.log(level, "MQTT: malformed message on %s: %s", topic, reason)
        # Only the head of an oversize payload is kept: the dead letters are on an SD card.
        head = payload[:MAX_PAYLOAD_BYTES]
        self._require_sink().dead_letter(self.device_id, topic, head, reason)

    def _split_topic(self, topic: str) -> tuple[str | None, str]:
        head = self._prefix + "/"
        if not topic.startswith(head):
            return None, ""
        device_id, _, kind = topic[len(head) :].partition("/")
        return (device_id, kind) if kind in _KINDS else (None, "")

    def _topic(self, device_id: str, kind: str) -> str:
        return f"{self._prefix}/{device_id}/{kind}"

    def _node(self, device_id: str) -> _Node:
        node = self._nodes.get(device_id)
        if node is None:
            node = self._nodes[device_id] = _Node(device_id)
            status = self._node_status(device_id)
            for name in NODE_COUNTERS:
                status.counters.setdefault(name, 0)
            log.info("MQTT: discovered node %s", device_id)
        return node

    def _require_sink(self) -> Sink:
        if self._sink is None:
            raise RuntimeError("MqttNodes is not running")
        return self._sink

    def _node_status(self, device_id: str) -> DeviceStatus:
        return self._require_sink().status(device_id, NODE_KIND)

    def _own_status(self) -> DeviceStatus:
        return self._require_sink().status(self.device_id, self.kind)


# -- envelope validation (pure functions, raise _MalformedError) -----------------------


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_scalar(value: object) -> bool:
    if isinstance(value, str):
        return len(value) <= _MAX_TEXT
    return value is None or isinstance(value, bool) or _is_number(value)


def _is_seq(value: object) -> TypeGuard[int]:
    return type(value) is int and value >= 0


def _is_boot(value: object) -> TypeGuard[int | str]:
    # A boot counter kept in flash, or a random id drawn at boot: either compares by equality.
    if isinstance(value, str):
        return 0 < len(value) <= 64
    return type(value) is int and value >= 0


def _json_object(payload: bytes) -> dict[str, Any]:
    try:
        obj = msgspec.json.decode(payload)
    except (msgspec.MsgspecError, UnicodeDecodeError) as exc:
        raise _MalformedError(f"not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise _MalformedError("not a JSON object")
    return obj


def _check_version(obj: Mapping[str, Any]) -> None:
    v = obj.get("v")
    if type(v) is not int or v != ENVELOPE_VERSION:
        raise _MalformedError(f"envelope version {v!r} is not {ENVELOPE_VERSION}")


def _envelope(payload: bytes, kind: str) -> _Envelope:
    obj = _json_object(payload)
    _check_version(obj)
    missing = [k for k in ("seq", "boot", "type", "ts", "data") if k not in obj]
    if missing:
        raise _MalformedError(f"missing {', '.join(missing)}")
    if obj["type"] != kind:
        raise _MalformedError(f"type {obj['type']!r} on a {kind} topic")
    seq, boot, ts, data = obj["seq"], obj["boot"], obj["ts"], obj["data"]
    if not _is_seq(seq):
        raise _MalformedError("seq must be a non-negative integer")
    if not _is_boot(boot):
        raise _MalformedError("boot must be a non-negative integer or a short string")
    if not _is_number(ts) or not 0 <= ts < 1e15:
        raise _MalformedError("ts must be a number of ms")
    if not isinstance(data, dict):
        raise _MalformedError("data must be an object")
    return _Envelope(seq, boot, float(ts), data)


def _reading(data: Mapping[str, Any]) -> dict[str, float | None]:
    """Telemetry ``data`` as field values: numbers, booleans as 0/1, null as missing."""
    if not data:
        raise _MalformedError("data is empty")
    out: dict[str, float | None] = {}
    for key, raw in data.items():
        if not _FIELD_NAME.match(key):
            raise _MalformedError(f"field name {key[:80]!r} is not an identifier")
        if raw is None:
            out[key] = None
            continue
        if not (isinstance(raw, bool) or _is_number(raw)):
            raise _MalformedError(f"{key} is a {type(raw).__name__}, not a number")
        try:
            value = float(raw)
        except OverflowError:  # an integer beyond float range
            value = math.inf
        if not math.isfinite(value):
            raise _MalformedError(f"{key} is out of range")
        out[key] = value
    return out
