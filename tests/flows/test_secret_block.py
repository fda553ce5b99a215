"""The inventory's ``key: {secret_block: NAME}``: the tasks' runtime reads the key from a Prefect Secret block."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from hostmaint.errors import DriverError, TransientDriverError

INVENTORY = """\
clusters:
  - name: prod
hosts:
  - name: hv03
    cluster: prod
    libvirt_uri: qemu+tcp://127.0.0.1:1/system
    ssh:
      address: 127.0.0.1
      port: 1
      key: {{secret_block: {block}}}
      known_hosts: known_hosts
"""


def _inventory(tmp_path: Path, block: str) -> Path:
    (tmp_path / "known_hosts").write_text("")
    path = tmp_path / f"{block}.yaml"
    path.write_text(INVENTORY.format(block=block))
    return path


def test_secret_block_key_reaches_the_ssh_shell_and_a_missing_block_is_named(
        tmp_path: Path, hostmaint_db: Path) -> None:
    from prefect.blocks.system import Secret

    from tasks.common import RuntimeRef, SecretBlockMissing, SecretBlockUnusable, load_secret_block

    key = Ed25519PrivateKey.generate().private_bytes(Encoding.PEM, PrivateFormat.OpenSSH, NoEncryption()).decode()
    Secret(value=key).save("hostmaint-test-ssh-key", overwrite=True)
    assert load_secret_block("hostmaint-test-ssh-key") == key

    with pytest.raises(SecretBlockMissing, match="no Prefect Secret block 'hostmaint-no-such-key'"):
        load_secret_block("hostmaint-no-such-key")
    Secret(value={"not": "a key"}).save("hostmaint-test-not-a-key", overwrite=True)
    with pytest.raises(SecretBlockUnusable, match="'hostmaint-test-not-a-key' does not hold a private key") as info:
        load_secret_block("hostmaint-test-not-a-key")
    assert "a key" not in str(info.value)  # what the block holds is never shown

    # through the runtime the tasks open: the key loads, so it gets as far as connecting (nothing listens)
    shell = RuntimeRef(str(_inventory(tmp_path, "hostmaint-test-ssh-key"))).open().shell
    with pytest.raises(TransientDriverError) as connect:
        shell.run("hv03", ["true"])
    assert "secret block" not in str(connect.value)
    # a block that does not exist stops it before connecting, naming the block and what is wrong
    shell = RuntimeRef(str(_inventory(tmp_path, "hostmaint-no-such-key"))).open().shell
    with pytest.raises(DriverError) as missing:
        shell.run("hv03", ["true"])
    assert not isinstance(missing.value, TransientDriverError)
    assert "secret block 'hostmaint-no-such-key'" in str(missing.value)
    assert "SecretBlockMissing" in str(missing.value)
