"""config.py: defaults <- YAML <- flags, and every mistake is a one-line UsageError."""

from pathlib import Path

import pytest

from config import TrainConfig, parse_config
from errors import UsageError

REPO = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return str(path)


def test_yaml_fills_defaults_and_flags_override_yaml(tmp_path):
    cfg = write(tmp_path, "embedding_dim: 64\nlr: 1.0e-3\nnum_of_heads: 2\ncorpus: a.txt\n")
    c, set_by_flags = parse_config(["--config", cfg, "--lr", "2e-3", "b.txt", "c.txt"])
    assert c.embedding_dim == 64  # from YAML
    assert c.num_of_heads == 2  # from YAML
    assert c.lr == 2e-3  # the flag beats the YAML
    assert c.corpus == ("b.txt", "c.txt")  # positional corpus beats the YAML's
    assert c.num_of_layers == TrainConfig().num_of_layers  # neither: the default
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
])
def test_bad_yaml_is_a_usage_error(tmp_path, text, message):
    with pytest.raises(UsageError, match=None) as e:
        parse_config(["--config", write(tmp_path, text)])
    assert message in str(e.value)


@pytest.mark.parametrize("argv, message", [
    (["--embedding_dim", "abc"], "invalid int value: 'abc'"),
    (["--lr", "fast"], "invalid float value: 'fast'"),
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
    assert c.embedding_dim % c.num_of_heads == 0


def test_config_round_trips_through_a_plain_dict():
    c, _ = parse_config(["x.txt", "--embedding_dim", "64", "--num_of_heads", "2", "--no-bias"])
    d = c.to_dict()
    assert all(isinstance(v, (str, int, float, bool, list, type(None))) for v in d.values())
    assert TrainConfig.from_dict(d) == c
