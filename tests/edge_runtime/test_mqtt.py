"""MqttNodes against a real mosquitto: fake ESP32 nodes are paho clients publishing real
envelopes, the driver hands what it gets to a recording sink."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from cloud_sync import DeviceSchema
from edge_runtime.config import MqttConfig
from edge_runtime.devices.base import (
    DeviceGoneError,
    DeviceStatus,
    DeviceTimeoutError,
    Values,
    now_ms,
)
from edge_runtime.devices.mqtt import MAX_PAYLOAD_BYTES, MqttNodes, validate_command
from tests.edge_runtime.mosquitto import Mosquitto, mosquitto_fixture  # noqa: F401

PREFIX = "gridlet"
WAIT_S = 5.0


# -- a sink that records, and lets a test wait for a condition ------------------------


@dataclass(frozen=True)
class Recorded:
    device_id: str
    schema: DeviceSchema
    values: tuple[float | None, ...]
    ts_ms: int | None


class RecordingSink:
    def __init__(self) -> None:
        self.frames: list[Recorded] = []
        self.statuses: dict[str, DeviceStatus] = {}
        self.dead: list[tuple[str, str, bytes, str]] = []
        self._changed = asyncio.Event()

    def frame(
        self, device_id: str, schema: DeviceSchema, values: Values, ts_ms: int | None = None
    ) -> None:
        assert len(values) == len(schema.fields)
        self.frames.append(Recorded(device_id, schema, tuple(values), ts_ms))
        self._changed.set()

    def status(self, device_id: str, kind: str) -> DeviceStatus:
        st = self.statuses.get(device_id)
        if st is None:
            st = self.statuses[device_id] = DeviceStatus(device_id, kind)
        assert st.kind == kind
        # The driver changes the record right after this call, before it yields to the
        # event loop: a waiter woken by this sees the change.
        self._changed.set()
        return st

    def dead_letter(self, source: str, key: str, payload: bytes, reason: str) -> None:
        self.dead.append((source, key, payload, reason))
        self._changed.set()

    def counter(self, device_id: str, name: str) -> int:
        st = self.statuses.get(device_id)
        return st.counters.get(name, 0) if st else 0

    def online(self, device_id: str) -> bool:
        st = self.statuses.get(device_id)
        return bool(st and st.online)

    def frames_of(self, device_id: str) -> list[Recorded]:
        return [f for f in self.frames if f.device_id == device_id]

    async def wait_for(
        self,
        cond: Callable[[], bool],
        what: str,
        timeout: float = WAIT_S,
        detail: Callable[[], str] = lambda: "",
    ) -> None:
        try:
            async with asyncio.timeout(timeout):
                while not cond():
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            pytest.fail(f"timed out after {timeout} s waiting for {what} {detail()}".rstrip())


# -- a fake ESP32 node ----------------------------------------------------------------


class FakeNode:
    """What the broker sees of an ESP32 node: its last will on ``status``, retained
    ``online`` once connected, envelopes with one message counter, acks to commands."""

    def __init__(self, broker: Mosquitto, device_id: str, *, boot: int | str = 1) -> None:
        self.broker = broker
        self.device_id = device_id
        self.boot = boot
        self.seq = 0
        self.ack: str | None = "plain"  # "plain", "envelope" or None (never acks)
        self.commands: list[dict[str, Any]] = []
        self._client: mqtt.Client | None = None

    def topic(self, kind: str) -> str:
        return f"{PREFIX}/{self.device_id}/{kind}"

    def envelope(self, kind: str, data: Any, seq: int | None = None, ts: Any = None) -> bytes:
        if seq is None:
            self.seq += 1
            seq = self.seq
        ts = now_ms() if ts is None else ts
        env = {"v": 2, "seq": seq, "boot": self.boot, "type": kind, "ts": ts, "data": data}
        return json.dumps(env).encode()

    async def connect(self) -> None:
        assert self._client is None
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"fake-{self.device_id}",
            clean_session=True,
            reconnect_on_failure=False,  # a lost connection ends the client: tests reconnect
        )
        client.will_set(self.topic("status"), "offline", qos=1, retain=True)
        client.max_inflight_messages_set(100)
        ready = threading.Event()

        def on_connect(
            c: mqtt.Client, u: Any, f: mqtt.ConnectFlags, rc: ReasonCode, p: Properties | None
        ) -> None:
            c.publish(self.topic("status"), "online", qos=1, retain=True)
            c.subscribe(self.topic("cmd"), qos=1)

        def on_subscribe(
            c: mqtt.Client, u: Any, mid: int, rcs: list[ReasonCode], p: Properties | None
        ) -> None:
            ready.set()

        def on_message(c: mqtt.Client, u: Any, msg: mqtt.MQTTMessage) -> None:
            cmd = json.loads(msg.payload)
            self.commands.append(cmd)
            reply = {"id": cmd["id"], "ok": True, "cmd": cmd["cmd"]}
            if self.ack == "plain":
                c.publish(self.topic("cmd/ack"), json.dumps({"v": 2, **reply}), qos=1)
            elif self.ack == "envelope":
                c.publish(self.topic("cmd/ack"), self.envelope("ack", reply), qos=1)

        client.on_connect = on_connect
        client.on_subscribe = on_subscribe
        client.on_message = on_message
        client.connect_async(self.broker.host, self.broker.port, keepalive=10)
        client.loop_start()
        self._client = client
        if not await asyncio.to_thread(ready.wait, WAIT_S):
            await self.close()
            pytest.fail(f"fake node {self.device_id} could not connect")

    def publish(self, kind: str, payload: bytes) -> None:
        self.publish_to(self.topic(kind), payload)

    def publish_to(self, topic: str, payload: bytes) -> None:
        assert self._client is not None
        info = self._client.publish(topic, payload, qos=1)
        assert info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS

    def send(self, kind: str, data: Any, *, seq: int | None = None, ts: Any = None) -> None:
        self.publish(kind, self.envelope(kind, data, seq=seq, ts=ts))

    async def drop(self) -> None:
        """Lose the connection without DISCONNECT (power cut): the broker sends the will."""
        assert self._client is not None
        sock = self._client.socket()
        assert isinstance(sock, socket.socket)
        sock.shutdown(socket.SHUT_RDWR)
        await self.close()

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.disconnect()
            await asyncio.to_thread(client.loop_stop)


# -- fixtures ---------------------------------------------------------------------------


def _paho_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("paho-mqtt-client-")]


@pytest.fixture(autouse=True)
def no_thread_left() -> Iterator[None]:
    before = set(_paho_threads())
    yield
    assert set(_paho_threads()) - before == set(), "a paho thread outlived its test"


@pytest.fixture
def sink() -> RecordingSink:
    return RecordingSink()


@pytest.fixture
async def nodes(mosquitto: Mosquitto) -> AsyncIterator[Callable[..., FakeNode]]:
    made: list[FakeNode] = []

    def make(device_id: str = "esp-1", **kw: Any) -> FakeNode:
        node = FakeNode(mosquitto, device_id, **kw)
        made.append(node)
        return node

    yield make
    for node in made:
        await node.close()


def make_driver(broker: Mosquitto, **kw: Any) -> MqttNodes:
    cfg = MqttConfig(
        enabled=True,
        host=broker.host,
        port=broker.port,
        topic_prefix=PREFIX,
        keepalive_s=5,
        tolerances={"temp_c": 0.2},
        **kw,
    )
    return MqttNodes(cfg, node_id="site-1")


@contextlib.asynccontextmanager
async def running(
    driver: MqttNodes, sink: RecordingSink, *, wait_online: bool = True
) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(driver.run(sink), name="mqtt-driver")
    try:
        if wait_online:
            await sink.wait_for(lambda: sink.online("mqtt") or task.done(), "the driver online")
            assert not task.done(), task
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


# -- discovery, schema, frames -----------------------------------------------------------


async def test_discovery_schema_units_tolerances_and_frames(
    mosquitto: Mosquitto, sink: RecordingSink, nodes: Callable[..., FakeNode]
) -> None:
    driver = make_driver(mosquitto)
    async with running(driver, sink):
        node = nodes("esp-1")
        await node.connect()
        ts = now_ms() - 1500
        data = {"temp_c": 21.25, "grid_power_w": 1234.5, "relay_on": True, "voltage_v": None}
        node.send("telemetry", data, ts=ts)
        await sink.wait_for(lambda: len(sink.frames) == 1, "the first frame")

        first = sink.frames[0]
        assert first.device_id == "esp-1"
        assert first.ts_ms == ts  # a plausible node clock is kept
        schema = first.schema
        assert schema.kind == "node"
        assert [f.name for f in schema.fields] == [
            "grid_power_w",
            "relay_on",
            "temp_c",
            "voltage_v",
        ]
        assert [f.unit for f in schema.fields] == ["W", "", "C", "V"]
        tols = {f.name: f.tol for f in schema.fields}
        assert tols["temp_c"] == 0.2  # the configured override
        assert tols["grid_power_w"] == 5.0  # the default for W
        assert tols["voltage_v"] == 0.1
        assert first.values == (1234.5, 1.0, 21.25, None)
        assert driver.nodes == ("esp-1",)
        assert driver.schema_of("esp-1") == schema

        # A new key grows the schema at the end; a key left out is a missing value.
        node.send("telemetry", {"grid_power_w": -50, "energy_kwh": 12.5, "temp_c": 22})
        await sink.wait_for(lambda: len(sink.frames) == 2, "the second frame")
        grown = sink.frames[1]
        assert [f.name for f in grown.schema.fields] == [
            "grid_power_w",
            "relay_on",
            "temp_c",
            "voltage_v",
            "energy_kwh",
        ]
        assert grown.schema.fields[4].unit == "kWh"
        assert grown.values == (-50.0, None, 22.0, None, 12.5)

        # A node whose clock is not set (ms since boot): the frame gets the edge's time.
        before = now_ms()
        node.send("telemetry", {"grid_power_w": 1}, ts=5000)
        await sink.wait_for(lambda: len(sink.frames) == 3, "the third frame")
        third = sink.frames[2]
        assert third.schema == grown.schema  # no new key, no new schema
        assert third.ts_ms is not None and before <= third.ts_ms <= now_ms()
        st = sink.statuses["esp-1"]
        assert st.counters["ts_implausible"] == 1
        assert st.kind == "node" and st.online and st.reads == 3
        assert {k: st.counters[k] for k in ("seq_gaps", "duplicates", "reboots", "malformed")} == {
            "seq_gaps": 0,
            "duplicates": 0,
            "reboots": 0,
            "malformed": 0,
        }


async def test_hello_fills_info(
    mosquitto: Mosquitto, sink: RecordingSink, nodes: Callable[..., FakeNode]
) -> None:
    async with running(make_driver(mosquitto), sink):
        node = nodes("esp-hello")
        await node.connect()
        hello = {"fw": "1.4.2", "uptime_s": 3600, "free_mem_bytes": 81234, "rssi_dbm": -67}
        node.send("hello", hello)
        await sink.wait_for(
            lambda: "last_hello_ms" in sink.statuses.get("esp-hello", DeviceStatus("", "")).info,
            "the hello",
        )
        st = sink.statuses["esp-hello"]
        assert {k: st.info[k] for k in hello} == hello
        assert isinstance(st.info["last_hello_ms"], int)
        assert st.online and st.reads == 0  # a heartbeat is not a reading
        assert sink.frames == []


# -- status: retained, last will -------------------------------------------------------


async def test_retained_status_and_last_will(
    mosquitto: Mosquitto, sink: RecordingSink, nodes: Callable[..., FakeNode]
) -> None:
    node = nodes("esp-lwt")
    await node.connect()  # publishes retained "online" before the driver exists
    async with running(make_driver(mosquitto), sink):
        await sink.wait_for(lambda: sink.online("esp-lwt"), "the retained online status")
        assert sink.statuses["esp-lwt"].kind == "node"
        await node.drop()  # no DISCONNECT: the broker publishes the will
        await sink.wait_for(lambda: not sink.online("esp-lwt"), "the last will")
        assert sink.statuses["esp-lwt"].info["state"] == "offline"

        # The JSON form of the status is understood too.
        other = nodes("esp-json")
        await other.connect()
        await sink.wait_for(lambda: sink.online("esp-json"), "esp-json online")
        other.publish("status", json.dumps({"v": 2, "data": {"state": "offline"}}).encode())
        await sink.wait_for(lambda: not sink.online("esp-json"), "esp-json offline")

    # The will was retained: a driver started now learns the node is offline.
    later = RecordingSink()
    async with running(make_driver(mosquitto, client_id="second"), later):
        await later.wait_for(lambda: "esp-lwt" in later.statuses, "the retained will")
        assert not later.online("esp-lwt")
        assert later.statuses["esp-lwt"].info["state"] == "offline"


# -- sequence: gaps, duplicates, reboots -------------------------------------------------


async def test_gaps_duplicates_and_reboots(
    mosquitto: Mosquitto, sink: RecordingSink, nodes: Callable[..., FakeNode]
) -> None:
    async with running(make_driver(mosquitto), sink):
        node = nodes("esp-seq", boot=7)
        await node.connect()
        # (seq, value): the value says which telemetry messages must become frames.
        plan = [(1, 1), (2, 2), (3, 3), (3, None), (2, None), (6, 6), (7, 7)]
        for seq, value in plan:
            node.send("telemetry", {"x_w": value if value is not None else -1}, seq=seq)
        node.send("hello", {"fw": "1.0"}, seq=8)  # hello shares the node's counter
        node.send("telemetry", {"x_w": 9}, seq=9)
        node.boot = 8  # the node rebooted: its counter starts again
        node.send("telemetry", {"x_w": 101}, seq=1)
        node.send("telemetry", {"x_w": 102}, seq=2)
        node.send("telemetry", {"x_w": 102}, seq=2)
        await sink.wait_for(
            lambda: sink.counter("esp-seq", "duplicates") == 3, "the last duplicate"
        )
        assert [f.values[0] for f in sink.frames] == [1, 2, 3, 6, 7, 9, 101, 102]
        st = sink.statuses["esp-seq"]
        assert st.counters["seq_gaps"] == 2  # 4 and 5
        assert st.counters["duplicates"] == 3
        assert st.counters["reboots"] == 1
        assert st.counters["malformed"] == 0
        assert st.info["fw"] == "1.0"


# -- malformed messages --------------------------------------------------------------------


def _env(**overrides: Any) -> bytes:
    env: dict[str, Any] = {"v": 2, "seq": 1000, "boot": 1, "type": "telemetry", "ts": now_ms()}
    env["data"] = {"p_w": 1}
    env.update(overrides)
    return json.dumps({k: v for k, v in env.items() if v is not _DROP}).encode()


_DROP: Any = object()

MALFORMED: list[tuple[str, bytes, str]] = [
    ("telemetry", b"not json{", "not JSON"),
    ("telemetry", b"\xff\xfe\x00garbage", "not JSON"),
    ("telemetry", b'{"v": 2, "seq": 1, "data": {"p_w": "\xff"}}', "not JSON"),
    ("telemetry", b"[1, 2, 3]", "not a JSON object"),
    ("telemetry", b"", "not JSON"),
    ("telemetry", _env(v=1), "version 1"),
    ("telemetry", _env(v="2"), "version '2'"),
    ("telemetry", _env(seq=_DROP), "missing seq"),
    ("telemetry", _env(ts=_DROP, data=_DROP), "missing ts, data"),
    ("telemetry", _env(seq="5"), "seq must be"),
    ("telemetry", _env(seq=-1), "seq must be"),
    ("telemetry", _env(boot=[1]), "boot must be"),
    ("telemetry", _env(ts="now"), "ts must be"),
    ("telemetry", _env(type="hello"), "type 'hello' on a telemetry topic"),
    ("telemetry", _env(data=[1, 2]), "data must be an object"),
    ("telemetry", _env(data={}), "data is empty"),
    ("telemetry", _env(data={"p_w": "230"}), "p_w is a str, not a number"),
    ("telemetry", _env(data={"p_w": [1]}), "p_w is a list, not a number"),
    ("telemetry", _env(data={"p_w": 10**400}), "p_w is out of range"),
    ("telemetry", _env(data={"bad key": 1}), "not an identifier"),
    ("telemetry", _env(data={f"f{i}_w": i for i in range(200)}), "more than 128 fields"),
    ("telemetry", _env(data={"p_w": "x" * MAX_PAYLOAD_BYTES}), "exceeds 65536"),
    ("hello", _env(type="hello", data={"fw": 5}), "hello fw has the wrong type"),
    ("hello", _env(type="hello", data={"rssi_dbm": "weak"}), "hello rssi_dbm has the wrong"),
    ("status", b"maybe", "status must be online or offline"),
    ("status", b'{"v": 2, "data": {"state": "sleepy"}}', "status must be online or offline"),
    ("cmd/ack", b'{"v": 2, "ok": true}', "ack without an id"),
    ("cmd/ack", b'{"v": 3, "id": "x"}', "version 3"),
]


async def test_malformed_messages_are_counted_dead_lettered_and_survived(
    mosquitto: Mosquitto, sink: RecordingSink, nodes: Callable[..., FakeNode]
) -> None:
    async with running(make_driver(mosquitto), sink):
        node = nodes("esp-bad")
        await node.connect()
        node.send("telemetry", {"p_w": 1})
        await sink.wait_for(lambda: len(sink.frames) == 1, "the first frame")

        for n, (kind, payload, reason) in enumerate(MALFORMED, start=1):
            node.publish(kind, payload)

            def arrived(n: int = n) -> bool:
                return len(sink.dead) == n

            await sink.wait_for(arrived, f"dead letter {n} ({reason})")
            source, topic, kept, why = sink.dead[-1]
            assert (source, topic) == ("mqtt", f"{PREFIX}/esp-bad/{kind}")
            assert reason in why, (payload[:80], why)
            assert kept == payload[:MAX_PAYLOAD_BYTES]
            assert sink.counter("esp-bad", "malformed") == n

        # The stream goes on, and no malformed message moved the sequence (seq 1000 above).
        node.send("telemetry", {"p_w": 2})
        await sink.wait_for(lambda: len(sink.frames) == 2, "the frame after the garbage")
        assert sink.frames[1].values == (2.0,)
        st = sink.statuses["esp-bad"]
        assert st.counters["seq_gaps"] == 0 and st.counters["duplicates"] == 0
        assert st.last_error is not None and "malformed" in st.last_error

        # A topic whose device id is not valid counts on the driver's own status.
        node.publish_to(f"{PREFIX}/bad id!/telemetry", _env())
        await sink.wait_for(lambda: sink.counter("mqtt", "malformed") == 1, "the bad device id")
        assert "bad id!" not in sink.statuses
        assert sink.dead[-1][1] == f"{PREFIX}/bad id!/telemetry"


# -- a burst ----------------------------------------------------------------------------


async def test_qos1_burst_of_5000_arrives_whole(
    mosquitto: Mosquitto, sink: RecordingSink, nodes: Callable[..., FakeNode]
) -> None:
    n = 5000
    async with running(make_driver(mosquitto), sink):
        node = nodes("esp-burst")
        await node.connect()
        for i in range(n):
            node.send("telemetry", {"i_w": i, "temp_c": 20 + i / 1000})
        await sink.wait_for(
            lambda: len(sink.frames) == n,
            f"{n} frames",
            timeout=15,
            detail=lambda: (
                f"(got {len(sink.frames)}, counters {sink.statuses['esp-burst'].counters})"
            ),
        )
        assert [f.values[0] for f in sink.frames] == list(range(n))
        st = sink.statuses["esp-burst"]
        assert st.reads == n
        assert st.counters["seq_gaps"] == 0 and st.counters["duplicates"] == 0


# -- broker lost and back ----------------------------------------------------------------


async def test_broker_killed_and_restarted(
    mosquitto: Mosquitto, sink: RecordingSink, nodes: Callable[..., FakeNode]
) -> None:
    async with running(make_driver(mosquitto), sink) as task:
        node = nodes("esp-outage")
        await node.connect()
        for i in range(3):
            node.send("telemetry", {"p_w": i})
        await sink.wait_for(lambda: len(sink.frames) == 3, "frames before the outage")

        mosquitto.kill()
        await sink.wait_for(lambda: not sink.online("mqtt"), "the driver offline")
        assert not sink.online("esp-outage")  # nothing is visible without the broker
        await node.close()
        node.seq += 2  # two readings the node could not deliver while the broker was gone

        mosquitto.start()
        back = time.monotonic()
        await sink.wait_for(lambda: sink.online("mqtt"), "the driver back", timeout=5.0)
        assert time.monotonic() - back < 5.0
        assert not task.done()

        await node.connect()
        node.send("telemetry", {"p_w": 99})
        await sink.wait_for(lambda: len(sink.frames) == 4, "a frame after the outage")
        assert sink.frames[3].values == (99.0,)
        st = sink.statuses["esp-outage"]
        assert st.counters["seq_gaps"] == 2
        own = sink.statuses["mqtt"]
        assert own.counters["connects"] == 2
        assert own.counters["disconnects"] >= 1


async def test_broker_down_at_start_is_retried(mosquitto: Mosquitto, sink: RecordingSink) -> None:
    mosquitto.kill()
    async with running(make_driver(mosquitto), sink, wait_online=False) as task:
        await sink.wait_for(
            lambda: (sink.statuses.get("mqtt") or DeviceStatus("", "")).last_error is not None,
            "a failed connect",
        )
        assert not sink.online("mqtt")
        assert "cannot reach" in str(sink.statuses["mqtt"].last_error)
        assert not task.done()  # run() keeps trying rather than raising
        mosquitto.start()
        await sink.wait_for(lambda: sink.online("mqtt"), "the driver connected", timeout=6.0)


async def test_cancel_stops_the_client_thread(mosquitto: Mosquitto, sink: RecordingSink) -> None:
    driver = make_driver(mosquitto)
    async with running(driver, sink):
        assert _paho_threads() == ["paho-mqtt-client-gridlet-site-1"]
    assert _paho_threads() == []
    assert not sink.online("mqtt")
    with pytest.raises(DeviceGoneError):
        await driver.send_command("esp-1", "identify")


# -- commands ----------------------------------------------------------------------------


async def test_send_command_is_acked(
    mosquitto: Mosquitto, sink: RecordingSink, nodes: Callable[..., FakeNode]
) -> None:
    driver = make_driver(mosquitto)
    async with running(driver, sink):
        node = nodes("esp-cmd")
        await node.connect()
        ack = await driver.send_command("esp-cmd", "set_interval", {"interval_s": 2.5})
        assert ack["ok"] is True and ack["cmd"] == "set_interval"
        [cmd] = node.commands
        assert cmd == {"v": 2, "id": ack["id"], "cmd": "set_interval", "args": {"interval_s": 2.5}}

        node.ack = "envelope"  # an ack sent as an envelope: the id is in data
        ack = await driver.send_command("esp-cmd", "identify")
        assert ack["id"] == node.commands[-1]["id"] and ack["ok"] is True
        assert node.commands[-1]["args"] == {}
        assert sink.counter("esp-cmd", "malformed") == 0


async def test_commands_outside_the_whitelist_are_refused(
    mosquitto: Mosquitto, sink: RecordingSink, nodes: Callable[..., FakeNode]
) -> None:
    driver = make_driver(mosquitto)
    async with running(driver, sink):
        node = nodes("esp-cmd")
        await node.connect()
        bad: list[tuple[str, str, dict[str, object] | None]] = [
            ("esp-cmd", "format_flash", None),
            ("esp-cmd", "exec", {"code": "import os"}),
            ("esp-cmd", "set_interval", None),
            ("esp-cmd", "set_interval", {"interval_s": 0.01}),
            ("esp-cmd", "set_interval", {"interval_s": 7200}),
            ("esp-cmd", "set_interval", {"interval_s": "5"}),
            ("esp-cmd", "set_interval", {"interval_s": True}),
            ("esp-cmd", "set_interval", {"interval_s": float("nan")}),
            ("esp-cmd", "set_interval", {"interval_s": 5, "extra": 1}),
            ("esp-cmd", "reboot", {"now": 1}),
            ("esp-cmd/#", "identify", None),
            ("mqtt", "identify", None),
        ]
        for device_id, name, args in bad:
            with pytest.raises(ValueError):
                await driver.send_command(device_id, name, args)
        await driver.send_command("esp-cmd", "reboot")
        # Commands arrive in order: had any refused one been published, it would be here.
        assert [c["cmd"] for c in node.commands] == ["reboot"]


async def test_command_without_ack_times_out(
    mosquitto: Mosquitto, sink: RecordingSink, nodes: Callable[..., FakeNode]
) -> None:
    driver = make_driver(mosquitto)
    async with running(driver, sink):
        node = nodes("esp-mute")
        node.ack = None
        await node.connect()
        with pytest.raises(DeviceTimeoutError, match="no ack for identify"):
            await driver.send_command("esp-mute", "identify", timeout_s=0.3)
        assert [c["cmd"] for c in node.commands] == ["identify"]
        # The late ack is counted, not mistaken for another command's.
        node.publish("cmd/ack", json.dumps({"v": 2, "id": node.commands[0]["id"]}).encode())
        await sink.wait_for(lambda: sink.counter("esp-mute", "unmatched_acks") == 1, "late ack")


# -- without a broker -----------------------------------------------------------------


def test_validate_command() -> None:
    assert validate_command("set_interval", {"interval_s": 0.1}) == {"interval_s": 0.1}
    assert validate_command("identify") == {}
    with pytest.raises(ValueError, match="not allowed"):
        validate_command("shell", {})


def test_bad_tolerance_override_fails_at_construction() -> None:
    cfg = MqttConfig(tolerances={"p_w": 0.0})
    with pytest.raises(ValueError, match="tolerance"):
        MqttNodes(cfg, node_id="site-1")


async def test_send_command_before_run_is_refused() -> None:
    driver = MqttNodes(MqttConfig(), node_id="site-1")
    with pytest.raises(DeviceGoneError):
        await driver.send_command("esp-1", "identify")
