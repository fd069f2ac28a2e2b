"""Reading a version's splits, the resumable pair stream, and batch collation.

The training stream is the infinite concatenation of per-epoch permutations of the train
pairs: item i of the stream is ``perm(epoch = i // N)[i % N]`` with ``perm(e)`` drawn from
a generator seeded with (seed, e).  So the whole data position is one integer, the number
of pairs consumed, and a resumed run sees exactly the batches the uninterrupted run would.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from trainer.tokenize import TokenizedPair

DPO_COLUMNS = ("pair_id", "prompt", "chosen", "rejected", "weight")


SLICE_COLUMNS = ("locale", "annotator_kind", "agreement", "strength")


def read_split_rows(handle, split: str, extra: tuple[str, ...] = ()) -> list[dict]:
    """DPO rows of one split through the store's public reader (``VersionHandle.read_split``: every
    part's bytes are checked against the manifest's sha256 before they are parsed); ``extra``:
    further columns to keep when present (e.g. the evaluation's slice columns)."""
    if split not in handle.manifest().splits:
        return []
    frame = handle.read_split(split)
    return frame.select([c for c in (*DPO_COLUMNS, *extra) if c in frame.columns]).to_dicts()


def read_pair_tags(handle) -> dict[str, list[str]] | None:
    """pair_id -> tags from the version's ``pairs`` table (read through the handle, verified), or
    None when the version has no such table or column (then the evaluation has no tag slices)."""
    if not handle.has("pairs.parquet"):
        return None
    t = handle.read("pairs.parquet")
    if "tags" not in t.columns:
        return None
    return {str(pid): [str(x) for x in (tags or [])] for pid, tags in zip(t["pair_id"].to_list(), t["tags"].to_list())}


@dataclass
class Batch:
    """A collated micro-batch: rows [0, B) are the chosen sequences, [B, 2B) the rejected."""

    input_ids: Tensor  # (2B, T) int64, right-padded
    completion_mask: Tensor  # (2B, T) bool
    weight: Tensor  # (B,) float32
    ref_chosen: Tensor | None  # (B,) float64 reference summed log-probs (sums of hundreds of log-probs: keep the digits)
    ref_rejected: Tensor | None
    pair_ids: list[str]
    num_tokens: int  # non-pad tokens of the 2B sequences

    @property
    def size(self) -> int:
        return len(self.pair_ids)


def collate(pairs: list[TokenizedPair], pad_id: int, ref: dict[str, tuple[float, float]] | None = None) -> Batch:
    seqs = [p.input_ids("chosen") for p in pairs] + [p.input_ids("rejected") for p in pairs]
    masks = [p.completion_mask("chosen") for p in pairs] + [p.completion_mask("rejected") for p in pairs]
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.bool)
    for i, (s, m) in enumerate(zip(seqs, masks)):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, :len(m)] = torch.tensor(m, dtype=torch.bool)
    ref_w = ref_l = None
    if ref is not None:
        ref_w = torch.tensor([ref[p.pair_id][0] for p in pairs], dtype=torch.float64)
        ref_l = torch.tensor([ref[p.pair_id][1] for p in pairs], dtype=torch.float64)
    return Batch(ids, mask, torch.tensor([p.weight for p in pairs], dtype=torch.float32), ref_w, ref_l,
                 [p.pair_id for p in pairs], sum(len(s) for s in seqs))


def epoch_permutation(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


class PairStream:
    """Resumable stream over the train pairs; ``position`` is the number of pairs consumed."""

    def __init__(self, pairs: list[TokenizedPair], seed: int, position: int = 0):
        if not pairs:
            raise ValueError("the train split has no pairs left after tokenisation; nothing to train on")
        self.pairs, self.seed, self.position = pairs, seed, position
        self._epoch, self._perm = -1, []

    def take(self, k: int) -> list[TokenizedPair]:
        out = []
        for _ in range(k):
            epoch, j = divmod(self.position, len(self.pairs))
            if epoch != self._epoch:
                self._epoch, self._perm = epoch, epoch_permutation(len(self.pairs), self.seed, epoch)
            out.append(self.pairs[self._perm[j]])
            self.position += 1
        return out

    @property
    def epoch(self) -> float:
        return self.position / len(self.pairs)


def forward_parts(pairs: list[TokenizedPair], max_tokens: int, max_pairs: int | None = None) -> list[list[TokenizedPair]]:
    """Consecutive runs of whole pairs with at most ``max_tokens`` tokens (both sequences) and
    ``max_pairs`` pairs each; a pair longer than ``max_tokens`` forms a part of its own."""
    parts: list[list[TokenizedPair]] = []
    size = 0
    for p in pairs:
        if parts and size + p.num_tokens <= max_tokens and (max_pairs is None or len(parts[-1]) < max_pairs):
            parts[-1].append(p)
            size += p.num_tokens
        else:
            parts.append([p])
            size = p.num_tokens
    return parts


def batches_in_order(pairs: list[TokenizedPair], batch_size: int) -> list[list[TokenizedPair]]:
    """Fixed-order batches (evaluation, reference precompute), longest first to fail fast on memory."""
    order = sorted(pairs, key=lambda p: -max(len(p.chosen_ids), len(p.rejected_ids)) - len(p.prompt_ids))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
