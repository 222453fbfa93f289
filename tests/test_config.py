"""asr.config: experiment files, defaults, --set overrides and their errors, --print-config round trip."""

from __future__ import annotations

import subprocess
import sys

import pytest

from asr.config import Config, ConfigError, DataConfig, ModelConfig, SourceConfig, TextConfig, load_config, to_toml
from conftest import REPO

EXPERIMENTS = sorted((REPO / "experiments").glob("*.toml"))


def test_there_are_experiment_files():
    assert EXPERIMENTS, "experiments/*.toml is empty"


@pytest.mark.parametrize("path", EXPERIMENTS, ids=[p.name for p in EXPERIMENTS])
def test_every_experiment_file_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert cfg.data.sources, f"{path.name} names no data source"


def test_defaults_without_a_file():
    cfg = load_config()
    assert cfg == Config()
    assert cfg.data.sources == [] and cfg.data.sample_rate == 16000 and cfg.data.max_duration_s == 30.0
    assert cfg.data.max_label_tokens == 448
    assert cfg.model.layerdrop is None and cfg.train.betas == [0.9, 0.999]


def test_a_file_sets_only_what_differs(tmp_path):
    f = tmp_path / "e.toml"
    f.write_text('[train]\nlr = 3e-4\n\n[[data.sources]]\npath = "somewhere"\n', encoding="utf-8")
    cfg = load_config(f)
    assert cfg.train.lr == 3e-4
    assert cfg.data.sources == [SourceConfig(path="somewhere")]
    expected = Config()
    expected.train.lr, expected.data.sources = 3e-4, [SourceConfig(path="somewhere")]
    assert cfg == expected


@pytest.mark.parametrize("assignment, get, expected", [
    ("train.max_steps=7", lambda c: c.train.max_steps, 7),
    ("train.lr=2e-5", lambda c: c.train.lr, 2e-5),
    ("train.lr=1", lambda c: c.train.lr, 1.0),  # int -> float
    ("data.max_duration_s=20", lambda c: c.data.max_duration_s, 20.0),
    ("run.deterministic=false", lambda c: c.run.deterministic, False),
    ("run.out_dir=runs/x", lambda c: c.run.out_dir, "runs/x"),
    ('run.out_dir="runs/quoted"', lambda c: c.run.out_dir, "runs/quoted"),
    ("model.language=no", lambda c: c.model.language, "no"),  # a str field keeps the text, not a bool
    ("model.name=facebook/wav2vec2-base", lambda c: c.model.name, "facebook/wav2vec2-base"),
    ("train.betas=[0.9, 0.98]", lambda c: c.train.betas, [0.9, 0.98]),
    ("train.betas.1=0.95", lambda c: c.train.betas, [0.9, 0.95]),
    ("model.conv_dim=[32, 32]", lambda c: c.model.conv_dim, [32, 32]),
    ("model.layerdrop=0.1", lambda c: c.model.layerdrop, 0.1),  # float | None
    ("model.mask_time_length=5", lambda c: c.model.mask_time_length, 5),  # int | None
    ('data.text.replace={"â" = "a", "î" = "i"}', lambda c: c.data.text.replace, {"â": "a", "î": "i"}),
    ("data.text.replace.â=a", lambda c: c.data.text.replace, {"â": "a"}),
    ("model.language_map={dv = \"si\"}", lambda c: c.model.language_map, {"dv": "si"}),
    ("model.language_map.dv=true", lambda c: c.model.language_map, {"dv": "true"}),  # dict[str, str] keeps text
    ("data.sources.0.path=../elsewhere", lambda c: c.data.sources[0].path, "../elsewhere"),
    ("data.sources.0.language=de", lambda c: c.data.sources[0].language, "de"),
    ('data.sources=[{kind = "manifest", path = "m"}]', lambda c: c.data.sources,
     [SourceConfig(kind="manifest", path="m")]),
    ("data.text.chars_to_ignore=[,.?!]", lambda c: c.data.text.chars_to_ignore, "[,.?!]"),
])
def test_set_overrides(assignment, get, expected):
    cfg = load_config(REPO / "experiments" / "demo.toml", [assignment])
    value = get(cfg)
    assert value == expected
    assert type(value) is type(expected)


