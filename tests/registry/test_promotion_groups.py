"""The split's near-duplicate groups reach the promotion rule (issue 25): prepare records them in
split.json, evaluation's inputs carry them onto every record, and compare resamples whole groups."""
from __future__ import annotations

import json

import numpy as np
from conftest import row, textured_image
from image_fixtures import burst

from riskva_core.data.groups import recorded_groups
from riskva_core.data.prepare import PrepareConfig, prepare
from riskva_core.evaluate.inputs import sample_items
from riskva_core.registry import promotion

DEFECTS = 24


def test_groups_recorded_by_prepare_reach_compare(make_raw_dataset, tmp_path):
    rows, images = [], {}
    for d in range(DEFECTS):
        for k, (ext, data) in enumerate(burst(textured_image(d, (160, 120)))):  # 4 near-duplicates
            path = f"images/defect{d:03d}_{k}.{ext}"
            images[path] = data
            rows.append(row(d, image_path=path, image_id=f"d{d:03d}_{k}"))
    raw = make_raw_dataset(rows, images=images)
    out = tmp_path / "prepared"
    prepare(PrepareConfig(csv_path=raw.csv_path, image_base_path=raw.root, output_path=out, format="jsonl",
                          val_ratio=0.0, test_ratio=0.5, num_workers=1, max_image_size=(128, 128)))
    items = sample_items(out, "test")
    assert len(items) >= 8
    # Every photo of one defect carries the same group, and different defects different groups.
    by_defect = {}
    for it in items:
        by_defect.setdefault(it.image_id[:4], set()).add(it.group)
    assert all(len(g) == 1 and None not in g for g in by_defect.values())
    assert len({next(iter(g)) for g in by_defect.values()}) == len(by_defect)
    assert recorded_groups(out / "test.jsonl") == recorded_groups(out)  # a split file finds its folder

    # Records as evaluation writes them (infer's: id, parsed, ground_truth, group): the challenger
    # misses every photo of every other defect; the champion answers all.
    gold = {it.id: it.ground_truth["风险等级"] for it in items}
    defects = sorted(by_defect)
    wrong = {it.id for it in items if defects.index(it.image_id[:4]) % 2}
    miss = {"轻微": "严重", "中等": "严重", "严重": "轻微"}
    chal = [{"id": it.id, "ground_truth": {"风险等级": gold[it.id]}, "group": it.group,
             "parsed": {"风险等级": miss[gold[it.id]] if it.id in wrong else gold[it.id]}} for it in items]
    champ = [{"id": it.id, "ground_truth": {"风险等级": gold[it.id]}, "parsed": {"风险等级": gold[it.id]}}
             for it in items]
    cmp = promotion.compare(chal, champ)
    acc = cmp["level_accuracy"]
    assert acc["n"] == len(items) and acc["n_groups"] == len(by_defect) and acc["ungrouped"] == 0
    assert acc["design_effect"] > 2  # whole defects are right or wrong together
    # compare is paired_evidence on the records' differences and groups: what the simulation runs
    diffs = np.array([-1.0 if r["id"] in wrong else 0.0 for r in sorted(chal, key=lambda r: r["id"])])
    groups = [r["group"] for r in sorted(chal, key=lambda r: r["id"])]
    same = promotion.paired_evidence(diffs, groups, promotion.Thresholds())[0]
    assert {k: same[k] for k in ("delta", "ci95", "n_groups")} == {k: acc[k] for k in ("delta", "ci95", "n_groups")}
    # Without the groups (records written before they were carried) the interval is too narrow.
    bare = promotion.compare([{k: v for k, v in r.items() if k != "group"} for r in chal], champ)
    assert bare["level_accuracy"]["ungrouped"] == len(items)
    assert (bare["level_accuracy"]["ci95"][1] - bare["level_accuracy"]["ci95"][0]) < (acc["ci95"][1] - acc["ci95"][0])
    d = promotion.decide({"parse_rate": 1.0, "risk_level": {"accuracy": 0.5}, "baselines": {}},
                         cmp, promotion.Thresholds(beat_majority_baseline=False), "1")
    assert f"over {len(by_defect)} near-duplicate groups of {len(items)} test photos" in d.reason
    assert json.loads(json.dumps(d.to_dict()))["comparisons"]["level_accuracy"]["n_groups"] == len(by_defect)


def test_an_unverifiable_merge_is_named_in_the_decision():
    report = {"parse_rate": 1.0, "risk_level": {"accuracy": 0.9}, "baselines": {"majority": {"accuracy": 0.4}}}
    plain = promotion.decide(report, None)
    flagged = promotion.decide(report, None, merge_verdict=promotion.MERGE_UNVERIFIABLE)
    assert flagged.outcome == plain.outcome == "promoted"
    assert "merge could not be verified" in flagged.reason and "evaluation of the merged model is the judge" in flagged.reason
    assert "merge" not in plain.reason and not plain.notes
    assert "merge" not in promotion.decide(report, None, merge_verdict="equivalent").reason
