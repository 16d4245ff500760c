"""Run configuration: files, overrides, batch layout and DeepSpeed config filling, with named errors."""

from __future__ import annotations

import dataclasses
import json
import re
import warnings
from pathlib import Path

import pytest
import yaml

from imports import heavy_imports_after
from ssit_dist.config import (
    ConfigError,
    FinetuneConfig,
    PretrainConfig,
    SegmentConfig,
    batch_layout,
    deepspeed_config,
    load_config,
    save_config,
)
from ssit_dist.data.loading.view_recipe import VIEW1, VIEW2
from ssit_dist.train.schedule import learning_rate, saliency_weight

DS = Path(__file__).resolve().parents[2] / "ds_configs"


def test_yaml_file_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(
        yaml.safe_dump({"global_batch": 64, "optim": {"lr": 5e-4}, "model": {"arch": "vit_base_patch16_224"}})
    )
    cfg = load_config(path, ["optim.warmup_epochs=2", "data.shards=[a, b]", "model.timm_kwargs={depth: 2}"])
    assert cfg.global_batch == 64 and cfg.optim.lr == 5e-4 and cfg.optim.warmup_epochs == 2
    assert cfg.data.shards == ["a", "b"] and cfg.model.arch == "vit_base_patch16_224"
    assert cfg.model.timm_kwargs == {"depth": 2}
    assert cfg.scaled_lr() == pytest.approx(5e-4 * 64 / 512)
    saved = save_config(cfg, tmp_path / "run")
    assert load_config(saved) == cfg


