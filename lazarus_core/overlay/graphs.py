"""CUDA graphs for the overlay experts forward at decode sizes.

At a few tokens the overlay forward on a GPU is bound by its ~12 kernel launches from Python, not by the GPU.
Each experts module keeps one captured graph per (tokens, top-k, dtypes); a call copies its inputs into the
graph's static buffers and replays it. Only sync-free paths are captured (the ``cuda`` and ``triton``
backends with the id check off, as the model integration calls them).
"""

from __future__ import annotations

from typing import Callable

import torch

Forward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class GraphCache:
    """Captured CUDA graphs of one experts module's forward, keyed by input shapes and dtypes.

    Parameters
    ----------
    max_tokens : int
        Calls with more tokens (prefill) run eagerly; at most this many are captured.
    """

    def __init__(self, max_tokens: int = 8):
        self.max_tokens = max_tokens
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, ...], torch.Tensor]] = {}

    def applies(self, x: torch.Tensor) -> bool:
        """True when a call with hidden states ``x`` ([T, H]) should replay a graph."""
        return x.is_cuda and 0 < x.shape[0] <= self.max_tokens and not torch.cuda.is_current_stream_capturing()

    def __len__(self) -> int:
        return len(self._graphs)

    def run(self, forward: Forward, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``forward(x, ids, weights)`` through a captured graph (captured on the first call of these shapes).

        Returns
        -------
        torch.Tensor
            A fresh tensor (the graph's output buffer is copied, so later replays cannot overwrite it).
        """
        key = (tuple(x.shape), tuple(ids.shape), x.dtype, ids.dtype, weights.dtype, x.device)
        entry = self._graphs.get(key)
        if entry is None:
            static = (x.clone(), ids.clone(), weights.clone())
            side = torch.cuda.Stream(device=x.device)
            side.wait_stream(torch.cuda.current_stream(x.device))
            with torch.cuda.stream(side):
                for _ in range(2):  # warm-up off the capture: Triton compiles, cuBLAS picks its kernels
                    forward(*static)
            torch.cuda.current_stream(x.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = forward(*static)
            entry = self._graphs[key] = (graph, static, out)
        graph, (sx, sids, sw), out = entry
        sx.copy_(x)
        sids.copy_(ids)
        sw.copy_(weights)
        graph.replay()
        return out.clone()
