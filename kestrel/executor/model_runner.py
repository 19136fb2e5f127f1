"""SchedulerOutput → tensors → model forward → logits. Owns the model and the KV cache tensors."""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kestrel.attention.base import AttentionMetadata, KeptRows, get_backend_cls
from kestrel.config import EngineConfig
from kestrel.core.scheduler import SchedulerOutput
from kestrel.executor.cuda_graph import DecodeGraphs
from kestrel.executor.loading import DoesNotFitError, build_model
from kestrel.parallel.state import SINGLE, TPGroup
from kestrel.quant.fp8_ops import FP8_DTYPE, FP8_MAX

log = logging.getLogger(__name__)

# FP8 KV cache calibration (calibrate_kv_scales): tokens of the calibration prefill, and the
# factor above their K/V amax that later inputs may reach before saturating at ±448.
KV_CALIBRATION_TOKENS = 512
KV_SCALE_HEADROOM = 2.0
_TORCH_DTYPES = {np.int64: torch.int64, np.int32: torch.int32}  # what _upload carries


@dataclass
class ForwardBatch:
    """The flat batch the model sees; built once per step from a SchedulerOutput."""

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    meta: AttentionMetadata
    logits_indices: torch.Tensor  # [N] rows of the hidden states to turn into logits
    sample_rows: list[int]  # per scheduled request with sample=True: its row in the logits
    sample_rows_dev: torch.Tensor  # the same, on the device (indexing with it never syncs)
    prompt_rows: dict[str, tuple[int, int]]  # request id → (first, end) logits rows of its chunk
    # [3, T]: input_ids, positions and meta.slot_mapping as rows of one tensor (the upload
    # lays them out so), for graph replays to stage with one copy
    id_pos_slot: torch.Tensor
    # the sequence each logits row ends (every row a sequence's last: no prompt logprobs)
    logits_seqs: torch.Tensor  # [N] int64 on the device (empty when logits_seqs_cpu is None)
    logits_seqs_cpu: list[int] | None

    @functools.cached_property
    def keep(self) -> KeptRows | None:
        """The rows the model's last layer carries past attention (LlamaForCausalLM.forward's
        ``keep``): the logits rows when they are fewer than the tokens (a prefill chunk
        samples its last row only), else None (every row, as at decode)."""
        if self.logits_indices.numel() == self.input_ids.numel():
            return None
        last_rows = self.logits_seqs_cpu is not None
        return KeptRows(self.logits_indices, self.logits_seqs if last_rows else None,
                        self.logits_seqs_cpu)

    def logits_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """The rows of the model's output (run with ``keep``) that become logits."""
        return hidden if self.keep is not None else hidden[self.logits_indices]


@dataclass
class PrevTokens:
    """The previous step's sampled tokens, still on the device (overlapped steps): a scheduled
    placeholder (-1) of request ``rid`` takes ``tokens[rows[rid]]``."""

    rows: dict[str, int]
    tokens: torch.Tensor  # [N] int64 on the runner's device


@dataclass
class RunnerOutput:
    sample_logits: torch.Tensor  # [num sampled requests, V] float32, in scheduled order
    # request id → [chunk len, V] float32: prompt logprobs, or a chunk with proposals to verify
    prompt_logits: dict[str, torch.Tensor]


def select_backend(cfg: EngineConfig) -> str:
    """The one place that picks GPU kernels: triton on CUDA when available, torch elsewhere."""
    if cfg.attention_backend == "triton" and not cfg.device.startswith("cuda") \
            and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"attention backend 'triton' runs on CUDA devices (or, slowly, on a "
                         f"CPU under TRITON_INTERPRET=1); the device is {cfg.device!r}")
    if cfg.attention_backend != "auto":
        return cfg.attention_backend
    if cfg.device.startswith("cuda"):
        try:
            import kestrel.attention.triton_backend  # noqa: F401 - registers "triton"

            return "triton"
        except ImportError as e:
            log.warning("triton attention unavailable (%s); using the torch reference", e)
    import kestrel.attention.torch_ref  # noqa: F401 - registers "torch"

    return "torch"


