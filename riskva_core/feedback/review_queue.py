"""Which field photos an inspector sees first.

An inspector's time is the scarce resource, so the queue leads with the answers most likely to be
wrong, in this order:

1. parse failures: the model wrote nothing usable; the inspector writes the report;
2. drifted photos: outside the test split on a descriptor that drifted today (drift.py), where the
   model's confidence is least to be trusted;
3. low confidence: 风险等级 confidence below ``confidence_below``, least confident first (an
   answer without a measured confidence counts as 0: nothing says it is sure).

A queue of hard cases only would teach the next model a biased picture of the field (its
confident answers are never checked, and the data over-represents the odd photos), so
``random_share`` of the queue is drawn uniformly from every remaining photo, confident ones
included, with ``random.Random(seed)`` over the candidates sorted by hash: the same candidates and
seed give the same draw whatever their order, and the seed is recorded in the queue. The hard cases
take at most ``size - round(size * random_share)`` places; when there are fewer, the random draw
fills the queue up to ``size`` (the inspectors' capacity is the limit, not the mix).

Deduplication, with the project's own perceptual hash (data/groups.py: the pHash family of the
full frame and two central crops, near when any two hashes are within ``radius`` bits): a
candidate is skipped when its content hash or pHash family is near a photo of the train, val or
test split (it adds nothing, or would leak a test photo's twin into training) or a photo already
reviewed; of several near-identical candidates only the first in priority order is queued. Every
skipped photo is listed with its reason.
"""
from __future__ import annotations

import dataclasses
import io
import json
import random
from pathlib import Path
from typing import Any, Mapping, Sequence

from PIL import Image

from riskva_core import atomic
from riskva_core.data.groups import DEFAULT_RADIUS, family_links, perceptual_hash
from riskva_core.data.images import HASH_BOX, decode_fitted
from riskva_core.errors import RiskvaError
from riskva_core.schema import FIELDS

