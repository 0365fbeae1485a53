"""Metrics loggers: one record fanned out to metrics.jsonl, TensorBoard and W&B (offline); resume without
duplicated steps; the ``trainer.loggers`` keys."""

from __future__ import annotations

import json
import math
import struct
import sys
import time

import pytest

from ivgr_dist.config import ConfigError, load_config
from ivgr_dist.runtime.metrics import MetricsLogger, read_metrics, require_loggers, truncate_jsonl


def _scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    """TensorBoard scalars of ``logdir`` as TensorBoard shows them: (step, value) per tag, purges applied."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_one_record_goes_to_jsonl_and_tensorboard(tmp_path):
    logger = MetricsLogger(tmp_path, ["jsonl", "tensorboard"])
    first = logger.log(1, {"loss": 0.5, "reward/textual/overall": 2.0, "bad": float("nan")})
    logger.log(2, {"loss": 0.25, "reward/textual/overall": 2.5, "bad": 1.0})
    logger.close()
    assert first == {"step": 1, "bad": None, "loss": 0.5, "reward/textual/overall": 2.0, "metrics/non_finite": 1}
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert records[0] == first and records[1]["metrics/non_finite"] == 0
    tb = _scalars(tmp_path / "tensorboard")
    assert tb["loss"] == [(1, 0.5), (2, 0.25)]
    assert tb["reward/textual/overall"] == [(1, 2.0), (2, 2.5)]
    assert tb["bad"] == [(2, 1.0)]  # the NaN is only counted, never written as a value
    assert tb["metrics/non_finite"] == [(1, 1.0), (2, 0.0)]


def test_loggers_choose_the_sinks(tmp_path):
    logger = MetricsLogger(tmp_path, ["tensorboard"])
    logger.log(1, {"x": 1.0})
    logger.log_samples(1, [{"step": 1, "stream": "single"}])
    logger.close()
    assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "samples.jsonl").exists()
    assert _scalars(tmp_path / "tensorboard")["x"] == [(1, 1.0)]
    logger = MetricsLogger(tmp_path / "j", ["jsonl"])
    logger.log(1, {"x": 1.0})
    logger.log_samples(1, [{"step": 1, "stream": "single"}, {"step": 1, "stream": "grounded"}])
    logger.close()
    assert not (tmp_path / "j" / "tensorboard").exists()
    assert [s["stream"] for s in read_metrics(tmp_path / "j" / "samples.jsonl")] == ["single", "grounded"]


def _write_steps(path, steps):
    path.write_text("".join(json.dumps({"step": s, "x": s * 0.5}) + "\n" for s in steps))


def test_truncate_keeps_exactly_the_steps_up_to_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write_steps(path, range(1, 8))
    original = path.read_text().splitlines()
    assert truncate_jsonl(path, 5) == 2
    assert path.read_text().splitlines() == original[:5]
    assert not list(tmp_path.glob(".*tmp"))  # the temporary file was renamed over the log
    assert truncate_jsonl(path, 5) == 0 and path.read_text().splitlines() == original[:5]
    assert truncate_jsonl(tmp_path / "missing.jsonl", 5) == 0 and not (tmp_path / "missing.jsonl").exists()


def test_truncate_drops_a_line_cut_short_by_the_interruption(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write_steps(path, range(1, 4))
    with path.open("a") as f:
        f.write('{"step": 4, "x"')
    assert truncate_jsonl(path, 10) == 1
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]


def test_tensorboard_purge_step_discards_the_redone_steps(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    logdir = tmp_path / "tb"
    writer = SummaryWriter(str(logdir))
    for step in range(1, 8):
        writer.add_scalar("x", float(step), step)
    writer.close()
    writer = SummaryWriter(str(logdir), purge_step=6)
    for step in range(6, 9):
        writer.add_scalar("x", 100.0 + step, step)
    writer.close()
    assert _scalars(logdir)["x"] == [(s, float(s)) for s in range(1, 6)] + [(s, 100.0 + s) for s in range(6, 9)]


def test_resumed_logger_continues_from_the_checkpoint_step(tmp_path):
    logger = MetricsLogger(tmp_path, ["jsonl", "tensorboard"])
    for step in range(1, 8):  # checkpoint at 5, interrupted after 7
        logger.log(step, {"x": float(step)})
        logger.log_samples(step, [{"step": step, "stream": "grounded"}])
    logger.close()
    logger = MetricsLogger(tmp_path, ["jsonl", "tensorboard"], resume_step=5)
    for step in range(6, 9):
        logger.log(step, {"x": 100.0 + step})
        logger.log_samples(step, [{"step": step, "stream": "textual"}])
    logger.close()
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["x"]) for r in records] == [(s, float(s)) for s in range(1, 6)] + [
        (s, 100.0 + s) for s in range(6, 9)
    ]
    samples = read_metrics(tmp_path / "samples.jsonl")
    assert [(s["step"], s["stream"]) for s in samples] == [(s, "grounded") for s in range(1, 6)] + [
        (s, "textual") for s in range(6, 9)
    ]
    tb = _scalars(tmp_path / "tensorboard")["x"]
    assert [s for s, _ in tb] == list(range(1, 9)) and tb[-3:] == [(6, 106.0), (7, 107.0), (8, 108.0)]


# ------------------------------------------------------------------------------------------------ W&B offline


def _wandb_records(path) -> list:
    """The protobuf records of an offline run file (``run-<id>.wandb``). The file is a 7-byte header (``:W&B``,
    magic, version) followed by LevelDB-log framing: 32 KiB blocks of chunks, each ``crc32 (4) | length (2) |
    type (1) | data``, type 1 a whole record, 2/3/4 its first/middle/last part; a block tail under 7 bytes is
    padding. The installed wandb has the message classes but no reader of its own."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    block, pos, parts, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if pos + 7 + length > len(data):  # a chunk still being written
            break
        parts += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            records.append(record)
            parts = b""
        elif kind == 0 and length == 0:
            continue
    return records


