"""Model directories with a real checkpoint's SHAPES and no weights: for checks that read only a model's files.

``shaped_model(family, dst)`` writes the tiny model of ``family`` (its tokenizer, chat template and image
processor are the real families'), then replaces its ``config.json`` with the dimensions of the recipe's model
(Qwen2.5-VL-7B-Instruct, Qwen3-VL-8B-Instruct: the numbers of their public ``config.json`` and the
image processor's pixel bounds) and its weights
with one sparse ``model.safetensors``: a real header naming every tensor the architecture has at those
dimensions (built on the meta device), and a file of the full size that holds no data on disk. Reading its
header is what ``ivgr-dist preflight`` does; loading it would give zeros.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

RECIPE_DIMS = {
    "qwen2_5_vl": {
        "pixels": {"shortest_edge": 3136, "longest_edge": 12845056},
        "text": dict(
            hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
            intermediate_size=18944, vocab_size=152064, max_position_embeddings=128000,
        ),
        "vision": dict(
            depth=32, hidden_size=1280, intermediate_size=3420, out_hidden_size=3584, num_heads=16,
            fullatt_block_indexes=[7, 15, 23, 31],
        ),
    },
    "qwen3_vl": {
        "pixels": {"shortest_edge": 65536, "longest_edge": 16777216},
        "text": dict(
            hidden_size=4096, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
            intermediate_size=12288, vocab_size=151936, max_position_embeddings=262144,
        ),
        "vision": dict(
            depth=27, hidden_size=1152, intermediate_size=4304, out_hidden_size=4096, num_heads=16,
            deepstack_visual_indexes=[8, 16, 24],
        ),
    },
}  # fmt: skip


def shaped_model(family: str, dst: Path) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    from ivgr_dist.config import TinyModelConfig
    from ivgr_dist.models.tiny import make_tiny_model

    make_tiny_model(dst, TinyModelConfig(family=family))
    conf = json.loads((dst / "config.json").read_text())
    dims = RECIPE_DIMS[family]
    text = conf.get("text_config")
    for k, v in dims["text"].items():
        if text is not None:
            text[k] = v
        if k in conf or text is None:
            conf[k] = v
    for c in (conf, text or {}):
        c.pop("layer_types", None)  # per-layer attention kinds of the tiny depth: rebuilt for the real depth
    conf.setdefault("vision_config", {}).update(dims["vision"])
    (dst / "config.json").write_text(json.dumps(conf, indent=2))
    proc = json.loads((dst / "processor_config.json").read_text())
    image = proc.get("image_processor", proc)
    image["size"] = dict(dims["pixels"])  # the real processor's pixel bounds (the tiny one's are small)
    for k in ("min_pixels", "max_pixels"):
        image.pop(k, None)
    (dst / "processor_config.json").write_text(json.dumps(proc, indent=2))
    (dst / "ivgr_tiny.json").unlink(missing_ok=True)  # not a tiny model any more
    config = AutoConfig.from_pretrained(dst)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
    header, offset = {}, 0
    for name, t in model.state_dict().items():
        size = math.prod(t.shape) * 2
        header[name] = {"dtype": "BF16", "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path = dst / "model.safetensors"
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        f.truncate(8 + len(blob) + offset)  # sparse: the size of the weights, none of their bytes
    return dst
