"""Node keys: files made 0600 and never overwritten by accident, public keys as text, and
signatures that fail for any other key or any changed byte."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cloud_sync.signing import (
    KeyFileError,
    NodeKey,
    SignatureError,
    load_public_key,
    open_signed,
    sign,
    verify,
)

EXE = str(Path(sys.executable).with_name("gridlet"))


def test_key_file_round_trip_and_refusals(tmp_path: Path) -> None:
    key = NodeKey.generate()
    path = tmp_path / "d" / "node.key"
    key.save(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert NodeKey.load(path).public_bytes == key.public_bytes
    with pytest.raises(KeyFileError, match="refusing to overwrite"):
        NodeKey.generate().save(path)
    other = NodeKey.generate()
    other.save(path, overwrite=True)
    assert NodeKey.load(path).public_bytes == other.public_bytes
    (tmp_path / "junk.key").write_text("not a key")
    with pytest.raises(KeyFileError, match="not a PEM private key"):
        NodeKey.load(tmp_path / "junk.key")
    with pytest.raises(KeyFileError, match="cannot read"):
        NodeKey.load(tmp_path / "missing.key")


def test_public_key_text() -> None:
    for _ in range(50):  # some keys start with "-": the prefix keeps them off the options
        key = NodeKey.generate()
        text = key.public_text
        assert text.startswith("ed25519:")
        assert load_public_key(text) == key.public_bytes
        assert load_public_key(text.removeprefix("ed25519:")) == key.public_bytes
    with pytest.raises(KeyFileError, match="32"):
        load_public_key("ed25519:AAAA")
    with pytest.raises(KeyFileError, match="base64"):
        load_public_key("ed25519:!!!!")


def test_signatures_bind_key_and_bytes() -> None:
    key = NodeKey.generate()
    body = sign(key, "n1", b"batch bytes")
    node, batch, sig = open_signed(body)
    assert (node, batch) == ("n1", b"batch bytes")
    verify(key.public_bytes, batch, sig)
    with pytest.raises(SignatureError):
        verify(NodeKey.generate().public_bytes, batch, sig)
    with pytest.raises(SignatureError):
        verify(key.public_bytes, b"batch bytez", sig)
    with pytest.raises(SignatureError):
        open_signed(b"\xff\x00garbage")


def test_gridlet_keygen(tmp_path: Path) -> None:
    site = tmp_path / "site.toml"
    site.write_text('[site]\nnode_id = "k1"\n[store]\npath = "data/g.db"\n')
    first = subprocess.run(
        [EXE, "keygen", "--config", str(site)], capture_output=True, text=True, check=False
    )
    assert first.returncode == 0, first.stderr
    key = tmp_path / "data" / "node.key"
    assert key.stat().st_mode & 0o777 == 0o600
    public = first.stdout.split("public key: ")[1].split()[0]
    assert load_public_key(public) == NodeKey.load(key).public_bytes
    assert f"gridlet hub add-node k1 {public}" in first.stdout
    again = subprocess.run(
        [EXE, "keygen", "--config", str(site)], capture_output=True, text=True, check=False
    )
    assert again.returncode != 0 and "--force" in again.stderr
    assert load_public_key(public) == NodeKey.load(key).public_bytes  # untouched
    forced = subprocess.run(
        [EXE, "keygen", "--config", str(site), "--force"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert forced.returncode == 0
    assert NodeKey.load(key).public_bytes != load_public_key(public)
