"""Collator: chat template + processor, assistant-only labels, over-long drop, JSONL == Parquet."""
from __future__ import annotations

import os
import pickle

import pytest
import torch

from model_fixtures import make_parquet_twin, make_prepared_dataset, make_tiny_model
from riskva_core.train.collate import IGNORE_INDEX, ChatTokens, Collator, SFTDataset, assistant_labels
from riskva_core.data.conversation import PromptTemplate
from riskva_core.model.loading import load_processor
from riskva_core.data.samples import read_samples

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("collate")
    data = make_prepared_dataset(root / "data", 10)
    model = make_tiny_model(root / "model", data)
    processor = load_processor(model, min_pixels=28 * 28, max_pixels=56 * 56)
    return root, data, processor


def test_labels_are_exactly_the_answer_and_its_im_end(env):
    _, data, processor = env
    samples = read_samples(data, "train")
    ds = SFTDataset(samples, processor, max_length=4096)
    tok = processor.tokenizer
    for i in range(3):
        item = ds[i]
        kept = item["labels"][item["labels"] != IGNORE_INDEX]
        assert tok.decode(kept) == samples[i].answer + "<|im_end|>"
        # the kept tokens are one contiguous span that ends the sequence but for the final "\n"
        idx = (item["labels"] != IGNORE_INDEX).nonzero().flatten()
        assert idx.tolist() == list(range(idx[0].item(), idx[-1].item() + 1))
        assert torch.equal(item["labels"][idx], item["input_ids"][idx])


def test_only_assistant_turns_are_unmasked_in_a_multi_turn_conversation(env):
    _, _, processor = env
    tok = processor.tokenizer
    msgs = [
        {"role": "system", "content": [{"type": "text", "text": "系统"}]},
        {"role": "user", "content": [{"type": "text", "text": "问一"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "答一"}]},
        {"role": "user", "content": [{"type": "text", "text": "问二 assistant"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "答二"}]},
    ]
    ids = tok(processor.apply_chat_template(msgs, tokenize=False), add_special_tokens=False)["input_ids"]
    labels = assistant_labels(ids, ChatTokens.from_tokenizer(tok))
    kept = [t for t in labels if t != IGNORE_INDEX]
    assert tok.decode(kept) == "答一<|im_end|>答二<|im_end|>"


def test_predicted_length_matches_processor_and_long_samples_are_dropped(env):
    _, data, processor = env
    samples = read_samples(data, "train")
    ds = SFTDataset(samples, processor, max_length=4096)
    assert not ds.dropped
    lengths = [len(ds[i]["input_ids"]) for i in range(len(ds))]
    assert lengths == ds.lengths
    cut = max(lengths) - 1
    short = SFTDataset(samples, processor, max_length=cut)
    assert len(short) + len(short.dropped) == len(samples)
    assert short.dropped and all(n > cut for _, n in short.dropped)
    assert all(len(short[i]["input_ids"]) <= cut for i in range(len(short)))


def test_prompt_config_rebuilds_the_conversation(env, tmp_path):
    _, data, processor = env
    samples = read_samples(data, "train")[:1]
    template = PromptTemplate(system_prompt="简短系统提示", instruction="说明缺陷")
    ds = SFTDataset(samples, processor, max_length=4096, template=template)
    text = processor.tokenizer.decode(ds[0]["input_ids"])
    assert "简短系统提示" in text and "说明缺陷" in text


def test_batch_padding_and_parquet_gives_the_same_first_batch(env):
    root, data, processor = env
    pq_dir = make_parquet_twin(data, root / "parquet")
    collate = Collator(pad_id=processor.tokenizer.pad_token_id)
    batches, datasets = [], []
    for folder, lazy in ((data, False), (pq_dir, False), (pq_dir, True)):
        ds = SFTDataset(read_samples(folder, "train", lazy_images=lazy), processor, max_length=4096)
        datasets.append(ds)
        batches.append(collate([ds[0], ds[1], ds[2]]))
    a = batches[0]
    for b in batches[1:]:
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k
    # The lazy Parquet dataset (what training uses) holds row positions, never image bytes.
    eager, lazy = datasets[1:]
    assert all(s.image_bytes for s in eager.samples) and lazy.lengths == eager.lengths
    assert all(s.image_bytes is None and s.image_ref is not None for s in lazy.samples)
    held = len(pickle.dumps(lazy.samples))
    assert held < len(pickle.dumps(eager.samples)) - sum(len(s.image_bytes) for s in eager.samples) + 1000
    n = a["attention_mask"].sum(1)
    assert a["input_ids"].shape[1] == int(n.max())
    short = int(n.argmin())
    assert (a["labels"][short, int(n[short]):] == IGNORE_INDEX).all()
    assert (a["input_ids"][short, int(n[short]):] == processor.tokenizer.pad_token_id).all()
    assert a["pixel_values"].shape[0] == int(a["image_grid_thw"].prod(1).sum())


def test_flip_augmentation_is_a_fixed_function_of_seed_epoch_and_index(env):
    from PIL import Image

    _, data, processor = env
    samples = read_samples(data, "train")
    plain = SFTDataset(samples, processor, max_length=4096)
    aug = SFTDataset(samples, processor, max_length=4096, flip_seed=7)
    again = SFTDataset(samples, processor, max_length=4096, flip_seed=7)
    image = samples[0].load_image()
    flips = {Image.Transpose.FLIP_LEFT_RIGHT, Image.Transpose.FLIP_TOP_BOTTOM}
    allowed = {image.tobytes(), image.transpose(Image.Transpose.ROTATE_180).tobytes()}
    allowed |= {image.transpose(f).tobytes() for f in flips}
    views = {}
    for epoch in range(8):
        aug.epoch = again.epoch = epoch
        out = aug.augment(image, 0)
        assert out.tobytes() == again.augment(image, 0).tobytes()  # replayable, e.g. after resume
        assert out.size == image.size  # token counts, hence sample_length, are unchanged
        assert out.tobytes() in allowed
        views[epoch] = out.tobytes()
    assert len(set(views.values())) >= 3  # epochs see different views
    assert plain.augment(image, 0) is image  # off by default
    # The batch item carries the flipped pixels and the very same tokens and labels.
    aug.epoch = next(e for e, view in views.items() if view != image.tobytes())
    a, p = aug[0], plain[0]
    assert torch.equal(a["input_ids"], p["input_ids"]) and torch.equal(a["labels"], p["labels"])
    assert not torch.equal(a["pixel_values"], p["pixel_values"])
