"""Photos of one defect form one group; whole groups go to one split, stably across versions.

Inspectors photograph a defect several times and photos get re-exported, so the exact file
hash (split.py's unit) lets near-copies straddle train and test. A group here is a connected
component of three links:

- the same file content (sha256);
- perceptual hashes within ``radius`` bits. Each photo has a family of three 64-bit pHashes
  (imagehash's: DCT of a 32x32 grey thumbnail, robust to re-encoding, resizing and brightness):
  the full frame and its central 95 % and 90 % crops (``CROP_SCALES``), stored as one string
  ``full-c95-c90`` (split.json's ``phash``). Two photos are near-duplicates when ANY hash of one
  lies within ``radius`` bits of ANY hash of the other, so a photo cropped or re-framed by a few
  percent meets the matching crop of its original, which one full-frame pHash misses. A one-hash
  string (split.json written before the families) is a family of the full frame alone.
  ``radius=0`` links identical hashes only;
- optionally, the same non-empty value in a grouping column of the CSV (site, inspection id),
  named with ``--group_column``.

Default radius ``DEFAULT_RADIUS`` = 8 bits, measured by ``benchmarks/bench_groups.py`` (riskva_core.synth
photos, 512x384, hashed as prepare hashes them; bursts: 80 defects photographed 4 times, re-encoded
JPEG q75, 90 % size, +8 % brightness, centred 3 % crop saved as PNG; straddling summed over 20 split
seeds at val = test = 0.15; false merges: 1500 distinct photos; off-centre: the original against its
crop of 3 % / 5 % from one corner):

===========  ======  =============  ==========  =================  =============  ==================
hashes       radius  defects split  straddling  distinct grouped   largest false  off-centre missed
                     apart (of 80)  (20 seeds)  (false merges)     group          3 % / 5 % (of 80)
===========  ======  =============  ==========  =================  =============  ==================
full frame   10      0              0           8.2 %              10             7 / 42
family       6       0              0           4.3 %              9              8 / 49
family       8       0              0           8.1 %              13             0 / 24
family       10      0              0           15.9 %             27             0 / 10
===========  ======  =============  ==========  =================  =============  ==================

So the family at 8 bits merges distinct photos no more often than the old single hash at 10,
and also joins every 3 % off-centre crop. A false merge only puts two unrelated photos in one
split (no leak); a miss can put a photo's twin in the test split. Synthetic walls look alike at
pHash's resolution, so real photos merge less. Not caught: crops of 5 % or more off-centre (24 of
80 missed), which need ``--group_column``. Groups past ``GROUP_WARN_PHOTOS`` photos and splits more
than ``RATIO_DRIFT_WARN`` from their requested share are warned about (logged, in split.json's
``warnings`` and dataset_info.json's ``near_duplicates.warnings``), not refused: chaining is not
bounded, because cutting a group would put near-duplicates in two splits.

Split of a group (``plan_splits``):

1. Members recorded in an earlier version's split (``history``: content hash → split and hash
   family) keep that split: no photo ever changes split.
2. A group with history in exactly one split: its new photos join that split. Recorded photos
   missing from this CSV count too (they join the graph by their hash family): a near duplicate
   of an earlier version's train photo never lands in val/test because that photo was dropped.
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
a family triples n. bench_groups.py: 5000 photos' families grouped in 0.2 s (100k: 27 s), hashing (decode,
fit, 3 pHashes) 23 ms per photo and core, of which the two crop hashes add under 1 ms;
memory stays O(n + block^2). Identical hashes are linked directly, so bursts of identical
frames do not make one giant bucket.
"""
from __future__ import annotations

import dataclasses
import json
import logging
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

log = logging.getLogger(__name__)

DEFAULT_RADIUS = 8
CROP_SCALES = (0.95, 0.90)  # central crops hashed besides the full frame (module docstring)
FAMILY_SEP = "-"
HASH_BITS = 64
MAX_RADIUS = 31  # beyond half the bits "near" means nothing
# A defect is photographed a handful of times; at the default radius 1500 distinct synthetic photos
# chain into groups of at most 13 (bench_groups.py). A larger group is chaining through a long run of
# similar frames, a grouping column that spans much of the data, or many identical (blank) photos.
GROUP_WARN_PHOTOS = 30
RATIO_DRIFT_WARN = 0.05  # a split's share of photos this far (5 points) from the requested ratio
_HASH_SIDE = 128
_BLOCK = 1024  # hashes compared at once inside one bucket: memory ~ _BLOCK^2 * 9 bytes


