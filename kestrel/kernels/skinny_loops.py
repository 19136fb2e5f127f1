"""The K loops of the skinny GEMM (``fp8_gemm._skinny_kernel``): one program's pass over its
split of K, as a CUDA-core multiply-add (``fma_loop``: one step at a time, a step ahead, or in
groups), int8 dot products of four (``dp4a_loop``) or a tensor-core dot (``dot_loop``).
fp8_gemm's docstring says when each runs."""

from __future__ import annotations

import triton
import triton.language as tl

from kestrel.kernels.rounding import round_dtype


@triton.jit
def load_w(w_ptrs, offs_k, K, EVEN_K: tl.constexpr, W_EVICT: tl.constexpr):
    """One K step of w; masked past K unless every step is full."""
    if EVEN_K:
        return tl.load(w_ptrs, eviction_policy=W_EVICT)
    return tl.load(w_ptrs, mask=offs_k[None, :] < K, other=0.0, eviction_policy=W_EVICT)


@triton.jit
def _load_x(x_ptrs, offs_k, K, EVEN_K: tl.constexpr, GLU: tl.constexpr, DT: tl.constexpr,
            HW: tl.constexpr):
    """One K step of x. ``GLU``: x is [silu(gate) | up] (gate_up's output with ``silu_cols``,
    rows of 2K) and the step's x is their product, rounded to the dtype as silu_and_mul's."""
    if EVEN_K:
        x = tl.load(x_ptrs)
    else:
        x = tl.load(x_ptrs, mask=offs_k[None, :] < K, other=0.0)
    if GLU:
        if EVEN_K:
            up = tl.load(x_ptrs + K)
        else:
            up = tl.load(x_ptrs + K, mask=offs_k[None, :] < K, other=0.0)
        x = round_dtype(x.to(tl.float32) * up.to(tl.float32), DT, HW).to(up.dtype)
    return x


@triton.jit
def fma_loop(x_ptrs, w_ptrs, w_first, offs_k, k_lo, k_hi, K, BLOCK_N: tl.constexpr,
              BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, W_EVICT: tl.constexpr,
              BROADCAST_X: tl.constexpr, PREFETCH: tl.constexpr, GLU: tl.constexpr,
              DT: tl.constexpr, HW: tl.constexpr, AHEAD: tl.constexpr, INT8: tl.constexpr):
    """x_ptrs [1, BLOCK_K], w_ptrs [BLOCK_N, BLOCK_K] → x·wᵀ as [BLOCK_N, 1] float32; the first
    K step's weights are ``w_first``, loaded by the caller. ``PREFETCH``: each step's tiles
    are loaded one step ahead, before the math on the current ones (SkinnyConfig.prefetch);
    ``AHEAD``: AHEAD steps loaded together (SkinnyConfig.ahead). ``INT8``: int8 tiles, summed
    exactly in int32 (see ``_product``)."""
    if BROADCAST_X:  # x in the weight tile's layout (SkinnyConfig.broadcast_x)
        x_ptrs = x_ptrs + tl.zeros([BLOCK_N, 1], dtype=tl.int32)
    if PREFETCH:
        acc = _fma_prefetched(x_ptrs, w_ptrs, w_first, offs_k, k_lo, k_hi, K, BLOCK_K, EVEN_K,
                              W_EVICT, GLU, DT, HW, INT8)
    else:
        x = _load_x(x_ptrs, offs_k, K, EVEN_K, GLU, DT, HW)
        acc = _product(w_first, x, INT8)
        if AHEAD > 1:  # the rest of the first group (the launch makes groups tile the split)
            acc = _fma_group(acc, x_ptrs, w_ptrs, offs_k, K, BLOCK_K, EVEN_K, W_EVICT, GLU, DT,
                             HW, True, AHEAD, INT8)
        for _ in range(k_lo + AHEAD * BLOCK_K, k_hi, AHEAD * BLOCK_K):
            w_ptrs += AHEAD * BLOCK_K
            x_ptrs += AHEAD * BLOCK_K
            offs_k += AHEAD * BLOCK_K
            acc = _fma_group(acc, x_ptrs, w_ptrs, offs_k, K, BLOCK_K, EVEN_K, W_EVICT, GLU, DT,
                             HW, False, AHEAD, INT8)
    return tl.sum(acc, axis=1)[:, None].to(tl.float32)


