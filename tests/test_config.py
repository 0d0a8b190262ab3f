"""config.py: defaults <- YAML <- flags, and every mistake is a one-line UsageError."""

from pathlib import Path

import pytest

from config import TrainConfig, parse_config
from gptlab.errors import UsageError

REPO = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return str(path)


def test_yaml_fills_defaults_and_flags_override_yaml(tmp_path):
    cfg = write(tmp_path, "embedding_dim: 64\nlr: 1.0e-3\nnum_of_heads: 2\ncorpus: a.txt\n")
    c, set_by_flags = parse_config(["--config", cfg, "--lr", "2e-3", "b.txt", "c.txt"])
    assert c.model.embedding_dim == 64  # from YAML
    assert c.model.num_of_heads == 2  # from YAML
    assert c.lr == 2e-3  # the flag beats the YAML
    assert c.corpus == ("b.txt", "c.txt")  # positional corpus beats the YAML's
    assert c.model.num_of_layers == TrainConfig().model.num_of_layers  # neither: the default
    assert set_by_flags == {"lr", "corpus"}


def test_yaml_scientific_notation_without_dot_is_a_float(tmp_path):
    c, _ = parse_config(["--config", write(tmp_path, "lr: 6e-4\n")])
    assert c.lr == 6e-4


def test_no_corpus_means_the_bundled_one():
    c, _ = parse_config([])
    assert Path(c.corpus[0]) == REPO / "data" / "shakespeare.txt"


@pytest.mark.parametrize("text, message", [
    ("embeding_dim: 64\n", "unknown config key(s): embeding_dim"),
    ("embedding_dim: wide\n", "'embedding_dim' must be of type int"),
    ("dropout: [0.1]\n", "'dropout' must be of type float"),
    ("compile: 1\n", "'compile' must be of type bool"),
    ("lr_schedule: triangle\n", "--lr_schedule must be one of"),
    ("- just\n- a list\n", "must hold a mapping"),
    ("lr: [unclosed\n", "not valid YAML"),
    ("lr: 0.001\nbatch_size: 8\nlr: 0.002\n", "not valid YAML: duplicate key 'lr' (line 3)"),
])
def test_bad_yaml_is_a_usage_error(tmp_path, text, message):
    with pytest.raises(UsageError, match=None) as e:
        parse_config(["--config", write(tmp_path, text)])
    assert message in str(e.value)


@pytest.mark.parametrize("argv, message", [
    (["--embedding_dim", "abc"], "--embedding_dim: not an integer: 'abc'"),
    (["--lr", "fast"], "--lr: not a number: 'fast'"),
    (["--lr", "nan"], "--lr must be a finite number"),
    (["--beta1", "1.5"], "--beta1 must be in [0, 1)"),
    (["--beta2", "-0.5"], "--beta2 must be in [0, 1)"),
    (["--min_lr=-1e-4"], "--min_lr must be a number >= 0"),
    (["--seed", "-1"], "--seed must be an integer >= 0"),
    (["--seed", "100000000000000000000"], "--seed is out of range"),
    (["--num_of_layers", "99999999999999999999999"], "--num_of_layers is out of range"),
    (["--vocab_size", "1000000000"], "--vocab_size 1000000000 is above the largest supported"),
    (["--eval_interval", "-5"], "--eval_interval must be a positive integer"),
    (["--checkpoint_interval", "0"], "--checkpoint_interval must be a positive integer"),
    (["--embedding_dim", "100", "--num_of_heads", "3"], "not divisible by --num_of_heads"),
    (["--dropout", "1.5"], "--dropout must be in [0, 1)"),
    (["--min_lr", "1", "--lr", "0.1"], "above --lr"),
    (["--no_such_flag", "1"], "unrecognized arguments"),
    (["--config", "missing.yaml"], "cannot read config file missing.yaml"),
])
def test_bad_flags_are_usage_errors(argv, message):
    with pytest.raises(UsageError) as e:
        parse_config(argv)
    assert message in str(e.value)


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    c, _ = parse_config(["--config", str(path)])
    assert c.model.embedding_dim % c.model.num_of_heads == 0


def test_config_round_trips_through_a_plain_dict():
    c, _ = parse_config(["x.txt", "--embedding_dim", "64", "--num_of_heads", "2", "--no-bias"])
    d = c.to_dict()
    assert all(isinstance(v, (str, int, float, bool, list, type(None))) for v in d.values())
    assert TrainConfig.from_dict(d) == c


@pytest.mark.parametrize("text, message", [
    ("1: 2\n", "unknown config key(s): 1"),
    ("block_size: null\n", "config key 'block_size' cannot be empty"),
    ("num_of_layers: 99999999999999999999999\n", "--num_of_layers is out of range"),
    ("lr: [1, 2]\n", "config key 'lr' must be of type float"),
])
def test_bad_yaml_values_are_usage_errors(tmp_path, text, message):
    with pytest.raises(UsageError) as e:
        parse_config(["--config", write(tmp_path, text)])
    assert message in str(e.value)


def test_a_yaml_file_that_is_not_utf8_is_a_usage_error(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("lr: 1.0e-3 # caf\xe9\n".encode("latin-1"))
    with pytest.raises(UsageError, match="cannot read config file"):
        parse_config(["--config", str(path)])


def test_every_model_setting_is_declared_once_and_is_a_flag():
    """The model's flags come from GPTConfig's declarations: TrainConfig declares none of them again."""
    import dataclasses

    from gpt import GPTConfig
    from gptlab.cli import flag_fields
    model_flags = {f.name for f in flag_fields(GPTConfig)}
    assert {"block_size", "embedding_dim", "num_of_layers", "num_of_heads", "dropout"} <= model_flags
    assert not model_flags & {f.name for f in dataclasses.fields(TrainConfig)}
    c, _ = parse_config(["--embedding_dim", "64", "--num_of_heads", "2"])
    assert (c.model.embedding_dim, c.model.num_of_heads) == (64, 2)


def test_every_dependent_flag_is_refused_where_it_does_nothing():
    """Derived from the declarations (setting(..., requires=...)): each flag that takes effect only with another
    setting's value is refused when typed without it, and accepted with it."""
    from config import check_dependent_flags
    from gpt import GPTConfig
    from gptlab.cli import flag_fields
    dependent = {f.name: f.metadata["requires"] for cls in (GPTConfig, TrainConfig) for f in flag_fields(cls)
                 if f.metadata.get("requires")}
    assert {"rope_base", "muon_lr", "muon_momentum", "muon_weight_decay", "mask_prob", "decay_fraction",
            "tokenizer_kind", "snapshot_interval", "rollback_lr_factor"} <= set(dependent)
    for name, (needed, value) in dependent.items():
        typed = ["--" + name, str(TrainConfig().to_dict()[name])]
        c, given = parse_config(typed + (["--tokenizer", "t.json"] if value is None else []))
        with pytest.raises(UsageError, match=f"--{name} does nothing (without --{needed} {value}|when --{needed})"):
            check_dependent_flags(c, given)
        if value is not None:
            check_dependent_flags(*parse_config(typed + [f"--{needed}", str(value)]))
