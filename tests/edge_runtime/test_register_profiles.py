"""Register profiles: every shipped profile is checked, decoding is exact, bad files say where."""

from __future__ import annotations

import itertools
import math
import struct
from pathlib import Path
from typing import get_args

import pytest

from edge_runtime.devices.base import unit_of
from edge_runtime.devices.register_profile import (
    MAX_READ_REGISTERS,
    PROFILES_DIR,
    Profile,
    ProfileError,
    RegisterField,
    RegisterType,
    Table,
    WordOrder,
    load_profile,
    parse_profile,
    shipped_profiles,
)

SHIPPED = sorted(PROFILES_DIR.glob("*.toml"))

# Names without a unit suffix must be genuinely dimensionless.
DIMENSIONLESS_PREFIXES = ("power_factor",)


def test_the_profiles_folder_holds_the_shipped_meters() -> None:
    assert {"sdm630", "sdm120", "generic"} <= {p.stem for p in SHIPPED}
    assert shipped_profiles() == [p.stem for p in SHIPPED]


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_every_shipped_profile_is_valid(path: Path) -> None:
    profile = load_profile(path)
    assert profile.name == path.stem
    assert profile.fields

    for f in profile.fields:
        assert f.type in get_args(RegisterType), f.name
        assert f.address >= 0 and f.end <= 0x10000, f.name
        # The name carries the unit, and the declared unit is that one.
        assert f.unit == unit_of(f.name), f.name
        if not f.unit:
            assert f.name.startswith(DIMENSIONLESS_PREFIXES), f"{f.name} names no unit"
        # What a device would serve decodes back to the value (to the register's resolution).
        decoded = f.decode(f.encode(12.5))
        assert decoded is not None
        assert math.isclose(decoded, 12.5, abs_tol=abs(f.scale)), f.name

    for table, group in itertools.groupby(
        sorted(profile.fields, key=lambda f: (f.table, f.address)), key=lambda f: f.table
    ):
        ordered = list(group)
        for a, b in itertools.pairwise(ordered):
            assert b.address >= a.end, f"{table}: {a.name} overlaps {b.name}"

    blocks = profile.blocks()
    covered = sorted(i for b in blocks for i in b.fields)
    assert covered == list(range(len(profile.fields))), "every field in exactly one block"
    for block in blocks:
        assert 1 <= block.count <= min(profile.max_registers, MAX_READ_REGISTERS), block.name
        for i in block.fields:
            f = profile.fields[i]
            assert f.table == block.table
            assert block.address <= f.address and f.end <= block.address + block.count
    # Contiguous registers are read together, not one request per field.
    assert len(blocks) < len(profile.fields) / 2

    schema = profile.schema()
    assert schema.kind == "meter"
    assert schema.model == f"{profile.manufacturer} {profile.model}"
    assert [(s.name, s.unit) for s in schema.fields] == [(f.name, f.unit) for f in profile.fields]


@pytest.mark.parametrize(
    ("profile", "name", "address"),
    [
        ("sdm630", "voltage_l1_v", 0x0000),
        ("sdm630", "current_l1_a", 0x0006),
        ("sdm630", "active_power_l1_w", 0x000C),
        ("sdm630", "active_power_total_w", 0x0034),
        ("sdm630", "frequency_hz", 0x0046),
        ("sdm630", "energy_import_kwh", 0x0048),
        ("sdm630", "energy_export_kwh", 0x004A),
        ("sdm630", "voltage_l1_l2_v", 0x00C8),
        ("sdm630", "energy_total_kwh", 0x0156),
        ("sdm120", "voltage_v", 0x0000),
        ("sdm120", "active_power_w", 0x000C),
        ("sdm120", "frequency_hz", 0x0046),
        ("sdm120", "energy_import_kwh", 0x0048),
    ],
)
def test_eastron_registers_are_where_the_manual_puts_them(
    profile: str, name: str, address: int
) -> None:
    p = load_profile(profile)
    (f,) = [f for f in p.fields if f.name == name]
    assert (f.address, f.table, f.type, f.word_order) == (address, "input", "float32", "big")


def _profile(*fields: RegisterField, max_registers: int = 125, max_gap: int = 0) -> Profile:
    return Profile(
        name="t",
        model="T",
        fields=fields,
        max_registers=max_registers,
        max_gap=max_gap,
        source="t.toml",
    )