def perceptual_hash(img: Image.Image) -> str:
    """The photo's pHash family: full frame, then each ``CROP_SCALES`` central crop, 16 hex digits each.

    The picture is first box-reduced by an integer factor to about ``_HASH_SIDE`` px (``Image.reduce``,
    ~1 ms): pHash only looks at a 32x32 thumbnail, and its Lanczos resize from a full 1024 px picture
    cost more than the rest of the hash. The full-frame hash is computed exactly as before the
    families, so earlier versions' one-hash split.json rows still meet it. Crops are taken with a
    sub-pixel box in the same resize that makes pHash's 32x32 thumbnail. Deterministic.
    """
    factor = max(1, min(img.size) // _HASH_SIDE)
    small = img.reduce(factor) if factor > 1 else img
    w, h = small.size
    grey = small.convert("L")
    family = [str(imagehash.phash(small))]
    for scale in CROP_SCALES:
        dx, dy = w * (1 - scale) / 2, h * (1 - scale) / 2
        thumb = grey.resize((32, 32), Image.Resampling.LANCZOS, box=(dx, dy, w - dx, h - dy))
        family.append(str(imagehash.phash(thumb)))  # already 32x32: phash's own resize keeps it
    return FAMILY_SEP.join(family)


def hash_array(hashes: Sequence[str]) -> np.ndarray:
    return np.array([int(h, 16) for h in hashes], dtype=np.uint64)


def _flatten(families: Sequence[str | None]) -> tuple[list[str], np.ndarray]:
    """Every hash of every family, and the index of the family (photo) it belongs to."""
    values: list[str] = []
    owners: list[int] = []
    for i, fam in enumerate(families):
        for h in fam.split(FAMILY_SEP) if fam else ():
            values.append(h)
            owners.append(i)
    return values, np.array(owners, dtype=np.int64)


def family_links(families: Sequence[str | None], radius: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Links (arrays of photo indices) between photos with any two hashes within ``radius`` bits.

    Identical hashes are linked directly and searched once: a burst of identical frames (or blank
    photos) would otherwise make one huge bucket of all-pairs matches.
    """
    values, owners = _flatten(families)
    a, b = _same_key_links(values)
    links = [(owners[a], owners[b])]
    first: dict[str, int] = {}
    for v, o in zip(values, owners.tolist()):
        first.setdefault(v, o)
    if first:
        idx = np.array(list(first.values()), dtype=np.int64)
        links += [(idx[x], idx[y]) for x, y in near_pairs(hash_array(list(first)), radius)]
    return [(x, y) for x, y in links if len(x)]


def family_distance(a: str, b: str) -> int:
    """Smallest Hamming distance between any hash of family ``a`` and any of family ``b``."""
    ha, hb = hash_array(a.split(FAMILY_SEP)), hash_array(b.split(FAMILY_SEP))
    return int(np.bitwise_count(ha[:, None] ^ hb[None, :]).min())


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


@dataclasses.dataclass(frozen=True)
class Recorded:
    """What an earlier version's split.json says of one photo (by content hash)."""
    split: str
    phash: str | None = None  # its hash family; None in split.json written before pHashes


@dataclasses.dataclass
class SplitPlan:
    splits: list[str | None]  # per row; None = kept out of every split (see ``excluded``)
    groups: list[int]  # per row: group label
    excluded: dict[int, str]  # row index → reason
    radius: int
    warnings: list[str] = dataclasses.field(default_factory=list)  # also logged; see ``_warnings``

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
    history: Mapping[str, Recorded] | None = None,
    names: Sequence[str] | None = None,
) -> SplitPlan:
    """Split per row (see the module docstring); rows are photos, ``shas`` their content hashes.

    Earlier versions' photos missing from this CSV still anchor groups: each recorded photo with
    a hash family joins the graph as a node without a row, so a near duplicate of an old train
    photo joins train (or is kept out when its group also holds recorded val/test photos).
    ``names`` (e.g. image paths) only name photos in warnings.
    """
    n = len(shas)
    if len(phashes) != n or (group_keys is not None and len(group_keys) != n):
        raise ValueError("shas, phashes and group_keys must have the same length")
    if not 0 <= radius <= MAX_RADIUS:
        raise ValueError(f"near-duplicate radius must be within 0..{MAX_RADIUS} bits, got {radius}")
    history = history or {}
    present = set(shas)
    absent = [r for sha, r in history.items() if sha not in present and r.phash]
    links: list[tuple[np.ndarray, np.ndarray]] = [_same_key_links(shas)]
    if group_keys is not None:
        links.append(_same_key_links(group_keys))
    links += family_links([*phashes, *(r.phash for r in absent)], radius)
    labels = components(n + len(absent), [(a, b) for a, b in links if len(a)])
    members: dict[int, list[int]] = {}
    for i, g in enumerate(labels.tolist()):
        members.setdefault(g, []).append(i)
    splits: list[str | None] = [None] * n
    excluded: dict[int, str] = {}
    for nodes in members.values():
        rows = [i for i in nodes if i < n]
        # a recorded photo missing from this CSV: node n + k, with no row of its own
        recorded = {i: (history[shas[i]] if i < n else absent[i - n]).split
                    for i in nodes if i >= n or shas[i] in history}
        kinds = set(recorded.values())
        if not rows:
            continue
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
    plan = SplitPlan(splits=splits, groups=labels[:n].tolist(), excluded=excluded, radius=radius)
    plan.warnings = _warnings(plan, val_ratio, test_ratio, names)
    for w in plan.warnings:
        log.warning("%s", w)
    return plan


def _warnings(plan: SplitPlan, val_ratio: float, test_ratio: float, names: Sequence[str] | None) -> list[str]:
    """Groups past ``GROUP_WARN_PHOTOS`` photos, and splits whose share drifts past ``RATIO_DRIFT_WARN``.

    Neither is refused: a big group may be right (one site, many blank frames), and a small dataset
    cannot meet its ratios; both are said so that a reader of the split report can judge.
    """
    out: list[str] = []
    sizes = Counter(plan.groups)
    for g, size in sorted(sizes.items(), key=lambda kv: -kv[1]):
        if size <= GROUP_WARN_PHOTOS:
            break
        rows = [i for i, x in enumerate(plan.groups) if x == g]
        shown = ", ".join(names[i] if names is not None else f"row {i}" for i in rows[:3])
        out.append(f"near-duplicate group of {size} photos (over {GROUP_WARN_PHOTOS}: chaining of similar photos, "
                   f"a broad --group_column, or many identical frames?), e.g. {shown}; it all goes to one split")
    kept = [s for s in plan.splits if s is not None]
    if kept:
        want = dict(zip(SPLITS, (1.0 - val_ratio - test_ratio, val_ratio, test_ratio)))
        for s in SPLITS:
            got = sum(1 for x in kept if x == s)
            if abs(got / len(kept) - want[s]) > RATIO_DRIFT_WARN:
                out.append(f"{s} split holds {got} of {len(kept)} photos ({got / len(kept):.1%}), requested "
                           f"{want[s]:.1%}: more than {RATIO_DRIFT_WARN * 100:.0f} points off (whole groups and "
                           "earlier versions' splits are kept; a small dataset cannot meet its ratios)")
    return out


def split_leaks(rows: Sequence[Mapping[str, object]], radius: int, limit: int = 20) -> list[dict[str, object]]:
    """Val/test photos within ``radius`` bits of a train photo (rows: ``split``, ``phash``, ``image_path``).

    The asset check's verdict: an empty list means no held-out photo has a train near-duplicate.
    """
    hashed = [r for r in rows if r.get("phash") and r.get("split") in SPLITS]
    if len(hashed) < 2:
        return []
    found: list[dict[str, object]] = []
    seen: set[tuple[int, int]] = set()
    for a, b in family_links([str(r["phash"]) for r in hashed], radius):
        for i, j in zip(a.tolist(), b.tolist()):
            i, j = min(i, j), max(i, j)
            si, sj = hashed[i]["split"], hashed[j]["split"]
            if (si == "train") == (sj == "train") or (i, j) in seen:
                continue
            seen.add((i, j))
            held, train = (i, j) if sj == "train" else (j, i)
            found.append({"held_out": hashed[held].get("image_path"), "split": hashed[held]["split"],
                          "train": hashed[train].get("image_path"),
                          "distance": family_distance(str(hashed[i]["phash"]), str(hashed[j]["phash"]))})
            if len(found) >= limit:
                return found
    return found


def load_history(paths: Sequence[str | Path], flag: str = "--previous_split") -> dict[str, Recorded]:
    """Content hash → split and hash family recorded by earlier versions' split.json (a prepared
    folder or the file).

    The first version listed that holds a photo wins (list the oldest first). Rows written
    before split.json recorded content hashes carry no usable history and are skipped.
    """
    history: dict[str, Recorded] = {}
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
                history.setdefault(sha, Recorded(split, r.get("phash") or None))
    return history


def recorded_groups(dataset: str | Path) -> dict[str, str]:
    """Sample id → near-duplicate group, as prepare recorded it in split.json.

    ``dataset``: a prepared folder or one of its split files. Evaluation carries the group on every
    record so that its intervals resample whole groups. Empty when the folder has no split.json
    (a folder not written by prepare): each photo is then its own group.
    """
    path = Path(dataset)
    path = (path if path.is_dir() else path.parent) / "split.json"
    if not path.is_file():
        return {}
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))["rows"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        raise RiskvaError(f"{path}: not a readable split.json (prepare the dataset again)") from None
    return {str(r["id"]): str(r["group"]) for r in rows if r.get("id") is not None and r.get("group") is not None}
