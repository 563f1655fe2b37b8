"""The CLI leaves torchrun's process group before the interpreter exits (a gloo group left to interpreter
shutdown can abort a finished rank with ``terminate called without an active exception``)."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from lazarus_core.cli.main import main
from lazarus_core.distributed import close_world


@pytest.fixture
def gloo_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def test_close_world_is_a_no_op_without_a_group():
    assert not dist.is_initialized()
    close_world()
    close_world(failed=True)


@pytest.mark.parametrize("failed", [False, True])
def test_close_world_leaves_a_gloo_group(gloo_group, failed):
    assert dist.is_initialized()
    close_world(failed=failed)  # gloo: leaving is local, so it is done after a failure too
    assert not dist.is_initialized()


@pytest.mark.parametrize("argv, code", [(["models", "--json"], 0),
                                        (["introspect", "moe-expert", "moe-type-analyze", "-m", "/no/such/model"], 2)])
def test_cli_leaves_the_group_on_success_and_on_error(gloo_group, argv, code, capsys):
    assert main(argv) == code
    assert not dist.is_initialized()