def _f(
    name: str,
    address: int,
    type_: RegisterType = "uint16",
    *,
    table: Table = "holding",
    word_order: WordOrder = "big",
    scale: float = 1.0,
) -> RegisterField:
    return RegisterField(
        name=name,
        address=address,
        table=table,
        type=type_,
        word_order=word_order,
        scale=scale,
        unit=unit_of(name),
    )


def test_decode_word_order_signedness_and_scale() -> None:
    p = _profile(
        _f("a_w", 0, "int16", scale=0.5),
        _f("b_wh", 1, "uint32", word_order="little"),
        _f("c_v", 3, "float32"),
        _f("d_kwh", 5, "float64"),
        _f("e_a", 9, "int32", scale=0.001),
        _f("f_hz", 11, "float32"),
        _f("g_w", 13, "uint16", scale=10),
    )
    (block,) = p.blocks()
    regs = [
        0xFFFE,  # int16 -2, times 0.5
        0x5678,  # uint32, low word first
        0x1234,
        *struct.unpack(">2H", struct.pack(">f", 230.25)),
        *struct.unpack(">4H", struct.pack(">d", 1234.5678)),
        *struct.unpack(">2H", struct.pack(">i", -123456)),
        0x7FC0,  # float32 NaN: missing, not a number to store
        0x0000,
        65535,
    ]
    assert p.decode([(block, regs)]) == [
        -1.0,
        0x12345678,
        230.25,
        1234.5678,
        pytest.approx(-123.456),
        None,
        655350.0,
    ]
    # encode is the inverse, word order and all
    assert p.fields[1].encode(0x12345678) == [0x5678, 0x1234]
    assert p.fields[0].encode(-1.0) == [0xFFFE]
    with pytest.raises(ValueError, match="does not fit int16"):
        p.fields[0].encode(1e6)


def test_decode_leaves_fields_of_unread_blocks_missing() -> None:
    p = _profile(_f("a_w", 0), _f("b_w", 100))
    first, _second = p.blocks()
    assert p.decode([(first, [7])]) == [7.0, None]
    with pytest.raises(ValueError, match="expected 1"):
        p.decode([(first, [1, 2])])


def test_blocks_group_contiguous_and_near_registers_within_the_limit() -> None:
    # 70 contiguous float32 values: 140 registers, more than one request may read.
    fields = [_f(f"v{i}_v", 2 * i, "float32", table="input") for i in range(70)]
    fields.append(_f("x_w", 150, table="input"))  # 10 unused registers away
    fields.append(_f("h_w", 0))  # another table: another request
    p = _profile(*fields, max_gap=10)
    blocks = p.blocks()
    assert [(b.table, b.address, b.count) for b in blocks] == [
        ("holding", 0, 1),
        ("input", 0, 124),
        ("input", 124, 27),
    ]
    assert [b.name for b in blocks] == ["holding 0x0000+1", "input 0x0000+124", "input 0x007C+27"]
    # a caller may ask for smaller reads (a device that rejects long ones)
    assert max(b.count for b in p.blocks(40)) <= 40
    # a gap wider than max_gap costs another request
    assert len(_profile(*fields, max_gap=9).blocks()) == 4
    # never beyond the protocol limit, whatever is asked
    assert max(b.count for b in p.blocks(1000)) <= MAX_READ_REGISTERS


def _write(tmp_path: Path, body: str, name: str = "bad.toml") -> Path:
    path = tmp_path / name
    path.write_text(
        'name = "bad"\nmodel = "Bad"\ntable = "input"\ntype = "float32"\n' + body,
        encoding="utf-8",
    )
    return path


