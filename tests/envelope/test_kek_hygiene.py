"""KEK hygiene: group/other-accessible KEK files are refused, the KEK can be rotated (every
data key re-sealed, atomically) without touching the log, and Cipher.open takes the server id
string or the node id and refuses anything else at the door."""

from __future__ import annotations

import os

import pytest

from trio_raft import derive_node_id
from trio_raft.envelope import KEK, Cipher, KeyStore, rotate_kek, seal_dek
from trio_raft.envelope.keystore import KEY_FILE
from trio_raft.envelope.nonce import node_prefix
from trio_raft.errors import KEKError, KEKPermissionError, KeyStoreError


def _kek_file(path, mode: int = 0o600) -> str:
    path.write_bytes(os.urandom(32))
    path.chmod(mode)
    return str(path)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620, 0o660, 0o644, 0o700 | 0o001])
def test_kek_file_open_to_group_or_others_is_refused(tmp_path, mode):
    path = _kek_file(tmp_path / "kek", mode)
    with pytest.raises(KEKPermissionError, match=f"{path} has mode {mode:04o}"):
        KEK.from_file(path)


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_kek_file_for_its_owner_only_is_accepted(tmp_path, mode):
    assert len(KEK.from_file(_kek_file(tmp_path / "kek", mode)).key) == 32


def test_kek_rotation_reseals_every_key_and_keeps_them(tmp_path):
    old = KEK.from_file(_kek_file(tmp_path / "old.kek"))
    new = KEK.from_file(_kek_file(tmp_path / "new.kek"))
    d = tmp_path / "keys"
    store = KeyStore.open(d, old)
    deks = {1: os.urandom(32), 2: os.urandom(32)}
    for kid, dek in deks.items():
        store.install(kid, dek)
    sealed_in_log = seal_dek(old, 1, deks[1])  # what a control record carries
    before = (d / KEY_FILE).read_bytes()
    rotate_kek(d, old, new)
    after = (d / KEY_FILE).read_bytes()
    assert after != before
    for dek in deks.values():
        assert dek not in after
    with pytest.raises(KEKError, match="does not match the key store"):
        KeyStore.open(d, old)
    again = KeyStore.open(d, new)
    assert {k: again.key_bytes(k) for k in again.key_ids()} == deks
    assert again.active_key_id == 2
    # Replaying a control record sealed under the old KEK changes nothing and is no error.
    assert again.install_sealed(1, sealed_in_log, activate=False) is False
    # A key this store never had still needs the store's own KEK.
    with pytest.raises(KEKError):
        again.install_sealed(3, seal_dek(old, 3, os.urandom(32)))


def test_kek_rotation_with_the_wrong_old_kek_changes_nothing(tmp_path):
    old = KEK.generate()
    d = tmp_path / "keys"
    KeyStore.open(d, old).install(1, os.urandom(32))
    before = (d / KEY_FILE).read_bytes()
    with pytest.raises(KEKError):
        rotate_kek(d, KEK.generate(), KEK.generate())
    assert (d / KEY_FILE).read_bytes() == before
    with pytest.raises(KeyStoreError, match="missing"):
        rotate_kek(tmp_path / "nothing-here", old, KEK.generate())


def test_new_kek_file_inside_the_key_dir_is_refused(tmp_path):
    d = tmp_path / "keys"
    store = KeyStore.open(d, KEK.generate())
    with pytest.raises(KEKError, match="must not live inside"):
        store.rekey(KEK.from_file(_kek_file(d / "new.kek")))


def test_cipher_open_takes_the_server_id_or_the_node_id(tmp_path):
    kek = KEK.generate()
    by_name = Cipher.open(tmp_path / "a", kek, node_id="n1")
    by_id = Cipher.open(tmp_path / "b", kek, node_id=derive_node_id("n1"))
    assert by_name.nonces is not None and by_id.nonces is not None
    assert by_name.nonces.prefix == by_id.nonces.prefix == node_prefix(derive_node_id("n1"))


@pytest.mark.parametrize("bad,error,match", [
    (1.5, TypeError, "server id string"),
    (True, TypeError, "server id string"),
    (b"n1", TypeError, "not bytes"),
    (None, TypeError, "not NoneType"),
    ("", ValueError, "empty"),
    (0, ValueError, "not in 1..2"),
    (1 << 64, ValueError, "not in 1..2"),
])
def test_cipher_open_refuses_other_node_ids_at_the_door(tmp_path, bad, error, match):
    with pytest.raises(error, match=match):
        Cipher.open(tmp_path / "k", KEK.generate(), node_id=bad)
    assert not (tmp_path / "k").exists()  # refused before anything was created


def test_kek_fingerprint_names_the_kek_without_revealing_it(tmp_path):
    path = _kek_file(tmp_path / "kek")
    kek = KEK.from_file(path)
    fp = kek.fingerprint
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert KEK.from_file(path).fingerprint == fp  # stable: the same KEK, the same name
    assert KEK(kek.key, "env X").fingerprint == fp  # whatever it was read from
    other = KEK.generate()
    assert other.fingerprint != fp
    assert fp not in kek.key.hex() and fp not in repr(kek)
    # A cipher and a re-sealed key store report the KEK they are sealed with now.
    cipher = Cipher.open(tmp_path / "keys", kek, node_id="n1")
    assert cipher.kek_fingerprint == fp
    assert Cipher(None, None).kek_fingerprint == ""
    rotate_kek(tmp_path / "keys", kek, other)
    assert Cipher.open(tmp_path / "keys", other, node_id="n1").kek_fingerprint == \
        other.fingerprint
