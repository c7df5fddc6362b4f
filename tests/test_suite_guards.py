"""The suite's own guards (tests/conftest.py) do what they say."""

import os
import socket
import subprocess
import sys
import time

import pytest

from tests import conftest


def test_a_connection_outside_the_loopback_is_refused_and_recorded():
    before = len(conftest._OUTSIDE_CONNECTIONS)
    with pytest.raises(ConnectionRefusedError, match="offline"):
        socket.create_connection(("192.0.2.1", 80), timeout=1)  # refused before any packet leaves
    assert conftest._OUTSIDE_CONNECTIONS[before:] == [("192.0.2.1", 80)]
    del conftest._OUTSIDE_CONNECTIONS[before:]  # recorded, so any other test doing this fails at teardown


def test_the_loopback_stays_reachable():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        with socket.create_connection(server.getsockname(), timeout=5):
            pass


def test_tfds_downloads_fail_as_offline():
    from tensorflow_datasets.core.download import downloader

    with pytest.raises(ConnectionError):
        downloader._Downloader._sync_download(None, "https://example.org/x.tar.gz", "/nonexistent", True)


def test_processes_a_test_leaves_behind_are_killed_with_their_children():
    parent = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; "
                               "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)"])
    deadline = time.time() + 30
    while len(conftest._descendants(os.getpid())) < 2 and time.time() < deadline:
        time.sleep(0.05)
    killed = conftest._kill_leftovers()
    assert parent.pid in killed and len(killed) == 2
    assert parent.wait(timeout=10) == -9
    grandchild = next(pid for pid in killed if pid != parent.pid)
    deadline = time.time() + 10
    while _alive(grandchild) and time.time() < deadline:
        time.sleep(0.05)
    assert not _alive(grandchild)


def _alive(pid):
    """Running: neither gone nor a zombie waiting for init to reap it."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
