"""SFT batches (ivgr_dist.commands.sft.SFTData): templated targets per stream, or a response column for real data."""

from __future__ import annotations

import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ivgr_dist.config import SyntheticConfig, load_config
from ivgr_dist.data.synthetic import make_synthetic


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("sftdata")
    make_synthetic(out, SyntheticConfig(), num_records=24)
    return out


def _sft_data(tiny_model_dir, files, *overrides):
    from ivgr_dist.commands.sft import SFTData
    from ivgr_dist.data.pipeline import build_pipeline

    cfg = load_config(
        None,
        [f"model.path={tiny_model_dir}", f"data.train_files=[{files}]", f"data.val_files=[{files}]", *overrides],
    )
    return SFTData(cfg, build_pipeline(cfg.model, cfg.data, "train", sampler=False))


def test_templated_batches_cover_both_streams_and_end_with_im_end(tiny_model_dir, data_dir):
    data = _sft_data(tiny_model_dir, data_dir / "train.parquet", "sft.batch_size=5")
    ids = data.next_ids()
    assert len(ids) == 5 and len(set(ids)) == 5
    paired = [i for i in ids if i in data.paired]
    pairs = [p for i in paired for p in data.pairs(i)]
    assert [p.stream for p, _ in pairs] == ["grounded", "textual"] * len(paired)
    target = data.encode(*pairs[0])
    assert target.response_ids[-1] == data.end_id == data.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert target.prompt is pairs[0][0] and target.advantage == 1.0
    text = data.tokenizer.decode(target.response_ids[:-1])
    assert text == pairs[0][1] and "<box>" in text
    # Epochs: 21 usable records, so 5 draws of 5 wrap into epoch 1 without losing any record.
    seen = set(ids)
    for _ in range(4):
        seen.update(data.next_ids())
    assert data.epoch == 1 and seen == set(data.ids.tolist())
    # A record's two streams share one image: a step's batch carries it once.
    batch = data.next_batch()
    keys = [k for ks in batch.prompt_images for k in ks]
    assert set(keys) == batch.images.keys() and len(keys) > len(batch.images)


def test_response_column_picks_the_stream_from_the_text(tiny_model_dir, data_dir, tmp_path):
    table = pq.read_table(data_dir / "train.parquet")
    rows = table.to_pylist()
    responses = []
    for k, r in enumerate(rows):
        if not r["target_instances"]:
            responses.append("<think>sum</think> <answer>" + r["answer"] + "</answer>")
        elif k % 2:
            responses.append("<think>the shape <box>[1,2,30,40]</box></think> <answer>" + r["answer"] + "</answer>")
        else:
            responses.append("<think>the shape</think> <answer>" + r["answer"] + "</answer>")
    table = table.append_column("response", pa.array(responses))
    (tmp_path / "images").symlink_to(data_dir / "images")
    pq.write_table(table, tmp_path / "train.parquet")
    data = _sft_data(tiny_model_dir, tmp_path / "train.parquet", "sft.response_column=response")
    for i in data.ids.tolist():
        ((prompt, text),) = data.pairs(i)
        assert text == responses[i]
        expected = "single" if i not in data.paired else ("grounded" if i % 2 else "textual")
        assert prompt.stream == expected

    missing = _sft_data(tiny_model_dir, tmp_path / "train.parquet", "sft.response_column=target")
    with pytest.raises(ValueError, match="sft.response_column='target': no such column"):
        missing.pairs(int(missing.ids[0]))


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_search_templates_cite_the_target_box_and_name_its_place(family, request, tmp_path):
    """The warm start's targets for the search task, through the real pipeline: the grounded one cites the
    target's box in the model's box space, the textual one the cell of the image the target is in."""
    from PIL import Image

    from ivgr_dist.config import SearchConfig
    from ivgr_dist.data.image import box_in_model_space
    from ivgr_dist.data.targets import region_words

    model = request.getfixturevalue("tiny_model_dir" if family == "qwen2_5_vl" else "tiny_qwen3_dir")
    cfg = SyntheticConfig(
        task="search",
        num_records=12,
        text_only_fraction=0.0,
        search=SearchConfig(ask=["color", "shape"], min_image_size=140, max_image_size=200),
    )
    make_synthetic(tmp_path, cfg, seed=2)
    data = _sft_data(model, tmp_path / "train.parquet", "data.synthetic.task=search", f"model.tiny.family={family}")
    assert data.box_coords == ("pixels" if family == "qwen2_5_vl" else "relative_1000")
    rows = pq.read_table(tmp_path / "train.parquet").to_pylist()
    for i in data.ids.tolist():
        row = rows[i]
        (target,) = row["target_instances"]
        color, shape = target["label"].split()
        with Image.open(tmp_path / row["images"][0]) as im:
            size = im.size
        grounded, textual = data.pairs(i)
        assert [grounded[0].stream, textual[0].stream] == ["grounded", "textual"]
        w, h = grounded[0].images[0].size  # resized: the original box times the resize factors, or 0-1000
        expected = box_in_model_space(target["bbox"], size, (w / size[0], h / size[1]), data.box_coords)
        assert grounded[0].target_boxes == [pytest.approx(expected)]
        cited = "[" + ",".join(str(round(v)) for v in expected) + "]"
        assert f"It is at <box>{cited}</box>: the {color} {shape}." in grounded[1]
        where = region_words(target["bbox"], *size)  # the original image and box give the same cell
        assert f"It is at the {where} of the image: the {color} {shape}." in textual[1]
        sought = f"the {shape}" if row["answer"] == color else f"the {color} object"
        for _, text in (grounded, textual):
            assert text.startswith(f"<think>I look for {sought}. ")
            assert text.endswith(f"The answer is {row['answer']}.</think> <answer>{row['answer']}</answer>")


def test_a_record_whose_image_fails_to_decode_is_replaced_in_its_batch(tiny_model_dir, data_dir, tmp_path):
    """The warm start reads images through the same pipeline: a record whose image does not decode is dropped
    (counted) and the batch takes the next record instead; the run goes on."""
    from support.images import cut_jpeg

    shutil.copytree(data_dir, tmp_path / "set")
    data = _sft_data(tiny_model_dir, tmp_path / "set" / "train.parquet", "sft.batch_size=5")
    victim = next(int(i) for i in data.order[:5] if data.records.record(int(i))["images"])  # in the first batch
    cut_jpeg(tmp_path / "set" / data.records.record(victim)["images"][0])
    for _ in range(5):  # past an epoch of 21 records
        ids = {int(uid.split(":")[0]) for uid in data.next_batch().prompt_uids}
        assert len(ids) == 5 and victim not in ids
    assert data.records.metrics()["data/bad_rows/unreadable_image"] == 1 and data.epoch >= 1