PARSE_FAILURE, DRIFTED, LOW_CONFIDENCE, RANDOM = "parse_failure", "drifted", "low_confidence", "random"
_CLASS = {PARSE_FAILURE: 0, DRIFTED: 1, LOW_CONFIDENCE: 2}


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One answered field photo (a row of the inference log, with its pHash family)."""

    photo_sha256: str
    photo_path: str
    phash: str
    parse_ok: bool
    level_confidence: float | None
    drifted: bool = False
    trace_id: str = ""
    model_version: str = ""
    draft: Mapping[str, str] = dataclasses.field(default_factory=dict)  # the model's four fields

    @property
    def hard_reason(self) -> str | None:
        if not self.parse_ok:
            return PARSE_FAILURE
        if self.drifted:
            return DRIFTED
        return None


@dataclasses.dataclass(frozen=True)
class KnownPhoto:
    """A photo the queue must not repeat: in a split of the training data, or already reviewed."""

    sha256: str
    phash: str | None
    where: str  # "train", "val", "test" or "reviewed"


@dataclasses.dataclass(frozen=True)
class QueueConfig:
    size: int = 50
    random_share: float = 0.2
    seed: int = 0
    confidence_below: float = 0.9  # a parsed, undrifted answer at least this sure is not a hard case
    radius: int = DEFAULT_RADIUS

    def __post_init__(self) -> None:
        if self.size < 1 or not 0.0 <= self.random_share <= 1.0:
            raise RiskvaError(f"review queue: size must be >= 1 and random_share within [0, 1], got {self}")


@dataclasses.dataclass(frozen=True)
class QueueEntry:
    rank: int  # 0 = first to review
    reason: str  # parse_failure | drifted | low_confidence | random
    candidate: Candidate


@dataclasses.dataclass
class ReviewQueue:
    entries: list[QueueEntry]
    skipped: list[dict[str, str]]  # {photo_sha256, reason}
    config: QueueConfig

    def counts(self) -> dict[str, int]:
        out = {reason: 0 for reason in (*_CLASS, RANDOM)}
        for e in self.entries:
            out[e.reason] += 1
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"config": dataclasses.asdict(self.config), "counts": self.counts(), "skipped": self.skipped,
                "entries": [{"rank": e.rank, "reason": e.reason, **dataclasses.asdict(e.candidate),
                             "draft": dict(e.candidate.draft)} for e in self.entries]}


def priority(candidate: Candidate, confidence_below: float) -> tuple[int, float, str] | None:
    """Sort key of a hard case (lower first), None for a photo only the random share may pick."""
    reason = candidate.hard_reason
    confidence = candidate.level_confidence if candidate.level_confidence is not None else 0.0
    if reason is None:
        if confidence >= confidence_below:
            return None
        reason = LOW_CONFIDENCE
    return _CLASS[reason], confidence, candidate.photo_sha256


def photo_phash(data: bytes) -> str:
    """The pHash family exactly as prepare computes it (EXIF-oriented RGB fitted into HASH_BOX)."""
    return perceptual_hash(decode_fitted(Image.open(io.BytesIO(data)), HASH_BOX))


def build_review_queue(candidates: Sequence[Candidate], known: Sequence[KnownPhoto],
                       config: QueueConfig = QueueConfig()) -> ReviewQueue:
    skipped: list[dict[str, str]] = []
    known_sha = {k.sha256: k.where for k in known}
    unique: list[Candidate] = []
    seen: set[str] = set()
    for c in candidates:
        if c.photo_sha256 in seen:
            continue  # answered twice: one review covers both
        seen.add(c.photo_sha256)
        if c.photo_sha256 in known_sha:
            skipped.append({"photo_sha256": c.photo_sha256, "reason": f"the same photo is in {known_sha[c.photo_sha256]}"})
        else:
            unique.append(c)

    # Near-duplicates: one graph over the known photos (first) and the candidates.
    families = [k.phash for k in known] + [c.phash for c in unique]
    near: dict[int, set[int]] = {}
    for a, b in family_links(families, config.radius):
        for i, j in zip(a.tolist(), b.tolist()):
            near.setdefault(i, set()).add(j)
            near.setdefault(j, set()).add(i)
    offset = len(known)
    order = sorted(range(len(unique)), key=lambda i: priority(unique[i], config.confidence_below)
                   or (len(_CLASS), 1.0, unique[i].photo_sha256))
    eligible: list[int] = []
    kept: set[int] = set()
    for i in order:
        links = near.get(offset + i, set())
        hit = next((j for j in sorted(links) if j < offset), None)
        if hit is not None:
            skipped.append({"photo_sha256": unique[i].photo_sha256,
                            "reason": f"near-duplicate of a {known[hit].where} photo ({known[hit].sha256[:12]})"})
        elif links & kept:
            twin = unique[min(links & kept) - offset]
            skipped.append({"photo_sha256": unique[i].photo_sha256,
                            "reason": f"near-duplicate of a queued photo ({twin.photo_sha256[:12]})"})
        else:
            kept.add(offset + i)
            eligible.append(i)

    n_random = round(config.size * config.random_share)
    hard = [i for i in eligible if priority(unique[i], config.confidence_below) is not None][:config.size - n_random]
    chosen = set(hard)
    pool = sorted((i for i in eligible if i not in chosen), key=lambda i: unique[i].photo_sha256)
    drawn = random.Random(config.seed).sample(pool, min(len(pool), config.size - len(hard)))
    entries = [QueueEntry(rank, unique[i].hard_reason or LOW_CONFIDENCE, unique[i]) for rank, i in enumerate(hard)]
    entries += [QueueEntry(len(hard) + k, RANDOM, unique[i]) for k, i in enumerate(drawn)]
    return ReviewQueue(entries, skipped, config)


# --------------------------------------------------------------------------- inputs and outputs


def candidates_from_log(frame: Any, drifted: Sequence[bool] | None = None) -> list[Candidate]:
    """Inference-log rows whose photo was kept, hashed as prepare hashes; ``drifted`` aligned with them
    (drift.outlying_photos over the same rows)."""
    kept = frame[frame["photo_path"].astype(str) != ""].reset_index(drop=True)
    flags = list(drifted) if drifted is not None else [False] * len(kept)
    if len(flags) != len(kept):
        raise ValueError(f"{len(flags)} drift flags for {len(kept)} photos")
    out = []
    for row, flag in zip(kept.to_dict("records"), flags):
        conf = row.get("level_confidence")
        out.append(Candidate(
            photo_sha256=row["photo_sha256"], photo_path=row["photo_path"],
            phash=photo_phash(Path(row["photo_path"]).read_bytes()), parse_ok=bool(row["parse_ok"]),
            level_confidence=None if conf is None or conf != conf else float(conf), drifted=bool(flag),
            trace_id=row.get("trace_id", ""), model_version=str(row.get("model_version", "")),
            draft={f: str(row.get(f) or "") for f in FIELDS}))
    return out


def known_from_split(split_json: str | Path) -> list[KnownPhoto]:
    """The photos of a prepared folder's ``split.json`` (train, val and test)."""
    path = Path(split_json)
    path = path / "split.json" if path.is_dir() else path
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))["rows"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        raise RiskvaError(f"{path}: not a readable split.json (prepare the dataset again)") from None
    return [KnownPhoto(r["image_sha256"], r.get("phash") or None, r["split"])
            for r in rows if r.get("image_sha256") and r.get("split")]


def known_from_queues(paths: Sequence[str | Path]) -> list[KnownPhoto]:
    """Photos already sent for review by earlier queues (written by ``write_queue``)."""
    out = []
    for p in paths:
        for e in read_queue(p)["entries"]:
            out.append(KnownPhoto(e["photo_sha256"], e.get("phash") or None, "reviewed"))
    return out


def write_queue(queue: ReviewQueue, path: str | Path) -> None:
    atomic.write_json(path, queue.to_dict())


def read_queue(path: str | Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        data["entries"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        raise RiskvaError(f"{path}: not a readable review queue") from None
    return data

