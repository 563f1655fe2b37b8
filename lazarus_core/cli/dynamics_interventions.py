"""Actions expert-interference, expert-merging, routing-manipulation of the dynamics study (thin CLI over the library analyses)."""

from __future__ import annotations

import argparse


def register(actions: argparse._SubParsersAction) -> None:
    """Add this module's actions to `introspect moe-expert`."""
