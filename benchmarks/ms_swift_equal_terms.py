"""ms-swift 4.6.0 plugin for the matched RisKVA / ms-swift throughput comparison (issue 21).

Loaded by benchmarks/compare_ms_swift.sh with ``swift sft ... --external_plugins`` in ms-swift's own
venv; it changes nothing in the installed ms-swift, only two things of its Qwen2.5-VL template:

1. Image/video token ids from the model's own processor. ``Qwen2VLTemplate`` hard-codes the real
   Qwen vocabulary's ids (``image_token_id = 151655``, ``video_token_id = 151656``); the tiny model's
   tokenizer has its own (``<|image_pad|>`` = 2060 in ``riskva tiny-model --size small``). Unpatched,
   ms-swift finds no 151655 in the sequence and leaves ONE ``<|image_pad|>`` per sample instead of
   48 (its log shows ``<|vision_start|>[2060 * 1]<|vision_end|>``), i.e. it trains on a different,
   smaller sequence.

2. The final ``\\n`` after the last ``<|im_end|>`` is not a label. ms-swift's ChatML suffix is
   ``<|im_end|>\\n`` and it labels both tokens; RisKVA (and the model's own chat template + the
   official Qwen2.5-VL finetune) label the answer and ``<|im_end|>`` only. The input sequence is
   unchanged (the ``\\n`` stays in ``input_ids``), only its label becomes -100, so both frameworks
   compute the same loss over the same tokens. Set SWIFT_EQUAL_LABELS=0 to keep ms-swift's own
   labels (then the first-step loss is 7.452948 instead of RisKVA's 7.450398).
"""
import os

from swift.template.templates.qwen import Qwen2VLTemplate

_orig_init_env_args = Qwen2VLTemplate.init_env_args
_orig_encode = Qwen2VLTemplate._encode


def init_env_args(self):
    _orig_init_env_args(self)
    for key in ('image_token_id', 'video_token_id'):
        value = getattr(self.processor, key, None)
        if value is not None:
            setattr(self, key, int(value))


def _encode(self, inputs):
    encoded = _orig_encode(self, inputs)
    if os.environ.get('SWIFT_EQUAL_LABELS', '1') != '0' and self.is_training:
        labels = encoded.get('labels')
        tok = self.tokenizer
        im_end = tok.convert_tokens_to_ids('<|im_end|>')
        nl = tok.encode('\n', add_special_tokens=False)
        if labels and len(nl) == 1 and len(labels) >= 2 and labels[-1] == nl[0] and labels[-2] == im_end:
            labels[-1] = -100
            if encoded.get('loss_scale') is not None:
                encoded['loss_scale'][-1] = 0.
    return encoded


Qwen2VLTemplate.init_env_args = init_env_args
Qwen2VLTemplate._encode = _encode