def _finished_wandb_run(wandb_dir, run_id, timeout_s: float = 60.0):
    """The offline run directory of ``run_id`` and its records, once the file holds the run's ``exit`` record.
    W&B's service process writes the file: it may still be flushing when ``finish()`` has returned (a CI run
    read it with no ``run`` record yet), so this waits for the last record rather than reading once."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = list(wandb_dir.glob(f"offline-run-*-{run_id}"))
        records = []
        if len(found) == 1 and (found[0] / f"run-{run_id}.wandb").exists():
            records = _wandb_records(found[0] / f"run-{run_id}.wandb")
            if any(r.WhichOneof("record_type") == "exit" for r in records):
                return found[0], records
        if time.monotonic() > deadline:
            kinds = [r.WhichOneof("record_type") for r in records]
            raise AssertionError(
                f"no finished offline run {run_id} after {timeout_s:g}s: dirs {found}, records {kinds}"
            )
        time.sleep(0.5)


def _history(records) -> list[dict]:
    rows = []
    for r in records:
        if r.WhichOneof("record_type") == "history":
            rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item})
    return rows


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    root = tmp_path / "wandb_env"
    for name, value in {
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(root),
        "WANDB_SILENT": "true",
        "WANDB_CONFIG_DIR": str(root / "config"),
        "WANDB_CACHE_DIR": str(root / "cache"),
        "WANDB_DATA_DIR": str(root / "data"),
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    (root / "config").mkdir(parents=True)
    return root


def test_wandb_offline_run_holds_the_logged_records_config_and_samples(tmp_path, wandb_offline):
    out = tmp_path / "run"
    options = {"project": "ivgr-test", "name": "tiny", "tags": ["unit"], "config": {"trainer": {"max_steps": 3}}}
    logger = MetricsLogger(out, ["jsonl", "wandb"], resume_step=0, wandb=options)
    for step in (1, 2, 3):
        logger.log(step, {"reward/grounded/overall": step * 0.5, "loss/policy": -step / 4, "nan": float("nan")})
    samples = [{"step": 3, "stream": "textual", "response": "<answer>red</answer>", "rewards": {"format": 1.0}}]
    logger.log_samples(3, samples)
    logger.close()

    run_id = (out / "wandb_run_id").read_text().strip()
    run_dir, records = _finished_wandb_run(wandb_offline / "wandb", run_id)
    [run] = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (run.run_id, run.project, run.display_name, list(run.tags)) == (run_id, "ivgr-test", "tiny", ["unit"])
    config = {u.key: json.loads(u.value_json) for u in run.config.update}
    assert config["trainer"] == {"max_steps": 3}
    rows = _history(records)
    jsonl = read_metrics(out / "metrics.jsonl")
    assert [row["_step"] for row in rows] == [1, 2, 3]
    for row, rec in zip(rows, jsonl, strict=True):  # the same record in both
        assert row["reward/grounded/overall"] == rec["reward/grounded/overall"]
        assert row["loss/policy"] == rec["loss/policy"]
        assert row["metrics/non_finite"] == rec["metrics/non_finite"] == 1
        assert "nan" not in row
    assert rows[-1]["samples/_type"] == "table-file" and rows[-1]["samples/nrows"] == 1
    table = json.loads((run_dir / "files" / rows[-1]["samples/path"]).read_text())
    row = dict(zip(table["columns"], table["data"][0], strict=True))
    assert row["stream"] == "textual" and row["response"] == "<answer>red</answer>"
    assert json.loads(row["rewards"]) == {"format": 1.0}

    # resumed: the same W&B run id again (resume="allow"); a fresh start gets a new one
    MetricsLogger(out, ["wandb"], resume_step=3, wandb=options).close()
    runs = sorted((wandb_offline / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(p.name.endswith(run_id) for p in runs)
    MetricsLogger(out, ["wandb"], wandb=options).close()
    assert (out / "wandb_run_id").read_text().strip() != run_id


def test_wandb_files_go_to_the_output_dir_unless_wandb_dir_is_set(tmp_path, wandb_offline, monkeypatch):
    monkeypatch.delenv("WANDB_DIR")
    MetricsLogger(tmp_path / "run", ["wandb"]).close()
    run_id = (tmp_path / "run" / "wandb_run_id").read_text().strip()
    assert len(list((tmp_path / "run" / "wandb").glob(f"offline-run-*-{run_id}"))) == 1


def test_wandb_missing_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(ImportError, match=r"pip install wandb \(or pip install -e \.\[wandb\]\)"):
        require_loggers(["jsonl", "wandb"])
    with pytest.raises(ImportError, match="pip install wandb"):
        MetricsLogger(tmp_path, ["jsonl", "wandb"])
    require_loggers(["jsonl", "tensorboard"])


# --------------------------------------------------------------------------------------------------- config


def test_loggers_config_defaults_and_overrides():
    t = load_config(None).trainer
    assert t.loggers == ["jsonl", "tensorboard"]
    assert (t.wandb_project, t.wandb_run_name, t.wandb_entity, t.wandb_tags) == ("ivgr-dist", None, None, [])
    assert (t.log_samples_every, t.log_samples_per_stream) == (5, 2)
    assert load_config(None, ["trainer.loggers=wandb"]).trainer.loggers == ["wandb"]  # one name: a list of one
    assert load_config(None, ["trainer.loggers=[jsonl,wandb]"]).trainer.loggers == ["jsonl", "wandb"]
    assert load_config(None, ["trainer.wandb_tags=ablation"]).trainer.wandb_tags == ["ablation"]
    assert load_config(None, ["data.streams=grounded"]).data.streams == ["grounded"]
    assert load_config(None, ["trainer.loggers=[jsonl]"]).trainer.loggers == ["jsonl"]  # no TensorBoard


def test_the_removed_tensorboard_switch_is_refused_naming_its_replacement(tmp_path):
    with pytest.raises(ConfigError, match=r"^trainer.tensorboard: removed; set trainer.loggers.*loggers=\[jsonl\]"):
        load_config(None, ["trainer.tensorboard=false"])
    path = tmp_path / "old.yaml"
    path.write_text("trainer:\n  tensorboard: true\n")
    with pytest.raises(ConfigError, match=rf"trainer.tensorboard: removed; .* \(in {path}\)$"):
        load_config(path)


def test_scalar_for_a_list_in_yaml_is_a_list_of_one(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("trainer:\n  loggers: jsonl\n  output_dir: x\n")
    t = load_config(path).trainer
    assert t.loggers == ["jsonl"] and t.output_dir == "x"


@pytest.mark.parametrize(
    "override, expected",
    [
        ("trainer.loggers=mlflow", "trainer.loggers[]='mlflow': must be one of ['jsonl', 'tensorboard', 'wandb']"),
        ("trainer.loggers=[jsonl,jsonl]", "trainer.loggers=['jsonl', 'jsonl']: must not repeat a logger"),
        ("trainer.log_samples_every=-1", "trainer.log_samples_every=-1: must be >= 0"),
        ("trainer.log_samples_per_stream=0", "trainer.log_samples_per_stream=0: must be >= 1"),
        ("trainer.wandb_project=''", "trainer.wandb_project='': must be a non-empty name"),
    ],
)
def test_logger_keys_are_validated(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert expected in str(err.value)


def test_nan_never_reaches_a_sink_as_a_value(tmp_path):
    logger = MetricsLogger(tmp_path, ["jsonl"])
    record = logger.log(1, {"a": float("inf"), "b": 1})
    logger.close()
    assert record["a"] is None and record["metrics/non_finite"] == 1 and math.isfinite(record["b"])
