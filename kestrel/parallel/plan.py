"""Which TP × PP layouts fit a model on N GPUs, and how fast each is, from a roofline model.

Memory per GPU (the fullest stage): its share of the weights (BF16, or the FP8 recipe: FFN
matmuls in FP8 with row scales, attention and the first/last layers in BF16), activations at
the token budget, a fixed overhead (CUDA context, NCCL, workspaces), and the KV cache (BF16),
which must hold at least one whole request of the workload.

Time of one forward on one stage, per GPU: max(FLOPs / FLOP/s, bytes / bandwidth) (weights,
KV read) + two all-reduces per decoder layer over the TP group (ring: 2(t-1)/t of the message
over NVLink, or the inter-node link when the group spans machines, plus a latency each) + the
hand-off to the next stage (1/t of the activations per rank, Megatron's scatter/gather).

- Latency objective: one request alone. A token visits every stage in turn, so pipeline
  stages add up: TP divides the per-token time, PP does not.
- Throughput objective: as many concurrent requests as the KV cache holds (≤ max_num_seqs),
  in m = pp micro-batches. A wave's prefill drains c chunks through p stages in (c + p - 1)
  stage times (bubble (p-1)/(c+p-1)); decode keeps m micro-batches cycling, a round taking
  max(m, p) stage times. Replicas (GPUs left over by T·P) multiply throughput.

Ceilings: datasheet figures × an efficiency unless ``--roofline`` gives the JSON that
``kestrel bench roofline --json`` measured on the GPU (copy bandwidth, BF16 and FP8 matmul).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from kestrel.config import ModelConfig
from kestrel.parallel.pipeline import bubble_fraction, check_layout, stage_ranges

GB = 1e9


@dataclass(frozen=True)
class GpuSpec:
    name: str
    memory_bytes: float
    bandwidth: float  # HBM bytes/s the roofline uses
    bf16_flops: float
    fp8_flops: float
    measured: bool = False  # ceilings from `bench roofline` rather than datasheet × efficiency


# Datasheet (SXM) figures; dense tensor-core rates, not the 2:4-sparse ones.
DATASHEET = {
    "h100": GpuSpec("H100 SXM 80GB", 80 * GB, 3.35e12, 989e12, 1979e12),
    "h200": GpuSpec("H200 SXM 141GB", 141 * GB, 4.8e12, 989e12, 1979e12),
}
BANDWIDTH_EFFICIENCY = 0.80  # achieved / datasheet when nothing was measured
FLOPS_EFFICIENCY = 0.65


def gpu_spec(name: str, roofline: dict | None = None) -> GpuSpec:
    if name not in DATASHEET:
        raise ValueError(f"unknown GPU {name!r}; known: {sorted(DATASHEET)}")
    ds = DATASHEET[name]
    if roofline is None:
        return replace(ds, bandwidth=ds.bandwidth * BANDWIDTH_EFFICIENCY,
                       bf16_flops=ds.bf16_flops * FLOPS_EFFICIENCY,
                       fp8_flops=ds.fp8_flops * FLOPS_EFFICIENCY)
    flops = roofline.get("matmul_flops", {})
    bf16 = flops.get("bfloat16") or ds.bf16_flops * FLOPS_EFFICIENCY
    fp8 = flops.get("fp8_rowwise") or bf16  # no FP8 tensor cores measured: FP8 runs at BF16
    return replace(ds, bandwidth=float(roofline["copy_bandwidth_Bps"]), bf16_flops=float(bf16),
                   fp8_flops=float(fp8), measured=True)


@dataclass(frozen=True)
class Cluster:
    gpu: GpuSpec
    num_gpus: int
    gpus_per_node: int
    nvlink_bw: float = 450 * GB  # per GPU, one direction
    internode_bw: float = 50 * GB  # per GPU (a 400 Gb/s NIC each)
    nvlink_latency: float = 8e-6  # per collective / transfer
    internode_latency: float = 20e-6
    memory_utilization: float = 0.90
    overhead_bytes: float = 3 * GB
    step_overhead: float = 0.0  # host seconds per engine step (schedule, launch, sample)
    # GPU seconds per decoder layer of the small latency-bound kernels (norms, rotary + cache
    # write, attention's split reduce, activation) that neither bytes nor FLOPs count and that
    # do not shrink with TP: ~20 µs (0.7 ms over 32 layers of a batch-1 step, H200,
    # profile_decode.py). 0 by default: the pure roofline.
    layer_overhead: float = 0.0

    def __post_init__(self) -> None:
        if self.num_gpus < 1 or self.gpus_per_node < 1:
            raise ValueError("--gpus and --gpus-per-node must be >= 1")

    def link(self, crosses_nodes: bool) -> tuple[float, float]:
        """(bandwidth, latency) of a transfer inside a machine or between machines."""
        if crosses_nodes:
            return self.internode_bw, self.internode_latency
        return self.nvlink_bw, self.nvlink_latency


@dataclass(frozen=True)
class Workload:
    name: str
    input_len: int
    output_len: int
    max_num_seqs: int = 256
    token_budget: int = 8192  # max_num_batched_tokens: prefill chunk size


@dataclass
class Estimate:
    """One layout's verdict and figures (times in seconds, throughput in tokens/s)."""

    tp: int
    pp: int
    replicas: int
    precision: str
    fits: bool
    reason: str = ""
    weight_bytes: float = 0.0  # per GPU, fullest stage
    kv_tokens: int = 0  # KV capacity per replica, tokens
    concurrency: int = 0  # requests a replica runs at once (throughput objective)
    ttft: float = math.nan
    tpot: float = math.nan
    e2e: float = math.nan
    throughput: float = math.nan  # output tokens/s over all replicas
    micro_batches: int = 1
    bubble: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        s = f"TP{self.tp}xPP{self.pp}"
        return s + (f" x{self.replicas} replicas" if self.replicas > 1 else "")


