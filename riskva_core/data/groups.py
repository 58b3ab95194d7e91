"""Photos of one defect form one group; whole groups go to one split, stably across versions.

Inspectors photograph a defect several times and photos get re-exported, so the exact file
hash (split.py's unit) lets near-copies straddle train and test. A group here is a connected
component of three links:

- the same file content (sha256);
- perceptual hashes within ``radius`` bits (imagehash's pHash, 64 bits: DCT of a 32x32 grey
  thumbnail, robust to re-encoding, resizing, brightness changes and small crops). Default
  radius ``DEFAULT_RADIUS`` = 10 bits: the variants of one photo (re-encoded, 90 % size,
  +8 % brightness, 3 % crop saved as PNG) sit within 10 bits of a sibling, while unrelated
  photos average 32 bits apart (random 64-bit hashes fall within 10 bits with probability
  ~1e-8 per pair). ``radius=0`` links identical pHashes only;
- optionally, the same non-empty value in a grouping column of the CSV (site, inspection id),
  named with ``--group_column``.

Split of a group (``plan_splits``):

1. Members recorded in an earlier version's split (``history``: content hash → split) keep
   that split: no photo ever changes split.
2. A group with history in exactly one split: its new photos join that split.
3. A group whose history spans splits (a new photo links a train photo to a test photo):
   recorded photos stay where they are and the new photos are kept out of every split, each
   with a reason (they would leak one split into another).
4. A group without history: the seeded draw of its anchor (the smallest member sha256) decides,
   ``split.split_of``. A single photo is its own anchor, so ungrouped photos split exactly as
   split.py always did.

Neighbour search (``near_pairs``) is multi-index hashing: with ``radius + 1`` disjoint bit
chunks, two hashes within ``radius`` bits agree exactly on at least one chunk (pigeonhole),
so only photos sharing a chunk value are compared, in vectorised numpy blocks. For n photos
with well-spread hashes the work is about ``(radius+1) * n^2 / 2^(64/(radius+1)) / 2`` popcounts:
at 100k photos and radius 10, ~1e9 XOR+popcounts, measured 9 s on one core of a shared 2-core
machine (100k random 64-bit hashes; prepare itself needs hours of decoding for 100k photos);
memory stays O(n + block^2). Identical hashes are linked directly, so bursts of identical
frames do not make one giant bucket.
"""
from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path
from typing import Iterator, Mapping, Sequence

# Imported here, not in the worker: prepare's workers fork from a parent that already has it (and
# scipy) loaded, instead of each paying ~1 s to import them.
import imagehash
import numpy as np
from PIL import Image

from riskva_core.data.samples import SPLITS
from riskva_core.errors import RiskvaError
from riskva_core.data.split import split_of

DEFAULT_RADIUS = 10
HASH_BITS = 64
MAX_RADIUS = 31  # beyond half the bits "near" means nothing
_HASH_SIDE = 128
_BLOCK = 1024  # hashes compared at once inside one bucket: memory ~ _BLOCK^2 * 9 bytes