OK_FIELD = '\n[[fields]]\nname = "voltage_v"\naddress = 0\n'


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            OK_FIELD + '\n[[fields]]\nname = "current_a"\naddress = 1\n',
            r"^bad\.toml:10: fields\[1\] \(current_a\): input register 0x0001 overlaps "
            r"fields\[0\] \(voltage_v, 0x0000\.\.0x0001\)",
        ),
        (
            OK_FIELD + '\n[[fields]]\nname = "current_a"\naddress = 2\ntype = "float16"\n',
            r"^bad\.toml:13: fields\[1\] \(current_a\): type: Invalid enum value 'float16'",
        ),
        (
            OK_FIELD + '\n[[fields]]\nname = "current_a"\naddress = 2\nregister = 3\n',
            r"^bad\.toml:13: fields\[1\] \(current_a\): register: "
            r"Object contains unknown field `register`",
        ),
        (
            OK_FIELD + '\n[[fields]]\nname = "current_a"\naddress = 2\nunit = "V"\n',
            r"^bad\.toml:10: fields\[1\] \(current_a\): unit 'V' disagrees with the name, "
            r"which names 'A'",
        ),
        (
            OK_FIELD + '\n[[fields]]\nname = "power_factor"\naddress = 2\nunit = "%"\n',
            r"fields\[1\] \(power_factor\): unit '%' disagrees with the name, "
            r"which carries no unit suffix",
        ),
        (
            OK_FIELD + '\n[[fields]]\nname = "energy_kwh"\naddress = 0xFFFE\ntype = "float64"\n',
            r"^bad\.toml:10: fields\[1\] \(energy_kwh\): registers 0xFFFE\.\.0x10001 are outside",
        ),
        (
            OK_FIELD + '\n[[fields]]\nname = "current_a"\naddress = 70000\n',
            r"^bad\.toml:12: fields\[1\] \(current_a\): address: Expected `int` <= 65535",
        ),
        (
            OK_FIELD + '\n[[fields]]\nname = "voltage_v"\naddress = 2\n',
            r"fields\[1\] \(voltage_v\): name already used by fields\[0\]",
        ),
        (
            OK_FIELD + '\n[[fields]]\nname = "current_a"\naddress = 2\nscale = 0\n',
            r"fields\[1\] \(current_a\): scale must be a finite, non-zero number",
        ),
        (
            OK_FIELD + "max_registers = 200\n",
            r"^bad\.toml:9: fields\[0\] \(voltage_v\): max_registers: Object contains unknown",
        ),
        ("max_registers = 200\n" + OK_FIELD, r"^bad\.toml:5: max_registers: Expected `int` <= 125"),
        (
            OK_FIELD + "\n[[fields]]\naddress = 2\n",
            r"^bad\.toml:10: fields\[1\] \(\?\): name: Object missing required",
        ),
        ("colour = 1\n" + OK_FIELD, r"^bad\.toml:5: colour: Object contains unknown field"),
        ("fields = [\n", r"^bad\.toml: not valid TOML"),
        ("colour = = 1\n", r"^bad\.toml:5: not valid TOML"),
    ],
    ids=[
        "overlap",
        "unknown-type",
        "unknown-key",
        "unit-mismatch",
        "dimensionless-with-unit",
        "past-the-end",
        "address-range",
        "duplicate-name",
        "zero-scale",
        "key-in-wrong-table",
        "too-long-reads",
        "missing-name",
        "unknown-top-level-key",
        "not-toml",
        "not-toml-at-a-line",
    ],
)
def test_bad_profiles_say_which_file_and_field(tmp_path: Path, body: str, expected: str) -> None:
    path = _write(tmp_path, body)
    with pytest.raises(ProfileError, match=expected):
        load_profile(path)


def test_unknown_shipped_name_lists_the_shipped_ones() -> None:
    with pytest.raises(ProfileError, match=r"no shipped register profile 'sdm999'.*sdm630"):
        load_profile("sdm999")
    with pytest.raises(ProfileError, match="cannot read"):
        load_profile("/nonexistent/meter.toml")


def test_field_defaults_come_from_the_profile() -> None:
    p = parse_profile(
        'name = "x"\nmodel = "X"\ntable = "input"\ntype = "int32"\nword_order = "little"\n'
        '[[fields]]\nname = "grid_power_w"\naddress = 4\ntolerance = 20\n'
        '[[fields]]\nname = "soc_pct"\naddress = 6\ntable = "holding"\ntype = "uint16"\n',
        "x.toml",
    )
    a, b = p.fields
    assert (a.table, a.type, a.word_order, a.unit) == ("input", "int32", "little", "W")
    assert (b.table, b.type, b.unit) == ("holding", "uint16", "%")
    assert p.schema().fields[0].tol == 20
    assert p.schema().fields[1].tol == 0.5  # the usual tolerance of %