def test_unknown_and_mistyped_fields_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown field optim\.learning_rate"):
        load_config(None, ["optim.learning_rate=1"])
    with pytest.raises(ConfigError, match=r"global_batch = 'many': expected int"):
        load_config(None, ["global_batch=many"])
    with pytest.raises(ConfigError, match="not FIELD=VALUE"):
        load_config(None, ["optim.lr"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ValueError, match="mask_ratio"):
        load_config(None, ["model.mask_ratio=1.5"])


def test_batch_layout() -> None:
    assert batch_layout(512, 8, None) == (64, 1)
    assert batch_layout(512, 8, 16) == (16, 4)
    with pytest.raises(ConfigError, match="global_batch 10 is not divisible by the world size 4"):
        batch_layout(10, 4, None)
    with pytest.raises(ConfigError, match="micro_batch 3 does not divide the per-rank batch 8"):
        batch_layout(16, 2, 3)
    with pytest.raises(ConfigError, match="at least 2"):
        batch_layout(4, 4, None)


@pytest.mark.parametrize("name", sorted(p.name for p in DS.glob("*.json")))
def test_every_shipped_ds_config_fills(name: str) -> None:
    """Every field the run config owns comes from it, as field=value overrides (README, user guide 6)."""
    cfg = load_config(None, ["global_batch=32", "micro_batch=4", "optim.clip_grad=0.5"])
    ds = deepspeed_config(DS / name, cfg, world=2)
    assert ds["train_batch_size"] == 32 and ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 4 and ds["gradient_clipping"] == 0.5
    assert ds["optimizer"]["params"]["lr"] == pytest.approx(1e-3 * 32 / 512)
    assert "auto" not in json.dumps(ds)
    # DeepSpeed's throughput timer syncs the device twice per micro-batch: every shipped config has it off.
    assert json.loads((DS / name).read_text())["timers"] == {"throughput": {"enabled": False}}


def test_bad_ds_configs_fail_fast_naming_the_key(tmp_path: Path) -> None:
    cfg = PretrainConfig(global_batch=32)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"zero_optimisation": {"stage": 2}}))
    with pytest.raises(ConfigError, match="unknown key 'zero_optimisation'"):
        deepspeed_config(bad, cfg, 2)
    bad.write_text(json.dumps({"zero_optimization": {"stage": 2, "bogus": 1}}))
    with pytest.raises(ConfigError, match="bogus"):
        deepspeed_config(bad, cfg, 2)
    bad.write_text(json.dumps({"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}}))
    with pytest.raises(ConfigError, match="offload_param needs stage 3"):
        deepspeed_config(bad, cfg, 2)
    bad.write_text(json.dumps({"train_batch_size": 64}))
    with pytest.raises(ConfigError, match="train_batch_size is 64 but the run config gives 32"):
        deepspeed_config(bad, cfg, 2)
    with pytest.raises(ConfigError, match="ds_config .* not found"):
        deepspeed_config(tmp_path / "nope.json", cfg, 2)
    bad.write_text(json.dumps({"timers": {"throughput": {"enabled": False, "synchronised": False}}}))
    with pytest.raises(ConfigError, match="timers.throughput: .*synchronised"):
        deepspeed_config(bad, cfg, 2)
    bad.write_text(json.dumps({"timers": {"thruput": {"enabled": False}}}))
    with pytest.raises(ConfigError, match="timers must be"):
        deepspeed_config(bad, cfg, 2)


def test_a_ds_config_without_timers_runs_with_the_throughput_timer_off(tmp_path: Path) -> None:
    from deepspeed.utils.config import get_timers_config

    mine = tmp_path / "mine.json"
    mine.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    assert get_timers_config(deepspeed_config(mine, PretrainConfig(global_batch=32), 2)).enabled is False
    mine.write_text(json.dumps({"timers": {"throughput": {"enabled": True}}}))  # asked for: kept
    assert get_timers_config(deepspeed_config(mine, PretrainConfig(global_batch=32), 2)).enabled is True


def test_schedules() -> None:
    assert learning_rate(0, 1.0, 10, 100) == 0 and learning_rate(5, 1.0, 10, 100) == pytest.approx(0.5)
    assert learning_rate(10, 1.0, 10, 100) == pytest.approx(1.0)
    assert learning_rate(55, 1.0, 10, 100) == pytest.approx(0.5)
    assert learning_rate(100, 1.0, 10, 100, min_lr=0.1) == pytest.approx(0.1)
    assert saliency_weight(50, 100, 10) == 10 and saliency_weight(50, 100, 10, True) == pytest.approx(5)


@pytest.mark.parametrize("text, value", [("5e-4", 5e-4), ("1E-4", 1e-4), (".5", 0.5), ("1_000", 1000.0), ("2", 2.0)])
def test_numbers_in_any_form_in_files_and_overrides(tmp_path: Path, text: str, value: float) -> None:
    assert load_config(None, [f"optim.lr={text}"]).optim.lr == pytest.approx(value)
    path = tmp_path / "run.yaml"
    path.write_text(f"optim:\n  lr: {text}\nglobal_batch: 1_024\n")
    cfg = load_config(path)
    assert cfg.optim.lr == pytest.approx(value) and isinstance(cfg.optim.lr, float) and cfg.global_batch == 1024
    fine = load_config(None, [f"lr={text}"], kind=FinetuneConfig)
    assert fine.lr == pytest.approx(value) and isinstance(fine.lr, float)


@pytest.mark.parametrize(
    "override, message",
    [
        ("micro_batch=abc", "micro_batch = 'abc': expected int or null"),
        ("steps_per_epoch=2.5", "steps_per_epoch = 2.5: expected int or null"),
        ("global_batch=true", "global_batch = True: expected int"),
        ("checkpoint_every=0", "checkpoint_every = 0: must be at least 1"),
        ("optim.lr=-1", "optim.lr = -1.0: must be positive"),
        ("data.workers=-1", "data.workers = -1: must be 0 or more"),
        ("data.mean=[0.5, 0.5]", r"data.mean = \[0.5, 0.5\]: expected three numbers"),
        ("data.shards=a", "data.shards = 'a': expected list of str"),
        ("data.stall_timeout_s=0", "data.stall_timeout_s = 0.0: must be positive, or null"),
        ("model.mask_ratio=1", r"model.mask_ratio = 1.0: must be in \[0, 1\)"),
        ("loss.momentum=1.5", r"loss.momentum = 1.5: must be in \[0, 1\]"),
        ("model.pool=mean", "model.pool = 'mean': expected one of max, avg"),
        ("resume=maybe", "resume = 'maybe': expected one of auto, force, reshard"),
        ("augment.view1.scale=[0.9, 0.5]", r"augment.view1.scale = \[0.9, 0.5\]: expected \(min, max\)"),
        ("augment.view2.scale=[0.5, 1.5]", "augment.view2.scale = .*: area fractions are at most 1"),
        ("augment.view1.rotation=270", r"augment.view1.rotation = 270.0: must be in \[0, 180\]"),
        ("augment.view2.grey_p=2", r"augment.view2.grey_p = 2.0: must be in \[0, 1\]"),
        ("augment.view1.jitter=[0.4, 0.4]", "augment.view1.jitter = .*: expected four strengths"),
        ("augment.view3.scale=[0.5, 1]", "unknown field augment.view3"),
    ],
)
def test_every_field_is_checked_for_type_and_range(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


@pytest.mark.parametrize(
    "override, message",
    [
        ("lr=abc", "lr = 'abc': expected float or null"),
        ("weight_decay=-0.1", "weight_decay = -0.1: must be 0 or more"),
        ("linear=1", "linear = 1: expected bool"),
        ("epochs=0", "epochs = 0: must be at least 1"),
    ],
)
def test_finetune_fields_are_checked(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override], kind=FinetuneConfig)


def test_old_names_are_read_with_a_deprecation_warning() -> None:
    with pytest.warns(FutureWarning, match="out is now called run_dir"):
        assert load_config(None, ["out=runs/x"], kind=FinetuneConfig).run_dir == "runs/x"
    with pytest.warns(FutureWarning, match="batch is now called global_batch"):
        assert load_config(None, ["batch=32"], kind=FinetuneConfig).global_batch == 32
    with pytest.warns(FutureWarning, match="model.weights is now called model.init"):
        assert load_config(None, ["model.weights=enc.safetensors"]).model.init == "enc.safetensors"


def test_shipped_configs_and_ds_config_names(tmp_path: Path) -> None:
    sbatch = (DS.parent / "launch" / "slurm" / "pretrain.sbatch").read_text()
    for name in ("ssit_vit_s", "ssit_vit_b"):
        cfg = load_config(name)  # a bare name: the shipped config
        assert (cfg.epochs, cfg.optim.warmup_epochs, cfg.global_batch, cfg.model.img_size) == (300, 40, 512, 224)
        assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.loss.momentum, cfg.loss.saliency_weight) == (
            1e-3,
            0.1,
            0.99,
            10,
        )
        ds = deepspeed_config(cfg.ds_config, cfg, world=8)
        assert ds["bf16"]["enabled"] and ds["zero_optimization"]["stage"] == 2
        # Nothing to compile on first contact (torch's fused AdamW, not DeepSpeed's nvcc-built FusedAdam), and
        # the augmentation on the GPU from pinned batches, its workers and the training process within the
        # cores per rank the SLURM script asks for.
        assert ds["optimizer"]["params"]["torch_adam"] and ds["optimizer"]["params"]["fused"]
        assert cfg.data.augment_on == "gpu" and cfg.data.pin_memory
        assert cfg.data.workers + 2 <= int(re.search(r"#SBATCH --cpus-per-task=(\d+)", sbatch)[1])  # type: ignore[index]
    for shipped in DS.glob("*.json"):  # every shipped DeepSpeed config: no optimizer that needs a build
        assert json.loads(shipped.read_text())["optimizer"]["params"]["torch_adam"] is True, shipped
    defaults = PretrainConfig()
    assert (defaults.epochs, defaults.optim.warmup_epochs) == (300, 40)  # the reference's recipe
    # A relative ds_config path is taken relative to the config file that names it.
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "ds.json").write_text((DS / "zero1_bf16.json").read_text())
    (tmp_path / "mine" / "run.yaml").write_text("ds_config: ds.json\n")
    cfg = load_config(tmp_path / "mine" / "run.yaml")
    assert cfg.ds_config == str(tmp_path / "mine" / "ds.json")
    assert deepspeed_config("zero3_bf16", cfg, world=1)["zero_optimization"]["stage"] == 3


def test_encoder_meta_round_trips_and_reads_flat_files() -> None:
    from ssit_dist.models.encoder_meta import EncoderMeta

    meta = EncoderMeta(
        arch="vit_small_patch16_224",
        img_size=64,
        timm_kwargs={"patch_size": 8},
        patch_size=8,
        mean=[0.4] * 3,
        std=[0.3] * 3,
        provenance={"step": 4},
    )
    body = meta.to_json()
    assert body["arch"] == "vit_small_patch16_224" and body["step"] == 4  # flat: readable without the class
    assert EncoderMeta.from_json(body) == meta
    assert meta.with_provenance(checkpoint="c").provenance == {"step": 4, "checkpoint": "c"}
    with pytest.raises(ValueError, match="lacks img_size"):
        EncoderMeta.from_json({"arch": "vit_small_patch16_224", "timm_kwargs": {}}, "x.json")


def test_an_override_of_one_view_field_keeps_that_views_other_reference_values() -> None:
    cfg = load_config(None, ["augment.view2.scale=[0.5, 1.0]", "augment.view1.rotation=15"])
    assert cfg.augment.view2 == dataclasses.replace(VIEW2, scale=[0.5, 1.0])  # blur 0.1, solarize 0.2 kept
    assert cfg.augment.view1 == dataclasses.replace(VIEW1, rotation=15.0)
    assert load_config(None, []).augment.view1 == VIEW1 and load_config(None, []).augment.view2 == VIEW2


def test_a_frozen_config_is_checked_and_stays_frozen() -> None:
    """ShardOptions and DemoPlan are frozen: their checks run at construction all the same."""
    from ssit_dist.data.packing.options import ShardOptions

    with pytest.raises(ConfigError, match=r"quality = 101: must be in \[1, 100\]"):
        ShardOptions(quality=101)
    with pytest.raises(ConfigError, match="size = 72: use a multiple of 16"):
        ShardOptions(size=72)
    options = ShardOptions(shard_size=1e3)  # an integral float from YAML or JSON becomes an int
    assert options.shard_size == 1000 and isinstance(options.shard_size, int)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.size = 64  # type: ignore[misc]


# --- the config classes on pydantic: one help per field, the JSON Schema, the shipped files ---------------

CONFIGS = DS.parent / "launch" / "configs"
SCHEMAS = CONFIGS / "schema"


def _defaults() -> dict:
    from ssit_dist.data.packing.options import ShardOptions
    from ssit_dist.demo import QUICK, DemoPlan
    from ssit_dist.eval.knn import KnnConfig

    built = {
        "pretrain": PretrainConfig(),
        "finetune": FinetuneConfig(),
        "segment": SegmentConfig(),
        "knn": KnnConfig(train="a", test="b", init="random"),
        "shard": ShardOptions(),
        "demo": DemoPlan(),
        "quick": QUICK,
        **{name: load_config(name) for name in ("tiny_cpu", "ssit_vit_s", "ssit_vit_b")},
    }
    return {name: dataclasses.asdict(cfg) for name, cfg in built.items()}


def test_configs_serialise_to_the_dicts_runs_recorded() -> None:
    """Keys, defaults and the shipped configs' values are those of the recorded dicts (the sections the
    tasks share keep their keys flat), so that fingerprints and saved configs of existing runs still match."""
    recorded = json.loads((Path(__file__).with_name("config_defaults.json")).read_text())
    recorded.pop("why")
    assert json.loads(json.dumps(_defaults())) == recorded


def test_shared_fields_have_one_help_text() -> None:
    """Grading, segmentation and kNN share the encoder, run and head-training fields: each has one help
    text and one range, the section's, whatever default a task gives it."""
    from ssit_dist.configclass import bounds, config_fields
    from ssit_dist.eval.knn import KnnConfig
    from ssit_dist.sections import AccelerateRun, EncoderSource, HeadTraining, Run

    shared = set(config_fields(FinetuneConfig)) & set(config_fields(SegmentConfig))
    assert len(shared) >= 14 and {"init", "arch", "timm_kwargs", "trust_pickle", "img_size"} <= set(
        config_fields(KnnConfig)
    )
    for task in (PretrainConfig, FinetuneConfig, SegmentConfig, KnnConfig):
        for section in set(task.__mro__) & {Run, AccelerateRun, EncoderSource, HeadTraining}:
            for name, info in config_fields(section).items():
                assert config_fields(task)[name].description == info.description, (task.__name__, name)
                assert bounds(config_fields(task)[name]) == bounds(info), (task.__name__, name)
    assert SegmentConfig().img_size == 256 and FinetuneConfig().img_size == 384  # restated defaults
    with pytest.raises(ConfigError, match="img_size = 0: must be positive"):
        SegmentConfig(img_size=0)  # the section's range holds under a task's own default


def test_errors_name_the_source_and_suggest_the_field(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  lr: -1\n")
    with pytest.raises(ConfigError, match=rf"optim.lr = -1.0: must be positive \({re.escape(str(path))}\)"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"optim.lr = -2.0: must be positive \(the override optim.lr=-2\)"):
        load_config(path, ["optim.lr=-2"])
    with pytest.raises(ConfigError, match=r"unknown field globl_batch \(did you mean global_batch\?"):
        load_config(None, ["globl_batch=8"])
    with pytest.raises(ConfigError, match=r"(?s)micro_batch = 'x': expected int or null.*\nepochs = 0: must be"):
        load_config(None, ["micro_batch=x", "epochs=0"])  # every bad field, a line each
    with pytest.raises(ConfigError, match=r"loss.saliency_weight = -1.0: .*\(the override loss.ss_weight=-1\)"):
        with pytest.warns(FutureWarning, match="ss_weight is now called"):
            load_config(None, ["loss.ss_weight=-1"])


def _schema_line(path: Path) -> Path:
    first = path.read_text().splitlines()[0]
    match = re.fullmatch(r"# yaml-language-server: \$schema=(\S+)", first)
    assert match, f"{path.name}: the first line names its schema for editors"
    return path.parent / match[1]


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_every_shipped_yaml_validates_against_its_schema(name: str) -> None:
    """With jsonschema, not the project's loader, and read by plain YAML 1.1 (where 1e-4 would be a
    string): a shipped file means the same to every reader."""
    import jsonschema

    from ssit_dist.config import json_schema

    schema = json.loads(_schema_line(CONFIGS / name).read_text())
    assert schema == json_schema("pretrain")
    jsonschema.Draft202012Validator(schema).validate(yaml.safe_load((CONFIGS / name).read_text()))


@pytest.mark.parametrize("kind", ["pretrain", "finetune", "segment", "knn"])
def test_shipped_schemas_are_what_the_config_command_prints(kind: str) -> None:
    from conftest import invoke_cli

    assert invoke_cli("config", kind, "--schema").stdout == (SCHEMAS / f"{kind}.schema.json").read_text()


@pytest.mark.parametrize(
    "text",
    [
        "global_batch: 64\noptim: {lr: 5e-4}",  # YAML 1.2 numbers, as editors and the loader read them
        "global_batch: 1e3",  # an integral number is an integer
        "loss: {ss_weight: 2}",  # an older name: read, deprecated
        "global_batch: many",
        "global_batch: true",
        "global_batch: 2.5",
        "optim: {lr: -1}",
        "model: {mask_ratio: 1}",
        "model: {pool: mean}",
        "linear: true",  # no such pretraining field
        "augment: {view2: {grey_p: 2}}",
        "data: {shards: a}",
        "model: 3",
        "micro_batch: null",
        "model: {timm_kwargs: {depth: 2, mlp_ratio: 4.0}}",
    ],
)
def test_the_schema_and_the_loader_agree(tmp_path: Path, text: str) -> None:
    """A document the schema refuses the loader refuses too, and the other way round (relations between
    fields, such as min_lr <= lr, are the loader's alone)."""
    import jsonschema

    from ssit_dist.config import json_schema
    from ssit_dist.config.loading import parse_yaml

    path = tmp_path / "run.yaml"
    path.write_text(text)
    schema_ok = jsonschema.Draft202012Validator(json_schema("pretrain")).is_valid(parse_yaml(text))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            load_config(path)
        loader_ok = True
    except ConfigError:
        loader_ok = False
    assert schema_ok == loader_ok, text


def test_the_schema_has_the_help_ranges_and_older_names() -> None:
    from ssit_dist.config import json_schema

    schema = json_schema("finetune")
    lr = schema["properties"]["lr"]
    assert (
        lr["description"].startswith("peak Adam learning rate")
        and {"type": "number", "exclusiveMinimum": 0} in lr["anyOf"]
    )
    assert schema["properties"]["out"]["deprecated"] is True and schema["additionalProperties"] is False
    pretrain = json_schema("pretrain")
    view2 = pretrain["$defs"]["AugmentConfig"]["properties"]["view2"]["default"]
    assert view2["blur_p"] == VIEW2.blur_p != VIEW1.blur_p  # a section's own defaults, not its class's
    with pytest.raises(ConfigError, match="expected one of pretrain, finetune, segment"):
        json_schema("nonsense")


def test_every_name_the_config_package_offers_resolves_as_mypy_sees_it() -> None:
    import ast
    import importlib

    import ssit_dist.config as config

    # The names mypy sees (the TYPE_CHECKING imports) are the names the package resolves at run time.
    tree = ast.parse(Path(config.__file__).read_text())
    typed = {
        alias.asname: (node.module, alias.name)
        for block in tree.body
        if isinstance(block, ast.If)
        for node in block.body
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    }
    assert sorted(typed) == config.__all__
    for name, (module, original) in typed.items():
        assert getattr(config, name) is getattr(importlib.import_module(module), original), name
    with pytest.raises(AttributeError, match="no attribute 'Pretrain'"):
        config.Pretrain  # noqa: B018


@pytest.mark.multiprocess
def test_reading_a_config_of_ones_own_imports_no_model() -> None:
    # `ssit-dist shard` reads its settings through load_config: the model's imports (timm, torch) cost
    # seconds on every call, and the packer needs neither.
    script = (
        "from ssit_dist.config import load_config\n"
        "from ssit_dist.data.packing.options import ShardOptions\n"
        "assert load_config(None, ['size=64'], kind=ShardOptions).size == 64\n"
    )
    assert heavy_imports_after(script) == "[]"


@pytest.mark.multiprocess
def test_reading_a_run_config_and_launching_ranks_import_no_torch() -> None:
    # `ssit-dist finetune|segment --nproc N`, `config` and `slurm` read a run config in a process that
    # trains nothing: torch, timm and DeepSpeed would cost it seconds of CPU on every call.
    script = (
        "from ssit_dist.config import FinetuneConfig, PretrainConfig, SegmentConfig, load_config\n"
        "import ssit_dist.local_launch\n"
        "for kind in (PretrainConfig, FinetuneConfig, SegmentConfig):\n"
        "    assert load_config(None, ['seed=5'], kind=kind).seed == 5\n"
    )
    assert heavy_imports_after(script) == "[]"