def test_overrides_apply_in_order_after_the_file():
    cfg = load_config(REPO / "experiments" / "demo.toml", ["train.lr=1e-3", "train.lr=5e-4"])
    assert cfg.train.lr == 5e-4
    assert cfg.train.max_steps == 300  # from the file


def one_line_error(path=None, overrides=()) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides))
    message = str(info.value)
    assert message and "\n" not in message
    return message


@pytest.mark.parametrize("assignment, names", [
    ("bad.key=1", "bad.key"),
    ("train.not_a_field=1", "train.not_a_field"),
    ("data.sources.3.path=x", "data.sources.3.path"),
    ("data.sources.0.nope=x", "data.sources.0.nope"),
    ("train.lr=fast", "train.lr"),
    ("train.max_steps=1.5", "train.max_steps"),
    ("data.batch_size=true", "data.batch_size"),
    ("run.deterministic=1", "run.deterministic"),
    ("train.betas=0.9", "train.betas"),
    ('train.betas=["a"]', "train.betas.0"),
    ("train.betas.0=x", "train.betas.0"),
    ("model.layerdrop=abc", "model.layerdrop"),
    ("train.schedule=sometimes", "train.schedule"),
    ("data.text.chars_to_ignore=[a-", "data.text.chars_to_ignore"),
    ("train.lr", "train.lr"),
    ('data.text.replace={"" = "x"}', "data.text.replace"),
])
def test_bad_overrides_raise_one_line_naming_the_key(assignment, names):
    assert names in one_line_error(REPO / "experiments" / "demo.toml", [assignment])


@pytest.mark.parametrize("text, names", [
    ("[train]\nlrr = 1\n", "train.lrr"),
    ("[trian]\nlr = 1\n", "trian"),
    ('[train]\nlr = "high"\n', "train.lr"),
    ("[train]\nmax_steps = 2.5\n", "train.max_steps"),
    ("[[data.sources]]\npath = \"x\"\nsplit = \"a\"\n", "data.sources.0.split"),
    ("[data]\nsources = 3\n", "data.sources"),
    ("[data.text]\nreplace = {a = 1}\n", "data.text.replace.a"),
    ("[train\nlr = 1\n", "invalid TOML"),
])
def test_bad_files_raise_one_line_naming_file_and_key(tmp_path, text, names):
    f = tmp_path / "bad.toml"
    f.write_text(text, encoding="utf-8")
    message = one_line_error(f)
    assert names in message and str(f) in message


