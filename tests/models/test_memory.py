"""The streaming memory guard's resident-set reading."""

import os
import sys

import pytest
import torch

from lazarus_core.models import _memory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_resident_bytes_follows_touched_memory_through_one_open_descriptor():
    before = _memory.resident_bytes()
    fd = _memory._STATM[os.getpid()]
    x = torch.ones(16 << 20)  # 64 MiB, touched
    after = _memory.resident_bytes()
    assert _memory._STATM[os.getpid()] == fd  # re-read, not reopened
    assert after - before >= 60 << 20
    with open("/proc/self/statm") as f:
        fresh = int(f.read().split()[1]) * _memory._PAGE
    assert abs(fresh - _memory.resident_bytes()) < 8 << 20
    del x


def test_resident_bytes_is_none_without_proc(monkeypatch):
    monkeypatch.setattr(_memory, "_STATM", {})
    monkeypatch.setattr(_memory.os, "open", lambda *a, **k: (_ for _ in ()).throw(FileNotFoundError("no /proc")))
    assert _memory.resident_bytes() is None