def verifies_as_decode(seqs: list) -> bool:
    """A step of decoding requests only (each chunk its last token and its proposals), some
    with proposals to verify."""
    return (any(s.num_draft for s in seqs)
            and all(not s.prompt_logprobs and s.num_new_tokens == 1 + s.num_draft
                    and (s.sample or s.num_draft) for s in seqs))


class ModelRunner:
    def __init__(self, cfg: EngineConfig, tp: TPGroup = SINGLE,
                 layer_range: tuple[int, int] | None = None) -> None:
        self.cfg = cfg
        self.device = torch.device(cfg.device)
        self.block_size = cfg.cache.block_size
        self.backend_name = select_backend(cfg)
        backend_cls = get_backend_cls(self.backend_name)
        self.model = build_model(cfg, backend_cls, tp, layer_range)
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.num_blocks = 0
        self.graphs: DecodeGraphs | None = None

    # ---- KV cache -------------------------------------------------------------------------
    def kv_dtype(self) -> torch.dtype:
        return self.cfg.dtype if self.cfg.cache.kv_cache_dtype == "auto" else FP8_DTYPE

    def block_bytes(self) -> int:
        attn = next(iter(self.model.layers.values())).self_attn
        per_layer = 2 * self.block_size * attn.num_kv_heads * attn.head_dim
        return per_layer * len(self.model.layers) * self.kv_dtype().itemsize

    def num_blocks_that_fit(self) -> int:
        """Blocks in the pool: explicit, a CPU byte budget, or what GPU memory leaves."""
        if self.cfg.cache.num_blocks is not None:
            return self.cfg.cache.num_blocks
        if self.device.type != "cuda":
            return max(1, self.cfg.cache.cpu_kv_cache_bytes // self.block_bytes())
        free, total = torch.cuda.mem_get_info(self.device)
        peak = self.profile_or_explain(self.profile_peak_activation_bytes)
        budget = total * self.cfg.cache.gpu_memory_utilization - (total - free) - peak
        n = int(budget // self.block_bytes())
        if n < 1:
            raise DoesNotFitError(
                f"out of GPU memory for the KV cache: weights use {(total - free) / 2**30:.1f} GiB, "
                f"activations {peak / 2**30:.1f} GiB, of {total / 2**30:.1f} GiB x "
                f"gpu_memory_utilization {self.cfg.cache.gpu_memory_utilization}; use a smaller "
                f"max_num_batched_tokens, quantization, or more GPUs (tensor/pipeline parallel)")
        return n

    def profile_or_explain(self, profile: Callable[[], int]) -> int:
        """``profile()``'s activation peak; when that forward runs out of memory, an error that
        says how much was in use and what to change instead of the allocator's."""
        try:
            return profile()
        except torch.cuda.OutOfMemoryError as e:
            self.kv_caches = []
            torch.cuda.empty_cache()
            free, total = torch.cuda.mem_get_info(self.device)
            n = min(self.cfg.scheduler.max_num_batched_tokens,
                    self.cfg.model_config.max_position_embeddings)
            raise DoesNotFitError(
                f"out of GPU memory in the start-up forward of {n} tokens (the step budget, "
                f"max_num_batched_tokens), with the weights holding "
                f"{(total - free) / 2**30:.1f} of {total / 2**30:.1f} GiB: lower "
                f"--max-num-batched-tokens, or leave more memory to activations (--quantization "
                f"fp8, more GPUs)") from e

    def profile_peak_activation_bytes(self) -> int:
        """Run one forward at the full token budget to measure activation memory."""
        from kestrel.core.scheduler import ScheduledRequest

        n = min(self.cfg.scheduler.max_num_batched_tokens, self.cfg.model_config.max_position_embeddings)
        nb = -(-n // self.block_size)
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        self.allocate_kv_cache(nb)
        kv_bytes = torch.cuda.memory_allocated(self.device) - before
        self.execute(SchedulerOutput([ScheduledRequest("profile", [0] * n, 0, list(range(nb)),
                                                       True)]))
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - before - kv_bytes
        self.kv_caches = []
        torch.cuda.empty_cache()
        return int(peak)

    def allocate_kv_cache(self, num_blocks: int, dtype: torch.dtype | None = None) -> None:
        attn = next(iter(self.model.layers.values())).self_attn
        shape = (num_blocks, self.block_size, attn.num_kv_heads, attn.head_dim)
        dt = dtype or self.kv_dtype()
        self.kv_caches = [(torch.zeros(shape, dtype=dt, device=self.device),
                           torch.zeros(shape, dtype=dt, device=self.device))
                          for _ in self.model.layers]
        self.num_blocks = num_blocks

    @torch.inference_mode()
    def calibrate_kv_scales(self, forward: Callable[[SchedulerOutput], Any] | None = None
                            ) -> None:
        """FP8 cache: each layer's per-KV-head scales, KV_SCALE_HEADROOM × amax / 448 of K (as
        cached: after the rotary) and of V over a prefill of KV_CALIBRATION_TOKENS seeded
        random tokens through a temporary cache in the model dtype; a no-op otherwise. Call
        before sizing (its profile run attends through the FP8 cache) and allocating the cache;
        every rank runs the same tokens, so the forward's all-reduces pair up. ``forward``
        runs the step (a pipeline stage passes its hand-offs); default: the whole model. A
        checkpoint that carries KV cache scales for every layer is used instead."""
        if self.kv_dtype() != FP8_DTYPE:
            return
        if self._checkpoint_kv_scales():
            return
        from kestrel.core.scheduler import ScheduledRequest

        sc, vocab = self.cfg.scheduler, self.cfg.model_config.vocab_size
        n = min(KV_CALIBRATION_TOKENS, sc.max_model_len, sc.max_num_batched_tokens)
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(1, vocab, (n,), generator=gen).tolist()
        nb = -(-n // self.block_size)
        self.allocate_kv_cache(nb, dtype=self.cfg.dtype)
        out = SchedulerOutput([ScheduledRequest("calibrate", ids, 0, list(range(nb)), True)])
        if forward is not None:
            forward(out)
        else:
            batch = self.prepare(out)
            self.model(batch.input_ids, batch.positions, self.kv_caches, batch.meta)
        for layer, (kc, vc) in zip(self.model.layers.values(), self.kv_caches):
            attn = layer.self_attn.attn
            attn.k_scale, attn.v_scale = (
                (c.abs().amax(dim=(0, 1, 3)).float().clamp_min(1e-6) * KV_SCALE_HEADROOM
                 / FP8_MAX).contiguous() for c in (kc, vc))
        self.kv_caches = []
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # the cache sizing that follows reads free memory

    def _checkpoint_kv_scales(self) -> bool:
        """Use the checkpoint's per-layer K and V scales (every head of a layer shares them)
        when it has them for every layer of the model, so every pipeline stage decides alike;
        False when it has none."""
        found = self.model.checkpoint_kv_scales
        if not found:
            return False
        for idx in range(self.cfg.model_config.num_hidden_layers):
            if (idx, "k") not in found or (idx, "v") not in found:
                raise ValueError(f"the checkpoint has KV cache scales for some layers but not "
                                 f"for layer {idx}: an FP8 cache needs all or none")
        for idx, layer in self.model.layers.items():
            attn = layer.self_attn.attn
            attn.k_scale, attn.v_scale = (
                torch.full((attn.num_kv_heads,), found[(int(idx), w)], dtype=torch.float32,
                           device=self.device) for w in ("k", "v"))
        log.info("FP8 KV cache: the checkpoint's scales, no calibration")
        return True

    def capture_graphs(self) -> None:
        """Decode CUDA graphs, on CUDA unless enforce_eager; call after allocate_kv_cache."""
        if self.device.type != "cuda" or self.cfg.enforce_eager:
            return
        eager = {type(m.quant_method).__name__ for m in self.model.modules()
                 if getattr(getattr(m, "quant_method", None), "cuda_graphs", True) is False}
        if eager:
            log.info("decode runs eagerly: %s cannot be captured in CUDA graphs",
                     ", ".join(sorted(eager)))
            return
        sc, spec = self.cfg.scheduler, self.cfg.speculative
        # a verified step's rows are decode rows of their own (prepare's flat_drafts)
        rows = sc.max_num_seqs * (1 + (spec.num_speculative_tokens if spec.method else 0))
        self.graphs = DecodeGraphs(self.model, self.kv_caches, rows, sc.max_model_len,
                                   self.block_size, self.device,
                                   self.cfg.model_config.hidden_size, self.cfg.dtype,
                                   get_backend_cls(self.backend_name).decode_len_breaks)
        self.graphs.capture()

    def release_graphs(self, wait: bool = True) -> None:
        """Destroy the decode CUDA graphs, then (``wait``) let the device finish. NCCL keeps a
        communicator referenced by every graph that captured one of its collectives: aborting
        it while such a graph lived blocked forever (TP=2 shutdown, 2×H100 and 2×H200).
        ``wait=False`` after a peer died: a collective waiting on it would never finish."""
        self.graphs = None
        if wait and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # ---- one step -------------------------------------------------------------------------
    def prepare(self, out: SchedulerOutput, prev: PrevTokens | None = None) -> ForwardBatch:
        bs = self.block_size
        seqs = out.scheduled
        q_lens = np.array([s.num_new_tokens for s in seqs], dtype=np.int64)
        starts = np.array([s.start for s in seqs], dtype=np.int64)
        qsl = np.zeros(len(seqs) + 1, dtype=np.int64)
        np.cumsum(q_lens, out=qsl[1:])
        ids = np.concatenate([np.asarray(s.token_ids, dtype=np.int64) for s in seqs])
        # position of each flat token: its sequence's start + its offset in the chunk
        seq_of = np.repeat(np.arange(len(seqs)), q_lens)
        pos = starts[seq_of] + np.arange(int(qsl[-1])) - qsl[:-1][seq_of]
        max_blocks = max(len(s.block_ids) for s in seqs)
        table = np.zeros((len(seqs), max_blocks), dtype=np.int64)
        for i, s in enumerate(seqs):
            table[i, : len(s.block_ids)] = s.block_ids
        slots = table[seq_of, pos // bs] * bs + pos % bs
        seq_lens = starts + q_lens
        rows, sample_rows, prompt_rows, row_seqs = [], [], {}, []
        for i, s in enumerate(seqs):
            if s.prompt_logprobs or s.num_draft:  # every position's logits
                prompt_rows[s.request_id] = (len(rows), len(rows) + s.num_new_tokens)
                rows.extend(range(qsl[i], qsl[i + 1]))
                if s.sample:
                    sample_rows.append(len(rows) - 1)
            elif s.sample:
                sample_rows.append(len(rows))
                rows.append(qsl[i + 1] - 1)
                row_seqs.append(i)
        holes = np.flatnonzero(ids < 0)  # placeholders for tokens the device sampled last step
        if holes.size and prev is None:
            raise RuntimeError("a scheduled token is still pending but no previous step's "
                               "tokens were given")
        src = np.array([prev.rows[seqs[i].request_id] for i in seq_of[holes]] if holes.size
                       else [], dtype=np.int64)
        if self.flat_drafts(seqs, pos.size):  # each token a decode row: its own context
            table, seq_lens = table[seq_of], pos + 1
            q_lens = np.ones(pos.size, dtype=np.int64)
            qsl = np.arange(pos.size + 1, dtype=np.int64)
        i32 = np.int32
        n = ids.size
        ips = np.zeros((3, n + n % 2), dtype=np.int64)  # rows of whole 16-byte units (_upload)
        ips[0, :n], ips[1, :n], ips[2, :n] = ids, pos, slots
        last_rows_only = not prompt_rows
        arrays = [ips, np.array(rows, dtype=np.int64),
                  np.array(sample_rows, np.int64), holes, src, qsl.astype(i32),
                  seq_lens.astype(i32), table.astype(i32),
                  np.array(row_seqs if last_rows_only else [], np.int64)]
        id_pos_slot, rows_t, sample_t, holes_t, src_t, qsl_t, lens_t, table_t, row_seqs_t = \
            self._upload(arrays)
        id_pos_slot = id_pos_slot[:, :n]
        ids_t, pos_t, slots_t = id_pos_slot
        if holes.size == ids.size:  # every token a placeholder (overlapped decode): one gather
            torch.index_select(prev.tokens, 0, src_t, out=ids_t)
        elif holes.size:
            ids_t.index_copy_(0, holes_t, prev.tokens.index_select(0, src_t))
        meta = AttentionMetadata(
            slot_mapping=slots_t, query_start_loc=qsl_t, seq_lens=lens_t, block_tables=table_t,
            max_query_len=int(q_lens.max()), max_seq_len=int(seq_lens.max()),
            seq_lens_cpu=seq_lens.tolist(), query_lens_cpu=q_lens.tolist())
        return ForwardBatch(ids_t, pos_t, meta, rows_t, sample_rows, sample_t, prompt_rows,
                            id_pos_slot, row_seqs_t, row_seqs if last_rows_only else None)

    def flat_drafts(self, seqs: list, num_tokens: int) -> bool:
        """Whether this step runs as a decode batch of one row per token (row j of a request:
        its block table, its context up to and including token j): attention computes the
        same, and the decode CUDA graphs serve it instead of an eager varlen forward (a 135M
        model's verified step took 4.9 ms eagerly against 0.86 for a plain step, H200). Only
        where a graph fits the rows: without one the varlen path is the cheaper, as it reads
        each request's context once where the rows read it once each."""
        return (self.graphs is not None and self.graphs.can_run(num_tokens)
                and verifies_as_decode(seqs))

    def _upload(self, arrays: list[np.ndarray]) -> list[torch.Tensor]:
        """Several small int64 / int32 arrays in one host→device copy (pinned and non-blocking
        on CUDA, so preparing a step never waits for the device), each in the dtype the
        kernels read, so no conversion kernel runs. The arrays are written straight into a
        buffer from the pinned allocator: ``Tensor.pin_memory()`` first asks the driver
        whether the tensor is pinned, which took 2 ms of a 4k prefill step on an H200.
        Each array starts 16-byte aligned: Triton specializes a kernel on which of its pointer
        arguments are, so offsets that moved with the step's sizes made new variants of the
        prefill, rotary and decode kernels, each compiled on first sight (a first 32-prompt
        run's median TTFT 9.1 s against 2.0 s for the same run again, H200)."""
        parts = [np.ascontiguousarray(a) for a in arrays]
        starts = np.cumsum([0] + [-(-p.nbytes // 16) * 16 for p in parts])
        pinned = self.device.type == "cuda"
        flat = torch.empty(int(starts[-1]), dtype=torch.uint8, pin_memory=pinned)
        host = flat.numpy()
        for p, off in zip(parts, starts):
            host[off: off + p.nbytes] = p.reshape(-1).view(np.uint8)
        if pinned:
            flat = flat.to(self.device, non_blocking=True)
        return [flat[off: off + p.nbytes].view(_TORCH_DTYPES[p.dtype.type]).view(p.shape)
                for p, off in zip(parts, starts)]

    def use_graph(self, batch: ForwardBatch) -> bool:
        """A captured graph serves decode batches that want the logits of every row (a graph
        computes them all) and fit the largest graph. Depends on the SchedulerOutput alone, so
        every rank decides alike."""
        return (self.graphs is not None and batch.meta.is_decode_only
                and batch.logits_indices.numel() == batch.meta.num_seqs
                and self.graphs.can_run(batch.meta.num_seqs))

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput, prev: PrevTokens | None = None) -> RunnerOutput:
        batch = self.prepare(out, prev)
        if self.use_graph(batch):
            logits = self.graphs.run(batch.id_pos_slot, batch.meta)
            if not batch.prompt_rows:  # plain decode: every row sampled, in order
                return RunnerOutput(logits, {})
            logits = logits.clone()  # the graph's buffer: the next replay overwrites it
        else:
            hidden, _ = self.model(batch.input_ids, batch.positions, self.kv_caches,
                                   batch.meta, keep=batch.keep)
            logits = self.model.compute_logits(batch.logits_hidden(hidden))
        prompt = {rid: logits[a:b] for rid, (a, b) in batch.prompt_rows.items()}
        return RunnerOutput(logits.index_select(0, batch.sample_rows_dev), prompt)