# ---- what one stage holds --------------------------------------------------------------------

@dataclass(frozen=True)
class StageShape:
    """Per-GPU sizes of one stage under a layout."""

    weight_bytes: float
    linear_params: float  # matmul parameters (FLOPs = 2 · this · tokens)
    kv_bytes_per_token: float
    layers: int
    first: bool
    last: bool


def _layer_weights(cfg: ModelConfig, idx: int, tp: int, fp8: bool) -> tuple[float, float]:
    """(bytes, matmul params) of decoder layer ``idx`` on one of ``tp`` ranks."""
    h, d = cfg.hidden_size, cfg.head_dim
    kv_heads = max(1, cfg.num_key_value_heads // tp)
    attn = h * cfg.q_size / tp * 2 + h * kv_heads * d * 2  # q, o; k, v (replicated past kv)
    mlp = 3 * h * cfg.intermediate_size / tp
    edge = idx in (0, cfg.num_hidden_layers - 1)  # the recipe keeps first and last in BF16
    mlp_bytes = mlp * 2 if (not fp8 or edge) else mlp + 4 * (2 * cfg.intermediate_size / tp + h)
    return attn * 2 + mlp_bytes + 4 * h, attn + mlp


def stage_shapes(cfg: ModelConfig, tp: int, pp: int, fp8: bool, kv_elem_bytes: int = 2
                 ) -> list[StageShape]:
    """``kv_elem_bytes``: 2 for a BF16 KV cache, 1 for FP8 (``--kv-cache-dtype fp8``)."""
    kv_heads = max(1, cfg.num_key_value_heads // tp)
    table = cfg.vocab_size * cfg.hidden_size / tp * 2  # vocab-parallel, BF16
    shapes = []
    for s, (a, b) in enumerate(stage_ranges(cfg, pp)):
        per = [_layer_weights(cfg, i, tp, fp8) for i in range(a, b)]
        wbytes = sum(x for x, _ in per) + (table if s == 0 else 0) + (table if s == pp - 1 else 0)
        params = sum(p for _, p in per) + (table / 2 if s == pp - 1 else 0)  # LM head matmul
        kv = (b - a) * 2 * kv_heads * cfg.head_dim * kv_elem_bytes
        shapes.append(StageShape(wbytes, params, kv, b - a, s == 0, s == pp - 1))
    return shapes


def activation_bytes(cfg: ModelConfig, tp: int, tokens: int, rows: int) -> float:
    """Peak activations of one forward: a few [T, H] buffers, QKV and MLP intermediates,
    and float32 logits of the sampled rows (gathered over the vocabulary)."""
    per_token = 4 * cfg.hidden_size + (cfg.q_size + 2 * cfg.kv_size) / tp \
        + 3 * cfg.intermediate_size / tp
    return tokens * per_token * 2 + rows * cfg.vocab_size * 4 * 2


# ---- time of one stage -----------------------------------------------------------------------

def _allreduce(cluster: Cluster, tp: int, nbytes: float) -> float:
    if tp == 1:
        return 0.0
    bw, lat = cluster.link(tp > cluster.gpus_per_node)
    return lat + 2 * (tp - 1) / tp * nbytes / bw


def stage_time(cfg: ModelConfig, shape: StageShape, cluster: Cluster, tp: int, fp8: bool,
               tokens: int, kv_tokens_read: float, attn_pairs: float) -> float:
    """Seconds for one stage to run ``tokens`` new tokens reading ``kv_tokens_read`` cached
    ones, with ``attn_pairs`` (query, key) products per head in attention."""
    gpu = cluster.gpu
    flops_rate = gpu.fp8_flops if fp8 else gpu.bf16_flops
    heads = cfg.num_attention_heads / tp
    flops = 2 * shape.linear_params * tokens + 4 * attn_pairs * heads * cfg.head_dim \
        * shape.layers
    nbytes = shape.weight_bytes + kv_tokens_read * shape.kv_bytes_per_token
    compute = max(flops / flops_rate, nbytes / gpu.bandwidth)
    comm = 2 * shape.layers * _allreduce(cluster, tp, tokens * cfg.hidden_size * 2)
    if shape.first:
        comm += _allreduce(cluster, tp, tokens * cfg.hidden_size * 2)  # vocab-parallel embed
    return compute + comm + shape.layers * cluster.layer_overhead


def handoff_time(cfg: ModelConfig, cluster: Cluster, tp: int, stage: int, tokens: int) -> float:
    """Stage ``stage`` → ``stage + 1``: each rank sends 1/tp of hidden + residual."""
    crosses = (stage * tp) // cluster.gpus_per_node != ((stage + 1) * tp) // cluster.gpus_per_node
    bw, lat = cluster.link(crosses)
    nbytes = 2 * tokens * cfg.hidden_size * 2 / tp
    gather = 0.0 if tp == 1 else cluster.nvlink_latency + nbytes * (tp - 1) / cluster.nvlink_bw
    return lat + nbytes / bw + gather


def pipeline_pass(cfg: ModelConfig, shapes: list[StageShape], cluster: Cluster, tp: int,
                  fp8: bool, tokens: int, kv_read: float, pairs: float) -> tuple[float, float]:
    """(sum over stages: one micro-batch's trip, slowest stage incl. its hand-off)."""
    trip, slowest = 0.0, 0.0
    for s, shape in enumerate(shapes):
        t = stage_time(cfg, shape, cluster, tp, fp8, tokens, kv_read, pairs)
        if s == 0:
            t += cluster.step_overhead  # the driver's host work, serial with its stage
        if s < len(shapes) - 1:
            t += handoff_time(cfg, cluster, tp, s, tokens)
        trip += t
        slowest = max(slowest, t)
    return trip, slowest


# ---- one layout ------------------------------------------------------------------------------

def estimate(cfg: ModelConfig, cluster: Cluster, wl: Workload, tp: int, pp: int,
             precision: str, micro_batches: int | None = None,
             kv_tokens: int | None = None, kv_elem_bytes: int = 2) -> Estimate:
    """Fit check, then the latency (one request) and throughput (full load) figures.
    ``kv_tokens``: the KV capacity of a running engine, instead of one derived from memory;
    ``kv_elem_bytes``: 1 for an FP8 KV cache."""
    fp8 = precision == "fp8"
    est = Estimate(tp, pp, cluster.num_gpus // (tp * pp), precision, fits=False)
    try:
        check_layout(cfg, tp, pp)
    except ValueError as e:
        est.reason = str(e).split(": ", 1)[-1]
        return est
    shapes = stage_shapes(cfg, tp, pp, fp8, kv_elem_bytes)
    budget = cluster.gpu.memory_bytes * cluster.memory_utilization
    rows = min(wl.max_num_seqs, wl.token_budget)
    act = activation_bytes(cfg, tp, wl.token_budget, rows)
    free = [budget - s.weight_bytes - act - cluster.overhead_bytes for s in shapes]
    est.weight_bytes = max(s.weight_bytes for s in shapes)
    if kv_tokens is None:
        kv_tokens = min(int(f // s.kv_bytes_per_token) if f > 0 else 0
                        for f, s in zip(free, shapes))
    need = wl.input_len + wl.output_len
    if kv_tokens < need:
        worst = max(range(pp), key=lambda i: shapes[i].weight_bytes)
        est.reason = (f"stage {worst} holds {shapes[worst].weight_bytes / GB:.0f} GB of weights "
                      f"per GPU (of {budget / GB:.0f} GB usable): room for {max(kv_tokens, 0):,}"
                      f" KV tokens, one request needs {need:,}")
        return est
    est.fits, est.kv_tokens = True, kv_tokens
    _latency(est, cfg, shapes, cluster, wl, tp, fp8)
    _throughput(est, cfg, shapes, cluster, wl, tp, fp8, micro_batches)
    return est


def _latency(est: Estimate, cfg: ModelConfig, shapes: list[StageShape], cluster: Cluster,
             wl: Workload, tp: int, fp8: bool) -> None:
    """One request alone: prefill in budget-sized chunks, then one token per trip."""
    n, ttft, done = wl.input_len, 0.0, 0
    while done < n:
        c = min(wl.token_budget, n - done)
        trip, _ = pipeline_pass(cfg, shapes, cluster, tp, fp8, c, done + c,
                                c * (done + (c + 1) / 2))
        ttft, done = ttft + trip, done + c
    ctx = n + wl.output_len / 2
    est.tpot, _ = pipeline_pass(cfg, shapes, cluster, tp, fp8, 1, ctx, ctx)
    est.ttft = ttft
    est.e2e = ttft + (wl.output_len - 1) * est.tpot


def _throughput(est: Estimate, cfg: ModelConfig, shapes: list[StageShape], cluster: Cluster,
                wl: Workload, tp: int, fp8: bool, micro_batches: int | None) -> None:
    """A wave of B concurrent requests: pipelined chunked prefill, then decode rounds."""
    pp = len(shapes)
    b_total = max(1, min(wl.max_num_seqs, est.kv_tokens // (wl.input_len + wl.output_len)))
    m = min(b_total, micro_batches or pp)
    est.concurrency, est.micro_batches = b_total, m
    # prefill: the wave's prompt tokens in chunks of the token budget, pipelined
    total_in = b_total * wl.input_len
    chunks = max(1, math.ceil(total_in / wl.token_budget))
    chunk = total_in / chunks
    pairs = chunk / wl.input_len * wl.input_len ** 2 / 2  # causal (q, k) pairs per chunk
    _, slow = pipeline_pass(cfg, shapes, cluster, tp, fp8, int(chunk), chunk, pairs)
    prefill = (chunks + pp - 1) * slow
    est.bubble = bubble_fraction(pp, chunks) if pp > 1 else 0.0
    # decode: m micro-batches of b requests cycle through the stages
    b = b_total / m
    ctx = wl.input_len + wl.output_len / 2
    _, slow_d = pipeline_pass(cfg, shapes, cluster, tp, fp8, max(1, round(b)), b * ctx, b * ctx)
    decode = wl.output_len * max(m, pp) * slow_d
    est.throughput = est.replicas * b_total * wl.output_len / (prefill + decode)


# ---- all layouts -----------------------------------------------------------------------------

def layouts(cfg: ModelConfig, num_gpus: int) -> list[tuple[int, int]]:
    """(tp, pp) pairs whose product divides the GPU count (the rest run as replicas); TP
    sizes are those Megatron splits allow (heads, KV heads, MLP width)."""
    out = []
    for tp in range(1, num_gpus + 1):
        for pp in range(1, num_gpus // tp + 1):
            if num_gpus % (tp * pp) == 0 and pp <= cfg.num_hidden_layers:
                try:
                    check_layout(cfg, tp, pp)
                except ValueError:
                    continue
                out.append((tp, pp))
    return out


def plan(cfg: ModelConfig, cluster: Cluster, wl: Workload, precisions: tuple[str, ...],
         micro_batches: int | None = None, only: tuple[int, int] | None = None,
         kv_elem_bytes: int = 2) -> list[Estimate]:
    pairs = [only] if only else layouts(cfg, cluster.num_gpus)
    return [estimate(cfg, cluster, wl, tp, pp, prec, micro_batches, None, kv_elem_bytes)
            for prec in precisions for tp, pp in pairs]


def best(estimates: list[Estimate], objective: str) -> Estimate | None:
    """Lowest end-to-end latency, or highest throughput, among the layouts that fit."""
    fit = [e for e in estimates if e.fits]
    if not fit:
        return None
    if objective == "latency":
        return min(fit, key=lambda e: (e.e2e, e.tp * e.pp))
    return max(fit, key=lambda e: e.throughput)