def perceptual_hash(img: Image.Image) -> str:
    """pHash of a decoded image as 16 hex digits (imagehash's ``str``).

    The picture is first box-reduced by an integer factor to about ``_HASH_SIDE`` px (``Image.reduce``,
    ~1 ms): pHash only looks at a 32x32 thumbnail, and its Lanczos resize from a full 1024 px picture
    cost more than the rest of the hash. Deterministic, so the same photo always gets the same hash.
    """
    factor = max(1, min(img.size) // _HASH_SIDE)
    return str(imagehash.phash(img.reduce(factor) if factor > 1 else img))


def hash_array(hashes: Sequence[str]) -> np.ndarray:
    return np.array([int(h, 16) for h in hashes], dtype=np.uint64)


def _chunks(radius: int) -> list[tuple[int, int]]:
    """``radius + 1`` disjoint (shift, width) bit ranges covering 64 bits."""
    m = radius + 1
    widths = [HASH_BITS // m + (1 if i < HASH_BITS % m else 0) for i in range(m)]
    shifts = np.cumsum([0, *widths[:-1]])
    return [(int(s), w) for s, w in zip(shifts, widths)]


def near_pairs(hashes: np.ndarray, radius: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Index pairs (i < j) whose hashes differ in at most ``radius`` bits, as array batches.

    A pair may come out more than once (it can share several chunks); callers only link.
    """
    n = len(hashes)
    if n < 2:
        return
    for shift, width in _chunks(radius):
        key = (hashes >> np.uint64(shift)) & np.uint64((1 << width) - 1)
        order = np.argsort(key, kind="stable")
        sorted_key = key[order]
        bounds = np.flatnonzero(np.diff(sorted_key)) + 1
        for members in np.split(order, bounds):
            if len(members) < 2:
                continue
            members = np.sort(members)
            h = hashes[members]
            for s in range(0, len(members), _BLOCK):
                for t in range(s, len(members), _BLOCK):
                    dist = np.bitwise_count(h[s:s + _BLOCK, None] ^ h[None, t:t + _BLOCK])
                    a, b = np.nonzero(dist <= radius)
                    if t == s:  # the diagonal block: upper triangle only
                        keep = b > a
                        a, b = a[keep], b[keep]
                    if len(a):
                        yield members[s + a], members[t + b]


def components(n: int, links: Sequence[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Component label per index (0..k-1) of the graph with edges ``links``."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if not links:
        return np.arange(n)
    rows = np.concatenate([a for a, _ in links])
    cols = np.concatenate([b for _, b in links])
    graph = coo_matrix((np.ones(len(rows), dtype=np.int8), (rows, cols)), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def _same_key_links(keys: Sequence[str | None]) -> tuple[np.ndarray, np.ndarray]:
    first: dict[str, int] = {}
    a, b = [], []
    for i, k in enumerate(keys):
        if k:
            j = first.setdefault(k, i)
            if j != i:
                a.append(j)
                b.append(i)
    return np.array(a, dtype=np.int64), np.array(b, dtype=np.int64)


@dataclasses.dataclass
class SplitPlan:
    splits: list[str | None]  # per row; None = kept out of every split (see ``excluded``)
    groups: list[int]  # per row: group label
    excluded: dict[int, str]  # row index → reason
    radius: int

    def group_counts(self) -> dict[str, int]:
        """Distinct groups per split (a group lives in one split, except recorded history)."""
        seen = {s: set() for s in SPLITS}
        for g, s in zip(self.groups, self.splits):
            if s is not None:
                seen[s].add(g)
        return {s: len(v) for s, v in seen.items()}

    def multi_photo_groups(self) -> int:
        return sum(1 for c in Counter(self.groups).values() if c > 1)


def plan_splits(
    shas: Sequence[str],
    phashes: Sequence[str | None],
    val_ratio: float,
    test_ratio: float,
    seed: int,
    radius: int = DEFAULT_RADIUS,
    group_keys: Sequence[str | None] | None = None,
    history: Mapping[str, str] | None = None,
) -> SplitPlan:
    """Split per row (see the module docstring); rows are photos, ``shas`` their content hashes."""
    n = len(shas)
    if len(phashes) != n or (group_keys is not None and len(group_keys) != n):
        raise ValueError("shas, phashes and group_keys must have the same length")
    if not 0 <= radius <= MAX_RADIUS:
        raise ValueError(f"near-duplicate radius must be within 0..{MAX_RADIUS} bits, got {radius}")
    history = history or {}
    links: list[tuple[np.ndarray, np.ndarray]] = [_same_key_links(shas)]
    if group_keys is not None:
        links.append(_same_key_links(group_keys))
    # Identical pHashes are linked directly and searched once: a burst of identical frames (or
    # blank photos) would otherwise make one huge bucket of all-pairs matches.
    links.append(_same_key_links(phashes))
    first: dict[str, int] = {}
    for i, p in enumerate(phashes):
        if p:
            first.setdefault(p, i)
    if first:
        idx = np.array(list(first.values()), dtype=np.int64)
        links += [(idx[a], idx[b]) for a, b in near_pairs(hash_array(list(first)), radius)]
    labels = components(n, [(a, b) for a, b in links if len(a)])
    members: dict[int, list[int]] = {}
    for i, g in enumerate(labels.tolist()):
        members.setdefault(g, []).append(i)
    splits: list[str | None] = [None] * n
    excluded: dict[int, str] = {}
    for rows in members.values():
        recorded = {i: history[shas[i]] for i in rows if shas[i] in history}
        kinds = set(recorded.values())
        if not kinds:
            target = split_of(min(shas[i] for i in rows), val_ratio, test_ratio, seed)
            for i in rows:
                splits[i] = target
        elif len(kinds) == 1:
            (target,) = kinds
            for i in rows:
                splits[i] = target
        else:
            where = ", ".join(f"{s} ({sum(1 for v in recorded.values() if v == s)} photos)"
                              for s in SPLITS if s in kinds)
            for i in rows:
                if i in recorded:
                    splits[i] = recorded[i]
                else:
                    excluded[i] = (f"near-duplicate of photos already in different splits ({where}); "
                                   "kept out of every split so no split sees another's photos")
    return SplitPlan(splits=splits, groups=labels.tolist(), excluded=excluded, radius=radius)


def split_leaks(rows: Sequence[Mapping[str, object]], radius: int, limit: int = 20) -> list[dict[str, object]]:
    """Val/test photos within ``radius`` bits of a train photo (rows: ``split``, ``phash``, ``image_path``).

    The asset check's verdict: an empty list means no held-out photo has a train near-duplicate.
    """
    hashed = [r for r in rows if r.get("phash") and r.get("split") in SPLITS]
    if len(hashed) < 2:
        return []
    hashes = hash_array([str(r["phash"]) for r in hashed])
    found: list[dict[str, object]] = []
    seen: set[tuple[int, int]] = set()
    for a, b in near_pairs(hashes, radius):
        for i, j in zip(a.tolist(), b.tolist()):
            si, sj = hashed[i]["split"], hashed[j]["split"]
            if (si == "train") == (sj == "train") or (i, j) in seen:
                continue
            seen.add((i, j))
            held, train = (i, j) if sj == "train" else (j, i)
            found.append({"held_out": hashed[held].get("image_path"), "split": hashed[held]["split"],
                          "train": hashed[train].get("image_path"),
                          "distance": int(np.bitwise_count(hashes[i] ^ hashes[j]))})
            if len(found) >= limit:
                return found
    return found


def load_history(paths: Sequence[str | Path], flag: str = "--previous_split") -> dict[str, str]:
    """Content hash → split recorded by earlier versions' split.json (a prepared folder or the file).

    The first version listed that holds a photo wins (list the oldest first). Rows written
    before split.json recorded content hashes carry no usable history and are skipped.
    """
    history: dict[str, str] = {}
    for p in paths:
        path = Path(p)
        path = path / "split.json" if path.is_dir() else path
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            rows = data["rows"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError):
            raise RiskvaError(f"{flag} {p}: not a prepared folder or a readable split.json") from None
        for r in rows:
            sha, split = r.get("image_sha256"), r.get("split")
            if sha and split in SPLITS:
                history.setdefault(sha, split)
    return history