@triton.jit
def _product(w, x, INT8: tl.constexpr):
    """w·x elementwise, in float32; ``INT8``: in int32, exact (sums of int8 products fit int32
    for K < 2^17), for int8 operands that ``dp4a_loop`` cannot read as words."""
    if INT8:
        p = w.to(tl.int32) * x.to(tl.int32)
    else:
        p = w.to(tl.float32) * x.to(tl.float32)
    return p


@triton.jit
def _fma_group(acc, x_ptrs, w_ptrs, offs_k, K, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
               W_EVICT: tl.constexpr, GLU: tl.constexpr, DT: tl.constexpr, HW: tl.constexpr,
               FIRST: tl.constexpr, AHEAD: tl.constexpr, INT8: tl.constexpr):
    """acc plus the products of the AHEAD (1, 2 or 4) K steps from the pointers' one
    (``FIRST``: from the one after, the caller having done it): every tile loaded first, at
    constant offsets (16-byte vectors stay), then the products in step order
    (SkinnyConfig.ahead; AHEAD 1 is the plain one-step loop)."""
    if not FIRST:
        w0 = load_w(w_ptrs, offs_k, K, EVEN_K, W_EVICT)
        x0 = _load_x(x_ptrs, offs_k, K, EVEN_K, GLU, DT, HW)
    if AHEAD > 1:
        w1 = load_w(w_ptrs + BLOCK_K, offs_k + BLOCK_K, K, EVEN_K, W_EVICT)
        x1 = _load_x(x_ptrs + BLOCK_K, offs_k + BLOCK_K, K, EVEN_K, GLU, DT, HW)
    if AHEAD == 4:
        w2 = load_w(w_ptrs + 2 * BLOCK_K, offs_k + 2 * BLOCK_K, K, EVEN_K, W_EVICT)
        w3 = load_w(w_ptrs + 3 * BLOCK_K, offs_k + 3 * BLOCK_K, K, EVEN_K, W_EVICT)
        x2 = _load_x(x_ptrs + 2 * BLOCK_K, offs_k + 2 * BLOCK_K, K, EVEN_K, GLU, DT, HW)
        x3 = _load_x(x_ptrs + 3 * BLOCK_K, offs_k + 3 * BLOCK_K, K, EVEN_K, GLU, DT, HW)
    if not FIRST:
        acc += _product(w0, x0, INT8)
    if AHEAD > 1:
        acc += _product(w1, x1, INT8)
    if AHEAD == 4:
        acc += _product(w2, x2, INT8)
        acc += _product(w3, x3, INT8)
    return acc


@triton.jit
def _fma_prefetched(x_ptrs, w_ptrs, w_first, offs_k, k_lo, k_hi, K, BLOCK_K: tl.constexpr,
                    EVEN_K: tl.constexpr, W_EVICT: tl.constexpr, GLU: tl.constexpr,
                    DT: tl.constexpr, HW: tl.constexpr, INT8: tl.constexpr):
    """fma_loop's products, each step's tiles loaded during the step before (the compiler
    pipelines only loads that feed a dot). The last step re-reads its own tiles (L1 hits)
    instead of reading past its K range. Same products, same order, as the plain loop."""
    x = _load_x(x_ptrs, offs_k, K, EVEN_K, GLU, DT, HW)
    step = tl.where(k_lo + BLOCK_K < k_hi, BLOCK_K, 0)
    w_next = load_w(w_ptrs + step, offs_k + step, K, EVEN_K, W_EVICT)
    x_next = _load_x(x_ptrs + step, offs_k + step, K, EVEN_K, GLU, DT, HW)
    acc = _product(w_first, x, INT8)
    for k in range(k_lo + BLOCK_K, k_hi, BLOCK_K):
        w, x = w_next, x_next
        w_ptrs += step
        x_ptrs += step
        offs_k += step
        step = tl.where(k + BLOCK_K < k_hi, BLOCK_K, 0)
        w_next = load_w(w_ptrs + step, offs_k + step, K, EVEN_K, W_EVICT)
        x_next = _load_x(x_ptrs + step, offs_k + step, K, EVEN_K, GLU, DT, HW)
        acc += _product(w, x, INT8)
    return acc


