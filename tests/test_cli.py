"""The ``edgefleet`` command as an owner runs it: init, refusing to overwrite, and keys."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

from fleet_protocol import JoinToken


def edgefleet(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fleet_service", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "EDGEFLEET_HOME": str(home)},
        check=False,
    )


def test_init_creates_private_keys_and_refuses_to_run_twice(tmp_path: Path) -> None:
    home = tmp_path / "home"
    first = edgefleet(home, "init")
    assert first.returncode == 0, first.stderr
    assert "admin login:    admin / " in first.stdout
    for key in ("ca.key", "server.key", "service.key", "signing.key", "jwt.secret"):
        assert stat.S_IMODE((home / key).stat().st_mode) == 0o600, key
    ca_before = (home / "ca.crt").read_bytes()

    second = edgefleet(home, "init")

    assert second.returncode == 1
    assert "already holds a fleet" in second.stderr
    assert "rm -rf" in second.stderr
    assert (home / "ca.crt").read_bytes() == ca_before


def test_keys_create_list_revoke(tmp_path: Path) -> None:
    home = tmp_path / "home"
    assert edgefleet(home, "init", "--advertise-host", "10.1.2.3").returncode == 0

    created = edgefleet(
        home, "keys", "create", "--expires", "2h", "--max-uses", "5", "--tag", "site=lab"
    )
    assert created.returncode == 0, created.stderr
    token_line = next(line for line in created.stdout.splitlines() if line.startswith("efjoin1."))
    token = JoinToken.decode(token_line)
    assert str(token.url).startswith("https://10.1.2.3:"), "init's advertised host is kept"
    key_id = created.stdout.split()[1].rstrip(":")

    listed = edgefleet(home, "keys", "list")
    assert key_id in listed.stdout
    assert "active" in listed.stdout
    assert "site=lab" in listed.stdout

    assert edgefleet(home, "keys", "revoke", key_id).returncode == 0
    assert "revoked" in edgefleet(home, "keys", "list").stdout
    missing = edgefleet(home, "keys", "revoke", "key-nope")
    assert missing.returncode == 1
    assert "does not exist" in missing.stderr


def test_bad_cli_input_gets_a_clear_error(tmp_path: Path) -> None:
    home = tmp_path / "home"
    not_initialised = edgefleet(home, "keys", "list")
    assert not_initialised.returncode == 1
    assert "edgefleet init" in not_initialised.stderr
    assert edgefleet(home, "init").returncode == 0
    bad_duration = edgefleet(home, "keys", "create", "--expires", "soon")
    assert bad_duration.returncode == 2
    assert "24h" in bad_duration.stderr
    bad_tag = edgefleet(home, "keys", "create", "--tag", "nonsense")
    assert bad_tag.returncode == 2
    assert "key=value" in bad_tag.stderr


def test_up_refuses_a_home_whose_private_key_others_can_read(tmp_path: Path) -> None:
    home = tmp_path / "home"
    assert edgefleet(home, "init").returncode == 0
    (home / "ca.key").chmod(0o644)

    result = edgefleet(home, "up")

    assert result.returncode == 1
    assert "chmod 600" in result.stderr
    assert "ca.key" in result.stderr
