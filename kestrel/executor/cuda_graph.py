"""CUDA graphs for decode steps: one graph per padded batch size (and per range of the longest
context where the attention backend's decode path changes with it), replayed with new metadata.

A decode step of an 8B model launches hundreds of small kernels; at batch 1 their launch gaps
cost more than the weights take to stream. Capturing the whole forward (and the LM head) once per
batch size removes them. Shapes a graph cannot serve (prefill chunks, prompt logprobs, batches
larger than the biggest graph) run eagerly.

A pipeline stage captures its own layers the same way: a stage after the first reads the
hidden states it received from static buffers, and a stage before the last returns
(hidden, residual) for the next stage instead of logits.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch

from kestrel.attention.base import AttentionMetadata

log = logging.getLogger(__name__)


def capture_sizes(max_rows: int) -> list[int]:
    """Padded batch sizes to capture: up to the first that holds ``max_rows`` (at most 1024;
    larger batches run eagerly)."""
    sizes = [1, 2, 4, 8] + list(range(16, 257, 16)) + list(range(288, 1025, 32))
    return [s for s in sizes if s < max_rows] + [next((s for s in sizes if s >= max_rows),
                                                     sizes[-1])]


class DecodeGraphs:
    """Static buffers shared by all graphs; each graph reads a prefix of them."""

    def __init__(self, model, kv_caches, max_num_seqs: int, max_model_len: int, block_size: int,
                 device: torch.device, hidden_size: int, dtype: torch.dtype,
                 len_breaks: Callable[[int], tuple[int, ...]] = lambda bs: ()) -> None:
        self.model, self.kv_caches = model, kv_caches
        self.first, self.last = model.is_first, model.is_last  # pipeline stage ends
        self.sizes = capture_sizes(max_num_seqs)
        n = self.sizes[-1]
        self.max_blocks = -(-max_model_len // block_size)
        self.max_model_len = max_model_len
        # the longest contexts each batch size's graphs serve, ascending (one graph each): the
        # attention backend's decode_len_breaks below max_model_len, then max_model_len
        self.bounds = {bs: sorted({b for b in len_breaks(bs) if b < max_model_len})
                       + [max_model_len] for bs in self.sizes}
        i32 = {"dtype": torch.int32, "device": device}
        # input ids, positions and slot mapping as rows of one buffer: one copy stages them
        self.id_pos_slot = torch.zeros(3, n, dtype=torch.int64, device=device)
        self.input_ids, self.positions, self.slot_mapping = self.id_pos_slot
        self.slot_mapping.fill_(-1)
        self.seq_lens = torch.ones(n, **i32)
        self.block_tables = torch.zeros(n, self.max_blocks, **i32)
        self.query_start_loc = torch.arange(n + 1, **i32)
        if not self.first:  # the previous stage's output, copied in before each replay
            self.hidden = torch.zeros(n, hidden_size, dtype=dtype, device=device)
            self.residual = torch.zeros_like(self.hidden)
        # keyed by (batch size, longest context served)
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.outputs: dict[tuple[int, int], Any] = {}  # logits [bs, V] or (hidden, residual)
        self.pool = None

    def _meta(self, bs: int, max_seq_len: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:bs], query_start_loc=self.query_start_loc[: bs + 1],
            seq_lens=self.seq_lens[:bs], block_tables=self.block_tables[:bs], max_query_len=1,
            max_seq_len=max_seq_len)

    def _forward(self, bs: int, max_seq_len: int) -> Any:
        h_in = r_in = None
        if not self.first:
            h_in, r_in = self.hidden[:bs], self.residual[:bs]
        hidden, residual = self.model(self.input_ids[:bs], self.positions[:bs], self.kv_caches,
                                      self._meta(bs, max_seq_len), h_in, r_in)
        return self.model.compute_logits(hidden) if self.last else (hidden, residual)

    @torch.inference_mode()
    def capture(self) -> None:
        t0 = time.perf_counter()
        for bs in reversed(self.sizes):  # largest first: later graphs reuse its memory pool
            for bound in reversed(self.bounds[bs]):
                self._forward(bs, bound)  # warm-up: compiles kernels, settles the allocator
                torch.cuda.synchronize()
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=self.pool):
                    self.outputs[bs, bound] = self._forward(bs, bound)
                self.pool = g.pool()
                self.graphs[bs, bound] = g
        torch.cuda.synchronize()
        log.info("captured %d decode graphs (batch %d..%d) in %.1fs", len(self.graphs),
                 self.sizes[0], self.sizes[-1], time.perf_counter() - t0)

    def can_run(self, num_seqs: int) -> bool:
        return bool(self.graphs) and num_seqs <= self.sizes[-1]

    def run(self, id_pos_slot: torch.Tensor, meta: AttentionMetadata,
            hidden: torch.Tensor | None = None, residual: torch.Tensor | None = None) -> Any:
        """Decode batch of ``n`` sequences through the smallest fitting graph → logits [n, V]
        (last stage) or (hidden, residual) [n, H] each. ``id_pos_slot`` [3, n]: the input
        ids, positions and slot mapping as rows of one tensor (ForwardBatch's), staged in one
        copy (each small copy before a replay cost ~2.6 µs of a batch-1 step on an H200);
        ``hidden``/``residual``: the previous stage's output (every stage but the first)."""
        n = id_pos_slot.shape[1]
        bs = next(s for s in self.sizes if s >= n)
        key = bs, next(b for b in self.bounds[bs] if b >= meta.max_seq_len)
        if not self.first:
            self.hidden[:n].copy_(hidden)
            self.residual[:n].copy_(residual)
        self.id_pos_slot[:, :n].copy_(id_pos_slot)
        self.slot_mapping[n:bs].fill_(-1)  # padded rows write nothing
        self.seq_lens[:n].copy_(meta.seq_lens)
        self.seq_lens[n:bs].fill_(1)
        w = meta.block_tables.shape[1]
        self.block_tables[:n, :w].copy_(meta.block_tables)
        self.graphs[key].replay()
        out = self.outputs[key]
        return out[:n] if self.last else (out[0][:n], out[1][:n])
