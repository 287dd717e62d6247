"""Issue 14: private keys go into a fresh file (O_EXCL | O_NOFOLLOW); a symbolic link planted at a
key's path, or at the temporary name the old code used, is never written through."""

from __future__ import annotations

import stat

import pytest

from federated.engines.pki import KeyWriteError, write_demo_pki, write_private


def test_a_symlink_planted_at_a_key_path_is_refused_and_its_target_untouched(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    pki_dir = tmp_path / "pki"
    pki_dir.mkdir()
    (pki_dir / "ca.key").symlink_to(victim)
    with pytest.raises(KeyWriteError, match=r"pki/ca.key is a symbolic link; refusing to write"):
        write_demo_pki(pki_dir, 1)
    assert victim.read_text() == "precious"
    assert not [p for p in pki_dir.iterdir() if ".tmp" in p.name]  # no temporary file left behind


def test_a_symlink_at_the_old_temporary_name_is_not_followed(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    key = tmp_path / "node_00"
    (tmp_path / "node_00.tmp").symlink_to(victim)  # where the old code opened with O_TRUNC
    write_private(key, b"SECRET")
    assert victim.read_text() == "precious"
    assert key.read_bytes() == b"SECRET" and not key.is_symlink()
    assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_keys_replace_earlier_regular_files_with_mode_0600(tmp_path):
    pki = write_demo_pki(tmp_path / "pki", 1)
    old = pki.ca_key.read_bytes()
    again = write_demo_pki(tmp_path / "pki", 1)  # a second demo in the same folder: new keys
    assert again.ca_key.read_bytes() != old
    for key in (again.ca_key, again.server_key, again.nodes[0].private):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600 and key.is_file() and not key.is_symlink()
    assert stat.S_IMODE(again.ca_cert.stat().st_mode) == 0o644


def test_a_refused_key_write_is_a_user_error_at_the_command_line():
    """`deploy demo` reports it as an error line with exit code 2, not a traceback."""
    from federated.app.cli import _user_errors
    from federated.engines.pki import KeyWriteError

    assert issubclass(KeyWriteError, _user_errors())