def test_missing_file_raises_naming_it(tmp_path):
    missing = tmp_path / "nope.toml"
    assert str(missing) in one_line_error(missing)


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "run.py", *args], cwd=REPO, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args, names", [
    (["--exp", "experiments/demo.toml", "--set", "bad.key=1"], "bad.key"),
    (["--exp", "experiments/demo.toml", "--set", "train.lr=fast"], "train.lr"),
    (["--exp", "experiments/no_such_experiment.toml"], "experiments/no_such_experiment.toml"),
])
def test_cli_config_errors_exit_2_with_one_line(args, names):
    proc = run_cli(*args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert names in lines[0]
    assert proc.stdout == ""


RICH_OVERRIDES = [
    'data.sources=[{kind = "common_voice", path = "a/cv", language = "tr", train = "train+dev"}, '
    '{kind = "manifest", name = "m", path = "b/man", language = "de", dev = "", text_column = "txt"}]',
    'data.text.replace={"â" = "a", "ê" = "e", "a.b" = "c"}',
    "data.text.chars_to_ignore=[\\,\\?\\.\\!\\-\\;\\:\\\"“%‘”�']",
    'model.language_map={dv = "si", xx = ""}',
    "model.layerdrop=0.05",  # one optional field set, the others stay None
    'eval.sets=[{source = "tr", split = "dev", name = "tr"}, {source = "m", split = "test"}]',
    "train.lr=1",
    'run.out_dir=runs/with "quotes" and \\backslash',
]


@pytest.mark.parametrize("path", EXPERIMENTS, ids=[p.name for p in EXPERIMENTS])
def test_print_config_round_trips(tmp_path, path):
    proc = run_cli("--exp", str(path), "--print-config", *[a for o in RICH_OVERRIDES for a in ("--set", o)])
    assert proc.returncode == 0, proc.stderr
    printed = tmp_path / "printed.toml"
    printed.write_text(proc.stdout, encoding="utf-8")
    expected = load_config(path, RICH_OVERRIDES)
    assert load_config(printed) == expected
    assert "[[data.sources]]" in proc.stdout
    assert expected.model.mask_feature_prob is None and expected.model.layerdrop == 0.05


def test_to_toml_round_trips_awkward_values(tmp_path):
    cfg = Config()
    cfg.data = DataConfig(sources=[SourceConfig(path="p\tq", name='n"1'), SourceConfig(kind="hf", path="x/y",
                                                                                      hf_config="tr")],
                          text=TextConfig(replace={"\n": " ", "ü": "u", " ": "_", "a b": "c"}, chars_to_ignore="\\d"))
    cfg.model = ModelConfig(language_map={"dv": ""}, hidden_dropout=0.0, conv_dim=[1, 2], name="é\x01\x7f\r")
    cfg.train.lr = float("1e-300")
    f = tmp_path / "c.toml"
    f.write_text(to_toml(cfg), encoding="utf-8")
    assert load_config(f) == cfg


def test_to_toml_of_defaults_round_trips(tmp_path):
    f = tmp_path / "d.toml"
    f.write_text(to_toml(Config()), encoding="utf-8")
    assert load_config(f) == Config()


# ---------------------------------------------------------------------------------------
# Every numeric setting has a domain, checked at load time (issue 13): --print-config already refuses it.


def numeric_keys(cls=Config, prefix: str = "") -> list[str]:
    """Dotted names of the int/float fields (also in lists and tables) of the config tree; lists of tables
    (data.sources, eval.sets) are walked through their item type."""
    import dataclasses
    import typing

    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, key = hints[f.name], f"{prefix}{f.name}"
        args = typing.get_args(tp)
        if dataclasses.is_dataclass(tp):
            keys += numeric_keys(tp, key + ".")
        elif typing.get_origin(tp) is list and dataclasses.is_dataclass(args[0]):
            keys += numeric_keys(args[0], key + ".N.")
        elif {int, float} & {tp, *args}:
            keys.append(key)
    return keys


def test_every_numeric_setting_has_a_range():
    from asr.config import RANGES

    keys = numeric_keys()
    assert "train.lr" in keys and "model.layerdrop" in keys and "train.betas" in keys and "train.lr_scale" in keys
    assert sorted(set(keys) - set(RANGES)) == []
    assert sorted(set(RANGES) - set(keys)) == []


@pytest.mark.parametrize("assignment", [
    "train.lr=0", "train.lr=-1e-4", "train.lr=nan", "train.lr=inf", "train.log_every=0", "eval.batch_size=0",
    "data.num_workers=-1", "train.max_steps=0", "train.grad_accum=0", "train.warmup_steps=-1",
    "train.clip_grad=-1.0", "train.weight_decay=-0.1", "train.eps=0", "train.betas=[0.9, 1.0]",
    "train.max_bad_steps=0", "train.eval_every=-5", "train.save_every=-1", "model.layerdrop=1.5",
    "model.mask_time_prob=-0.1", "model.hidden_dropout=1.0", "model.conv_stride=[5, 0]", "run.seed=-1",
    "data.min_duration_s=-1", "data.max_batch_s=-2", "data.sample_rate=0", "decode.beam_size=0",
    "decode.max_new_tokens=0", "decode.lm_alpha=-1", "lora.alpha=0", "lora.dropout=1.0", "eval.worst=-1",
    "data.sp_vocab_size=1", "preflight.cps_outlier_factor=1.0", "train.lr_scale={lm_head = -2.0}",
    "data.min_duration_s=40",  # above max_duration_s = 30: nothing would be kept
])
def test_values_outside_their_domain_exit_2_with_one_line_at_print_config(assignment, capsys):
    import run

    assert run.main(["--exp", str(REPO / "experiments" / "demo.toml"), "--set", assignment, "--print-config"]) == 2
    err = capsys.readouterr().err.strip()
    key = assignment.split("=")[0]
    assert err.startswith(f"error: {key}") and "\n" not in err, err


@pytest.mark.parametrize("assignment", ["train.lr=1e-4", "data.max_duration_s=0", "train.clip_grad=0",
                                        "model.layerdrop=0.0", "decode.lm_beta=-2.0", "train.keep_last=5"])
def test_values_at_the_edges_of_their_domain_load(assignment):
    load_config(REPO / "experiments" / "demo.toml", [assignment])
