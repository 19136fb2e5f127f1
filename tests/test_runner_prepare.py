"""ModelRunner.prepare: one upload holds every array in the dtype its reader wants, the ids,
positions and slots as rows of one tensor (a graph replay stages them in one copy), and the
placeholders of overlapped steps filled from the previous step's tokens on the device."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from kestrel.core.scheduler import ScheduledRequest, SchedulerOutput
from kestrel.executor.cuda_graph import capture_sizes
from kestrel.executor.model_runner import ModelRunner, PrevTokens, verifies_as_decode


def _prepare(out: SchedulerOutput, prev: PrevTokens | None = None, flat: bool = False):
    """``flat``: as when decode graphs can serve the step's rows (ModelRunner.flat_drafts)."""
    runner = SimpleNamespace(block_size=4, device=torch.device("cpu"))
    runner._upload = lambda arrays: ModelRunner._upload(runner, arrays)
    runner.flat_drafts = lambda seqs, n: flat and verifies_as_decode(seqs)
    return ModelRunner.prepare(runner, out, prev)


def test_decode_of_placeholders_gathers_the_previous_tokens():
    prev = PrevTokens({"a": 1, "b": 0}, torch.tensor([70, 71]))
    out = SchedulerOutput([ScheduledRequest("a", [-1], 5, [3, 8], True),
                           ScheduledRequest("b", [-1], 2, [6], True)])
    batch = _prepare(out, prev)
    assert batch.input_ids.tolist() == [71, 70]
    assert batch.positions.tolist() == [5, 2]
    assert batch.meta.slot_mapping.tolist() == [8 * 4 + 1, 6 * 4 + 2]
    for row, t in zip(batch.id_pos_slot, (batch.input_ids, batch.positions,
                                         batch.meta.slot_mapping)):
        assert row.data_ptr() == t.data_ptr() and row.dtype == torch.int64
    meta = batch.meta
    assert (meta.query_start_loc.dtype, meta.seq_lens.dtype, meta.block_tables.dtype) == (
        torch.int32,) * 3
    assert meta.query_start_loc.tolist() == [0, 1, 2] and meta.seq_lens.tolist() == [6, 3]
    assert meta.block_tables.tolist() == [[3, 8], [6, 0]]


def test_a_prompt_chunk_beside_a_placeholder_keeps_its_tokens():
    prev = PrevTokens({"a": 0}, torch.tensor([55]))
    out = SchedulerOutput([ScheduledRequest("p", [9, 8, 7], 0, [2], True),
                           ScheduledRequest("a", [-1], 4, [1, 5], True)])
    batch = _prepare(out, prev)
    assert batch.input_ids.tolist() == [9, 8, 7, 55]
    assert batch.positions.tolist() == [0, 1, 2, 4]
    assert batch.id_pos_slot.shape == (3, 4)
    assert batch.logits_indices.tolist() == [2, 3]


def test_every_uploaded_array_starts_16_byte_aligned():
    """Triton specializes kernels on 16-byte pointer alignment: arrays whose offsets moved
    with the step's sizes (3 tokens, 2 sequences, 1 prompt row here) made new kernel variants."""
    out = SchedulerOutput([ScheduledRequest("p", [9, 8], 0, [2], True),
                           ScheduledRequest("q", [7], 3, [4], True)])
    batch = _prepare(out)
    meta = batch.meta
    for t in (batch.input_ids, batch.positions, meta.slot_mapping, batch.logits_indices,
              meta.query_start_loc, meta.seq_lens, meta.block_tables):
        assert t.data_ptr() % 16 == 0
    assert batch.positions.tolist() == [0, 1, 3] and batch.input_ids.tolist() == [9, 8, 7]


def test_kept_rows_name_the_sequences_they_end():
    """The last layer keeps the logits rows; when each ends its sequence (no prompt logprobs)
    the step says which sequences they end, for decode attention (forward_kept). A middle
    chunk (no sample) keeps nothing."""
    steps = [ScheduledRequest("a", [-1], 4, [1, 5], True),
             ScheduledRequest("mid", [9, 8, 7, 6], 0, [2], False),
             ScheduledRequest("p", [5, 4, 3], 2, [3], True)]
    batch = _prepare(SchedulerOutput(steps), PrevTokens({"a": 0}, torch.tensor([55])))
    keep = batch.keep
    assert keep.rows.tolist() == [0, 7] and keep.seqs.tolist() == [0, 2]
    assert keep.seqs_cpu == [0, 2]
    batch = _prepare(SchedulerOutput([steps[1]]))
    assert batch.keep.rows.numel() == 0 and batch.keep.seqs_cpu == []
    with_logprobs = ScheduledRequest("lp", [5, 4, 3], 0, [3], True, prompt_logprobs=True)
    batch = _prepare(SchedulerOutput([steps[1], with_logprobs]))
    assert batch.keep.rows.tolist() == [4, 5, 6] and batch.keep.seqs_cpu is None
    batch = _prepare(SchedulerOutput([steps[0]]), PrevTokens({"a": 0}, torch.tensor([55])))
    assert batch.keep is None  # decode: every row is read


def test_a_verified_step_as_decode_rows():
    """Request a verifies two guesses at positions 6..8 (blocks [3, 8, 2]), b has none: four
    decode rows, each with its request's block table and its context up to itself; the slots
    and logits rows are those of the varlen layout."""
    out = SchedulerOutput([ScheduledRequest("a", [11, 12, 13], 6, [3, 8, 2], False,
                                            num_draft=2),
                           ScheduledRequest("b", [21], 2, [6], True)])
    varlen, flat = _prepare(out), _prepare(out, flat=True)
    assert not varlen.meta.is_decode_only and flat.meta.is_decode_only
    assert flat.meta.query_start_loc.tolist() == [0, 1, 2, 3, 4]
    assert flat.meta.seq_lens.tolist() == [7, 8, 9, 3]
    assert flat.meta.block_tables.tolist() == [[3, 8, 2]] * 3 + [[6, 0, 0]]
    assert flat.meta.slot_mapping.tolist() == varlen.meta.slot_mapping.tolist() == [34, 35, 8, 26]
    assert flat.logits_indices.tolist() == varlen.logits_indices.tolist() == [0, 1, 2, 3]
    assert flat.prompt_rows == varlen.prompt_rows == {"a": (0, 3)}
    assert flat.sample_rows == varlen.sample_rows == [3]
    assert flat.keep is None


def test_steps_with_a_prompt_chunk_keep_the_varlen_layout():
    out = SchedulerOutput([ScheduledRequest("a", [11, 12], 6, [3, 8], False, num_draft=1),
                           ScheduledRequest("p", [1, 2, 3], 0, [5], True)])
    assert not _prepare(out, flat=True).meta.is_decode_only


def test_graph_sizes_reach_the_largest_batch():
    """Every batch up to max rows has a graph: 5 rows pad to 8 (not eager past 4)."""
    assert capture_sizes(1) == [1]
    assert capture_sizes(5) == [1, 2, 4, 8]
    assert capture_sizes(256)[-1] == 256 and capture_sizes(320)[-2:] == [288, 320]
    assert capture_sizes(5000)[-1] == 1024