@triton.jit
def word_ptrs(ptr, rows, stride, offs_words):
    """Pointers to 32-bit words [rows, offs_words] of a K-contiguous int8 matrix (``stride``
    and the base in whole words: the launch checks)."""
    return ptr.to(tl.pointer_type(tl.int32)) + rows[:, None] * (stride // 4) + offs_words[None, :]


@triton.jit
def dp4a_loop(x_ptrs, w_ptrs, w_first, offs_k, k_lo, k_hi, K_WORDS, BLOCK_K: tl.constexpr,
              EVEN_K: tl.constexpr, W_EVICT: tl.constexpr, HW: tl.constexpr):
    """int8 x [1, BLOCK_K / 4] · w [BLOCK_N, BLOCK_K / 4] as 32-bit words of four codes
    (``word_ptrs``; ``offs_k`` counts words), over the split [k_lo, k_hi) in bytes → x·wᵀ as
    [BLOCK_N, 1] float32, summed exactly by ``dp4a`` (four products and the add in one integer
    instruction: no per-code conversion); the first step's words are ``w_first``."""
    WORDS: tl.constexpr = BLOCK_K // 4
    x = load_w(x_ptrs, offs_k, K_WORDS, EVEN_K, "")
    acc = _dp4a(w_first, tl.broadcast_to(x, w_first.shape), tl.zeros(w_first.shape, tl.int32), HW)
    for _ in range(k_lo + BLOCK_K, k_hi, BLOCK_K):
        w_ptrs += WORDS
        x_ptrs += WORDS
        offs_k += WORDS
        w = load_w(w_ptrs, offs_k, K_WORDS, EVEN_K, W_EVICT)
        x = load_w(x_ptrs, offs_k, K_WORDS, EVEN_K, "")
        acc = _dp4a(w, tl.broadcast_to(x, w.shape), acc, HW)
    return tl.sum(acc, axis=1)[:, None].to(tl.float32)


@triton.jit
def _dp4a(a, b, c, HW: tl.constexpr):
    """c + the four signed byte products of the words a and b: PTX ``dp4a.s32.s32`` on the
    GPU, the same sum by shifts under the interpreter (which cannot run inline PTX)."""
    if HW:
        r = tl.inline_asm_elementwise("dp4a.s32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                                      dtype=tl.int32, is_pure=True, pack=1)
    else:
        r = c + ((a << 24) >> 24) * ((b << 24) >> 24) + ((a << 16) >> 24) * ((b << 16) >> 24) \
            + ((a << 8) >> 24) * ((b << 8) >> 24) + (a >> 24) * (b >> 24)
    return r


@triton.jit
def _dot_step(acc, x, w, BLOCK_K: tl.constexpr, SCALED: tl.constexpr, DOT_F32: tl.constexpr,
              INT8: tl.constexpr):
    if INT8:  # exact int32 sums (one return: Triton types them all)
        acc = tl.dot(w, tl.trans(x), acc, out_dtype=tl.int32)
    elif SCALED:  # fp8: promoted to float32 every BLOCK_K products
        acc = tl.dot(w, tl.trans(x), acc, max_num_imprecise_acc=BLOCK_K)
    elif DOT_F32:  # float32 operands, no TF32 rounding (FMA, not tensor cores)
        acc = tl.dot(w.to(tl.float32), tl.trans(x.to(tl.float32)), acc, input_precision="ieee")
    else:
        acc = tl.dot(w, tl.trans(x), acc)  # 16-bit MMA, float32 accumulation
    return acc


@triton.jit
def dot_loop(x_ptrs, w_ptrs, w_first, offs_k, k_lo, k_hi, K, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
              W_EVICT: tl.constexpr, SCALED: tl.constexpr, DOT_F32: tl.constexpr,
              GLU: tl.constexpr, DT: tl.constexpr, HW: tl.constexpr, INT8: tl.constexpr):
    """x_ptrs [BLOCK_M, BLOCK_K], w_ptrs [BLOCK_N, BLOCK_K] → w·xᵀ as [BLOCK_N, BLOCK_M]; the
    first K step's weights are ``w_first``; ``INT8``: int8 tiles, summed exactly in int32."""
    if INT8:
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.int32)
    else:
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    x = _load_x(x_ptrs, offs_k, K, EVEN_K, GLU, DT, HW)
    acc = _dot_step(acc, x, w_first, BLOCK_K, SCALED, DOT_F32, INT8)
    for _ in range(k_lo + BLOCK_K, k_hi, BLOCK_K):
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
        offs_k += BLOCK_K
        w = load_w(w_ptrs, offs_k, K, EVEN_K, W_EVICT)
        x = _load_x(x_ptrs, offs_k, K, EVEN_K, GLU, DT, HW)
        acc = _dot_step(acc, x, w, BLOCK_K, SCALED, DOT_F32, INT8)
    return acc.to(tl.float32)
