"""Every YAML in configs/ loads and validates; errors name the key, the value and the rule."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ivgr_dist.config import Config, ConfigError, load_config, to_yaml

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
YAMLS = sorted(CONFIG_DIR.rglob("*.yaml"))


def test_configs_dir_is_not_empty():
    names = {p.name for p in YAMLS}
    assert {"tiny_cpu.yaml", "qwen2_5_vl_7b.yaml", "qwen3_vl_8b.yaml"} <= names


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_every_yaml_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    # Every key in the file exists in the schema (load_config would raise otherwise) and survives.
    raw = OmegaConf.to_container(OmegaConf.load(path))
    resolved = OmegaConf.to_container(OmegaConf.structured(cfg))
    for section, values in raw.items():
        for key, value in values.items():
            if not isinstance(value, dict):
                assert resolved[section][key] == value, f"{path.name}: {section}.{key}"


def test_tiny_cpu_yaml_is_the_embedded_default():
    assert load_config(CONFIG_DIR / "tiny_cpu.yaml") == load_config(None)


def test_recipe_numbers_in_7b_config():
    cfg = load_config(CONFIG_DIR / "qwen2_5_vl_7b.yaml")
    assert (cfg.rollout.n, cfg.rollout.temperature, cfg.rollout.top_p) == (5, 1.0, 0.99)
    assert (cfg.algorithm.clip_low, cfg.algorithm.clip_high, cfg.algorithm.kl_coef) == (0.2, 0.28, 0.01)
    assert (cfg.data.rollout_batch_size, cfg.data.paired_ratio, cfg.data.max_pixels) == (512, 0.9, 3211264)
    assert cfg.rollout.max_response_length == 4096 and cfg.trainer.max_steps == 360
    assert cfg.rollout.num_engines * cfg.rollout.tensor_parallel_size == 8
    assert (cfg.learner.lr, cfg.learner.warmup_ratio, cfg.learner.lr_schedule) == (1e-6, 0.02, "constant")
    assert not cfg.sft.enabled  # the recipe starts from an SFT checkpoint


def test_qwen3_recipe_config_fits_the_qwen3_vl_processor():
    cfg = load_config(CONFIG_DIR / "qwen3_vl_8b.yaml")
    assert cfg.data.min_pixels >= 256 * 256  # Qwen3-VL checkpoints' size.shortest_edge
    assert cfg.rollout.num_engines * cfg.rollout.tensor_parallel_size + cfg.learner.num_ranks == 16
    assert "16 GPUs" in (CONFIG_DIR / "qwen3_vl_8b.yaml").read_text()


def test_dotted_overrides_apply_and_nest():
    cfg = load_config(
        None, ["data.paired_ratio=0.5", "rollout.engine.max_model_len=2048", "data.synthetic.colors=[a,b]"]
    )
    assert cfg.data.paired_ratio == 0.5
    assert cfg.rollout.engine.max_model_len == 2048
    assert cfg.data.synthetic.colors == ["a", "b"]


def test_reward_recipe_exact_defaults_off_and_overrides():
    assert load_config(None).reward.recipe_exact is False
    assert load_config(None, ["reward.recipe_exact=true"]).reward.recipe_exact is True
    with pytest.raises(ConfigError, match="reward.recipe_exact"):
        load_config(None, ["reward.recipe_exact=maybe"])


@pytest.mark.parametrize(
    "override, expected",
    [
        ("data.paired_ratio=1.5", "data.paired_ratio=1.5: must be in [0, 1]"),
        ("rollout.top_p=0", "rollout.top_p=0.0: must be in (0, 1]"),
        ("data.bad_rows=ignore", "data.bad_rows='ignore': must be one of ['raise', 'skip']"),
        ("algorithm.clip_low=1.0", "algorithm.clip_low=1.0: must be in (0, 1)"),
        ("model.tiny.hidden_size=48", "model.tiny.hidden_size=48: hidden_size / num_heads must be a multiple of 32"),
        ("data.synthetic.question_types=[color,size]", "data.synthetic.question_types[]='size': must be one of"),
        ("data.synthetic.task=find", "data.synthetic.task='find': must be one of ['shapes', 'search']"),
        ("data.synthetic.search.ask=[size]", "data.synthetic.search.ask[]='size': must be one of ['color', 'shape']"),
        ("data.synthetic.search.ask=[]", "data.synthetic.search.ask=[]: must be a non-empty subset"),
        ("data.synthetic.search.min_distractors=0", "data.synthetic.search.min_distractors=0: must be in [1, max"),
        ("data.synthetic.search.min_distractors=9", "data.synthetic.search.min_distractors=9: must be in [1, max"),
        ("data.synthetic.search.max_target_frac=0.6", "search.min_target_frac=0.25: need 0 < min_target_frac <= max"),
        ("data.synthetic.search.min_distractor_frac=0", "search.min_distractor_frac=0.0: need 0 < min_distractor"),
        ("data.synthetic.search.max_image_size=100", "data.synthetic.search.min_image_size=112: must be in [28, max"),
        ("data.synthetic.search.min_target_frac=0.04", "min_target_frac=0.04: gives 4-pixel targets in 112-pixel"),
        ("rollout.max_response_length=1000", "rollout.engine.max_model_len=1024: must be >= data.max_prompt_length"),
        ("data.nope=1", "data.nope: Key 'nope' not in 'DataConfig'"),
        ("rollout.n=abc", "rollout.n: Value 'abc'"),
        ("justakey", "override 'justakey': must look like key.sub=value"),
        ("rollout.min_engines=3", "rollout.min_engines=3: must be in [1, rollout.num_engines=2]"),
        ("rollout.max_engines=1", "rollout.max_engines=1: must be 0 (= num_engines) or >= rollout.num_engines=2"),
        ("rollout.health.failures=0", "rollout.health.failures=0: must be >= 1"),
        ("rollout.health.interval_s=0", "rollout.health.interval_s=0.0: must be finite and > 0 (seconds)"),
        # GRPO's advantage is 0 for every rollout of a group of one: such a run would train nothing
        ("rollout.n=1", "rollout.n=1: must be >= 2: GRPO compares the rollouts of a group"),
        # an infinite (or NaN) timeout or back-off is an unbounded wait
        ("reward.judge.timeout_s=inf", "reward.judge.timeout_s=inf: must be finite and > 0 (seconds)"),
        ("reward.judge.timeout_s=nan", "reward.judge.timeout_s=nan: must be finite and > 0 (seconds)"),
        ("reward.judge.backoff_s=inf", "reward.judge.backoff_s=inf: must be finite and >= 0 (seconds)"),
        ("sync.timeout_s=inf", "sync.timeout_s=inf: must be finite and > 0 (seconds)"),
        ("rollout.restart_backoff_s=inf", "rollout.restart_backoff_s=inf: must be finite and >= 0 (seconds)"),
        ("rollout.group_timeout_s=inf", "rollout.group_timeout_s=inf: must be finite and > 0 (seconds)"),
        ("rollout.placement_timeout_s=inf", "rollout.placement_timeout_s=inf: must be finite and > 0 (seconds)"),
        ("rollout.health.timeout_s=inf", "rollout.health.timeout_s=inf: must be finite and > 0 (seconds)"),
        ("learner.placement_timeout_s=-inf", "learner.placement_timeout_s=-inf: must be finite and > 0 (seconds)"),
    ],
)
def test_validation_errors_quote_value_and_rule(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert expected in str(err.value)


def test_search_task_needs_two_shapes():
    with pytest.raises(ConfigError, match=r"data.synthetic.shapes=\['circle'\]: task=search needs at least 2 shapes"):
        load_config(None, ["data.synthetic.task=search", "data.synthetic.shapes=[circle]"])
    # one shape is fine for the shapes task (one object per image)
    assert load_config(None, ["data.synthetic.shapes=[circle]"]).data.synthetic.task == "shapes"


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "missing.yaml")


def test_config_is_frozen():
    cfg = load_config(None)
    with pytest.raises(AttributeError):
        cfg.data.seed = 3  # type: ignore[misc]


def test_to_yaml_round_trips(tmp_path):
    cfg = load_config(None, ["trainer.max_steps=7", "data.synthetic.max_objects=3"])
    path = tmp_path / "resolved.yaml"
    path.write_text(to_yaml(cfg))
    assert load_config(path) == cfg


def test_cli_reports_config_errors_with_exit_code_2():
    proc = subprocess.run(
        [sys.executable, "-m", "ivgr_dist.cli", "show-config", "data.paired_ratio=2"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "data.paired_ratio=2.0: must be in [0, 1]" in proc.stderr


def test_a_single_value_for_a_file_list_is_a_one_element_list(tmp_path, capsys):
    from ivgr_dist.cli import main

    cfg = load_config(None, ["data.train_files=foo.parquet", "data.streams=textual"])
    assert cfg.data.train_files == ["foo.parquet"] and cfg.data.streams == ["textual"]
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("data:\n  val_files: v.parquet\n")
    assert load_config(yaml_file).data.val_files == ["v.parquet"]
    assert main(["show-config", "data.train_files=foo.parquet"]) == 0
    shown = OmegaConf.create(capsys.readouterr().out)
    assert list(shown.data.train_files) == ["foo.parquet"]


def test_a_single_value_for_a_number_list_is_a_clear_error(tmp_path, capsys):
    from ivgr_dist.cli import main

    with pytest.raises(ConfigError) as err:
        load_config(None, ["learner.betas=0.9"])
    assert str(err.value) == "learner.betas expects a list, e.g. learner.betas=[0.9,0.999]; got 0.9"
    assert main(["show-config", "rollout.engine.cpu_affinity=3"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (
        "ivgr-dist show-config: configuration error: rollout.engine.cpu_affinity expects a list, "
        "e.g. rollout.engine.cpu_affinity=[0,1]; got 3"
    )


def test_cli_show_config_prints_overrides():
    proc = subprocess.run(
        [sys.executable, "-m", "ivgr_dist.cli", "show-config", "trainer.max_steps=11"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert OmegaConf.create(proc.stdout).trainer.max_steps == 11


@pytest.mark.parametrize("folder", ["ablation", "localise"])
def test_ablation_configs_differ_only_in_streams_consistency_weight_and_output(folder):
    """A fair ablation: same warm start, steps, batch and optimiser; only the RL streams, the consistency weight
    (and where results go)."""
    import dataclasses

    cfgs = {p.stem: load_config(p) for p in sorted((CONFIG_DIR / folder).glob("*.yaml"))}
    assert set(cfgs) == {"dual_stream", "textual_only", "grounded_only", "dual_no_consistency"}
    assert {k: (c.data.streams, c.algorithm.consistency_weight) for k, c in cfgs.items()} == {
        "dual_stream": (["grounded", "textual"], 1.0),
        "textual_only": (["textual"], 1.0),
        "grounded_only": (["grounded"], 1.0),
        "dual_no_consistency": (["grounded", "textual"], 0.0),
    }
    assert len({c.sft_model_dir for c in cfgs.values()}) == 1
    assert len({c.trainer.output_dir for c in cfgs.values()}) == 4

    def normalised(c):
        data = dataclasses.replace(c.data, streams=["textual"])
        algorithm = dataclasses.replace(c.algorithm, consistency_weight=1.0)
        trainer = dataclasses.replace(c.trainer, output_dir="x")
        return dataclasses.replace(c, data=data, algorithm=algorithm, trainer=trainer)

    base = normalised(cfgs["dual_stream"])
    assert all(normalised(c) == base for c in cfgs.values())
    if folder == "localise":  # the search task, in a data folder of its own (not the default set's)
        assert base.data.synthetic.task == "search"
        assert len({str(Path(f).parent) for c in cfgs.values() for f in c.data.train_files + c.data.val_files}) == 1
        assert Path(base.data.train_files[0]).parent != Path(load_config(None).data.train_files[0]).parent


@pytest.mark.parametrize("name", ["qwen2_5_vl_7b.yaml", "qwen3_vl_8b.yaml"])
def test_recipe_engines_get_gpu_shaped_arguments(name):
    """What a GPU engine of each recipe is started with: TP 2 on vLLM's Ray executor (its own placement group),
    no video budget, prefill chunks sized for image-heavy prompts; the output directory is absolute (shared)."""
    from ivgr_dist.rollout.worker import engine_kwargs

    cfg = load_config(CONFIG_DIR / name)
    kw = engine_kwargs(cfg.model, cfg.rollout, 3, "ivgr_collective", cpu=False)
    assert kw["tensor_parallel_size"] == 2 and kw["distributed_executor_backend"] == "ray"
    assert kw["limit_mm_per_prompt"] == {"image": 1, "video": 0}
    assert kw["max_num_batched_tokens"] == 16384 and kw["seed"] == 3
    assert "enable_chunked_prefill" not in kw  # recipes do not seed groups
    # sampled log-probs at rollout.temperature, as the learner scores them: raw at 1.0 (the recipes), tempered else
    assert kw["logprobs_mode"] == "raw_logprobs"
    warm = engine_kwargs(cfg.model, replace(cfg.rollout, temperature=0.7), 0, "ivgr_collective", cpu=False)
    assert warm["logprobs_mode"] == "processed_logprobs"
    assert Path(cfg.trainer.output_dir).is_absolute() and Path(cfg.model.path).is_absolute()
    tiny = load_config(None)
    assert "max_num_batched_tokens" not in engine_kwargs(tiny.model, tiny.rollout, 0, "ivgr_shm", cpu=True)
    # asynchronous training: no prefix caching (vLLM 0.32 cannot recompute an image prefix it took from the cache)
    assert kw["enable_prefix_caching"] is True
    inflight = engine_kwargs(cfg.model, cfg.rollout, 0, "ivgr_collective", cpu=False, inflight_updates=True)
    assert inflight["enable_prefix_caching"] is False


def test_every_duration_in_the_tree_is_checked_finite():
    """Each float field named ``*_s`` (a timeout, interval or back-off) rejects ``inf``: a new duration key
    without the check fails here."""
    import dataclasses
    import typing

    from ivgr_dist.config import Config

    def durations(cls, prefix):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            kind = hints[f.name]
            if dataclasses.is_dataclass(kind):
                yield from durations(kind, f"{prefix}{f.name}.")
            elif f.name.endswith("_s") and kind is float:
                yield f"{prefix}{f.name}"

    keys = list(durations(Config, ""))
    assert len(keys) >= 9, keys
    for key in keys:
        with pytest.raises(ConfigError, match=f"{key}=inf: must be finite"):
            load_config(None, [f"{key}=inf"])
