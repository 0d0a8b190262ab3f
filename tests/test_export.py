"""export.py and convert.py: our checkpoints open in transformers (same logits, same greedy text, same token
ids) and in GGUF (tensors and vocabulary read back equal); transformers folders load here; every model no
target computes exactly is refused with one error line and nothing written. Random tiny models, no network."""

import json
import os
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import pytest
import torch

import export
from attention import apply_rope, rope_cos_sin
from gpt import GPT, GPTConfig, swiglu_hidden_size
from gptlab.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from gptlab.convert import FREE, TARGETS, architecture_for
from gptlab.errors import UsageError
from gptlab.hf_folder import checkpoint_from_hf_folder, load_hf_folder, read_hf_tokenizer
from gptlab.tokenizer import EOT, Tokenizer, train_tokenizer

gguf = pytest.importorskip("gguf")

SHAKESPEARE = Path(__file__).resolve().parent.parent / "data" / "shakespeare.txt"
TRICKY_TEXT = "Hello, world!\tTabs\tand\nnew lines\n\n  spaces 🙂🚀 emoji, 日本語の文字 CJK, café" + EOT + "next"
LLAMA = dict(position="rope", norm="rmsnorm", mlp="swiglu", bias=False)
QWEN3 = {**LLAMA, "qk_norm": True, "tie_embeddings": False}  # the speedrun's shape (configs/cpu_speedrun.yaml)
ARCH_SETTINGS = {"gpt2": {}, "llama": LLAMA, "qwen3": QWEN3}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "slice.txt"
    path.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:60_000] + "\t🙂 日本語\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tokenizer(corpus) -> Tokenizer:
    return train_tokenizer([corpus], "bbpe", 300, show_progress=False)


def random_model(vocab_size: int, **kw) -> GPT:
    """A tiny model whose every weight is random (biases and norm gains too, so a misplaced one shows), noisy
    enough that greedy text varies and its choices win by margins (> 0.002) far above float error."""
    torch.manual_seed(0)
    config = dict(vocab_size=vocab_size, block_size=64, embedding_dim=32, num_of_layers=2, num_of_heads=2,
                  dropout=0.0)
    model = GPT(GPTConfig(**{**config, **kw}))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.4)
        model.wte.weight.mul_(1.5)
    return model.eval()


def write_checkpoint(folder: Path, model: GPT, tokenizer: Tokenizer, corpus: Path, **extra) -> Path:
    path = folder / "model_checkpoint.tar"
    save_checkpoint({"model_config": asdict(model.config), "model": model.state_dict(), "tokenizer":
                     tokenizer.to_json(), "config": {"corpus": [str(corpus)], "max_iters": 10}, "iteration": 10,
                     "best_val_loss": 4.25, **extra}, path)
    return path


def run_export(argv: list[str]) -> int:
    try:
        export.main(argv)
    except SystemExit as e:
        return e.code
    return 0


def assert_same_as_transformers(model: GPT, folder: Path) -> None:
    """Logits to 1e-4 and 50 greedy tokens, ours against transformers' from_pretrained(folder)."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    idx = torch.randint(0, model.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx)[0], atol=1e-4, rtol=1e-4)
    prompt = idx[:1, :10]
    ours = model.generate(prompt, 50, temperature=0, eos_id=0)  # both stop after the end-of-text token (id 0)
    theirs = hf.generate(prompt, do_sample=False, max_new_tokens=50)
    assert len(set(ours[0, 10:].tolist())) > 5  # a text, not one token repeated
    assert theirs.tolist() == ours.tolist()


# ---------------------------------------------------------------------- export to transformers

@pytest.mark.parametrize("arch", ["gpt2", "llama", "llama-untied", "qwen3"])
def test_exported_folder_gives_our_logits_generation_and_token_ids(tmp_path, tokenizer, corpus, arch, capsys,
                                                                   transformers):
    kw = {**ARCH_SETTINGS, "llama-untied": {**LLAMA, "tie_embeddings": False, "rope_base": 500.0}}[arch]
    model = random_model(tokenizer.vocab_size, **kw)
    out = tmp_path / "hf"
    ckpt = write_checkpoint(tmp_path, model, tokenizer, corpus)
    metrics = ['{"step": 5, "train_loss": 5.0, "val_loss": 5.125, "val_bpb": 2.5}', '{"step": 8, "loss": 4.0}',
               '{"step": 10, "train_loss": 4.0, "val_loss": 4.375, "val_bpb": 2.0625, "time_s": 3.0}']
    ckpt.with_name("model_checkpoint.metrics.jsonl").write_text("\n".join(metrics) + "\n")
    assert run_export(["--checkpoint", str(ckpt), "--out", str(out)]) == 0
    expected = {"gpt2": "GPT2LMHeadModel", "qwen3": "Qwen3ForCausalLM"}.get(arch, "LlamaForCausalLM")
    assert expected in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "generation_config.json",
                                                      "model.safetensors", "special_tokens_map.json",
                                                      "tokenizer.json", "tokenizer_config.json"]
    assert_same_as_transformers(model, out)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    ids = tokenizer.encode(TRICKY_TEXT)
    assert hf_tokenizer(TRICKY_TEXT)["input_ids"] == ids
    assert hf_tokenizer.decode(ids) == tokenizer.decode(ids) == TRICKY_TEXT
    card = (out / "README.md").read_text(encoding="utf-8")
    assert f"{corpus.stat().st_size:,} bytes" in card and "optimiser steps: 10" in card
    assert "(step 10): 4.3750 nats per token, 2.0625 bits per byte" in card and "best validation loss: 4.2500" in card


def test_the_character_bpe_tokenizer_exports_exactly_to_transformers(tmp_path, corpus, transformers):
    bpe = train_tokenizer([corpus], "bpe", 300, show_progress=False)
    ckpt = write_checkpoint(tmp_path, random_model(bpe.vocab_size), bpe, corpus)
    assert run_export(["--checkpoint", str(ckpt), "--out", str(tmp_path / "hf")]) == 0
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ids = bpe.encode(TRICKY_TEXT)
    assert bpe.hf.token_to_id("<unk>") in ids  # characters it never saw
    assert hf_tokenizer(TRICKY_TEXT)["input_ids"] == ids and hf_tokenizer.decode(ids) == bpe.decode(ids)
    assert hf_tokenizer.unk_token == "<unk>"


def test_a_classifier_checkpoint_exports_its_language_model_and_says_so(tmp_path, tokenizer, corpus, capsys):
    model = random_model(tokenizer.vocab_size)
    head = {"weight": torch.zeros(2, 32), "bias": torch.zeros(2)}
    ckpt = write_checkpoint(tmp_path, model, tokenizer, corpus, head=head, labels=["neg", "pos"], task="single")
    assert run_export(["--checkpoint", str(ckpt), "--out", str(tmp_path / "hf")]) == 0
    said = capsys.readouterr().out.splitlines()
    assert sum("classifier" in line and "language model" in line for line in said) == 1
    assert_same_as_transformers(model, tmp_path / "hf")


# ---------------------------------------------------------------------- import from transformers

def save_hf_folder(hf_model: torch.nn.Module, tokenizer: Tokenizer, folder: Path) -> None:
    transformers = pytest.importorskip("transformers")
    hf_model.save_pretrained(folder)
    transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer.hf, eos_token=EOT).save_pretrained(folder)


def test_a_transformers_gpt2_folder_loads_trains_here_and_exports_back(tmp_path, tokenizer, corpus, transformers):
    torch.manual_seed(2)
    config = transformers.GPT2Config(vocab_size=tokenizer.vocab_size, n_positions=64, n_embd=32, n_layer=2,
                                     n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    hf = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.4)
    save_hf_folder(hf, tokenizer, tmp_path / "gpt2")
    our_config, state, our_tokenizer = load_hf_folder(tmp_path / "gpt2")
    assert our_tokenizer.encode(TRICKY_TEXT) == tokenizer.encode(TRICKY_TEXT)
    model = GPT(our_config)
    model.load_state_dict(state)
    idx = torch.randint(0, tokenizer.vocab_size, (2, 64), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(idx)[0], hf(idx).logits, atol=1e-4, rtol=1e-4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(3):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    ckpt = write_checkpoint(tmp_path, model.eval(), our_tokenizer, corpus)
    assert run_export(["--checkpoint", str(ckpt), "--out", str(tmp_path / "back")]) == 0
    assert_same_as_transformers(model, tmp_path / "back")


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_a_transformers_llama_or_qwen3_folder_gives_the_same_logits_here(tmp_path, tokenizer, arch, transformers):
    torch.manual_seed(4)
    config_class, model_class = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                                 "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM)}[arch]
    config = config_class(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                          num_key_value_heads=2, head_dim=16, intermediate_size=swiglu_hidden_size(32),
                          max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=1000.0, tie_word_embeddings=False)
    hf = model_class(config).eval()
    with torch.no_grad():  # norm gains away from 1, so a QK-norm gain left out shows
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    save_hf_folder(hf, tokenizer, tmp_path / arch)
    model, _ = model_from_checkpoint(checkpoint_from_hf_folder(tmp_path / arch), "cpu")
    c = model.config
    assert (c.position, c.norm, c.mlp, c.bias, c.rope_base, c.tie_embeddings, c.qk_norm) == \
        ("rope", "rmsnorm", "swiglu", False, 1000.0, False, arch == "qwen3")
    idx = torch.randint(0, tokenizer.vocab_size, (2, 64), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(idx)[0], hf(idx).logits, atol=1e-4, rtol=1e-4)


def test_a_llama_tokenizer_without_endoftext_has_its_eos_token_stand_for_it(tmp_path, corpus):
    tok = train_tokenizer([corpus], "bbpe", 300, show_progress=False)
    folder = tmp_path / "llama-tok"
    folder.mkdir()
    (folder / "tokenizer.json").write_text(tok.to_json().replace(EOT, "</s>"), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text('{"eos_token": "</s>"}', encoding="utf-8")
    ours = read_hf_tokenizer(folder)
    assert ours.eot_id == tok.eot_id and ours.encode("To be, or not") == tok.encode("To be, or not")


def test_a_hub_name_is_refused_without_downloading(tmp_path):
    with pytest.raises(UsageError, match="is not a local folder; nothing is downloaded"):
        load_hf_folder("openai-community/gpt2")
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(UsageError, match="only gpt2 .*, llama .* and qwen3"):
        load_hf_folder(tmp_path)


# ---------------------------------------------------------------------- GGUF

def interleaved_rope(x: torch.Tensor, base: float) -> torch.Tensor:
    """llama.cpp's llama rotation: features (2i, 2i + 1) turn together at base^(-2i / D). x: (T, D)."""
    t, d = x.shape
    angle = torch.arange(t)[:, None] * base ** -(torch.arange(0, d, 2) / d)[None, :]
    even, odd = x[:, 0::2], x[:, 1::2]
    return torch.stack([even * angle.cos() - odd * angle.sin(), odd * angle.cos() + even * angle.sin()],
                       dim=-1).reshape(t, d)


def read_gguf(path: Path) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    reader = gguf.GGUFReader(path)
    tensors = {t.name: torch.from_numpy(t.data.copy()) for t in reader.tensors}
    return (tensors, list(reader.fields["tokenizer.ggml.tokens"].contents()),
            list(reader.fields["tokenizer.ggml.merges"].contents()))


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen3"])
def test_gguf_reads_back_with_every_tensor_and_the_vocabulary(tmp_path, tokenizer, corpus, arch):
    model = random_model(tokenizer.vocab_size, **ARCH_SETTINGS[arch])
    out = tmp_path / "gguf"
    assert run_export(["--checkpoint", str(write_checkpoint(tmp_path, model, tokenizer, corpus)), "--out", str(out),
                       "--format", "gguf"]) == 0
    tensors, tokens, merges = read_gguf(out / "model.gguf")
    reader = gguf.GGUFReader(out / "model.gguf")
    assert reader.fields["general.architecture"].contents() == arch
    vocab = tokenizer.hf.get_vocab(with_added_tokens=True)
    assert tokens == sorted(vocab, key=vocab.get)
    assert len(merges) == tokenizer.vocab_size - 256 - 1  # every token but the bytes and <|endoftext|> is a merge
    sd = model.state_dict()
    assert torch.equal(tensors["token_embd.weight"], sd["wte.weight"])
    assert torch.equal(tensors["output_norm.weight"], sd["ln_f.weight"])
    allowed = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[gguf.MODEL_ARCH[arch.upper()]]}
    assert {n.rsplit(".", 1)[0].replace(".0.", ".{bid}.").replace(".1.", ".{bid}.") for n in tensors} <= allowed
    if arch == "gpt2":  # every weight once, plus the tied head written out as "output"
        assert sum(t.numel() for t in tensors.values()) == model.num_parameters(False) + sd["wte.weight"].numel()
        assert torch.equal(tensors["blk.1.attn_qkv.weight"], sd["blocks.1.attn.qkv.weight"])
        assert torch.equal(tensors["blk.1.ffn_down.bias"], sd["blocks.1.mlp.proj.bias"])
        return
    assert sum(t.numel() for t in tensors.values()) == model.num_parameters(False)
    assert torch.equal(tensors["blk.1.ffn_gate.weight"], sd["blocks.1.mlp.gate.weight"])
    if arch == "qwen3":  # llama.cpp's qwen3 rotates (i, i + D/2) pairs as we do: q and k rows as they are
        assert torch.equal(tensors["blk.1.attn_q_norm.weight"], sd["blocks.1.attn.q_norm.weight"])
        assert torch.equal(tensors["blk.1.attn_k_norm.weight"], sd["blocks.1.attn.k_norm.weight"])
        assert torch.equal(tensors["blk.1.attn_k.weight"], sd["blocks.1.attn.qkv.weight"].chunk(3)[1])
        assert torch.equal(tensors["output.weight"], sd["lm_head.weight"])
        return
    # q and k: llama.cpp's adjacent-pair rotation of the exported rows gives our attention scores
    x = torch.randn(10, 32)
    q, k, _ = sd["blocks.0.attn.qkv.weight"].chunk(3)
    cos, sin = rope_cos_sin(torch.arange(10), 16, model.config.rope_base)
    for h in range(2):
        rows = slice(16 * h, 16 * (h + 1))
        ours_q, ours_k = apply_rope((x @ q[rows].T)[None, None], cos, sin)[0, 0], \
            apply_rope((x @ k[rows].T)[None, None], cos, sin)[0, 0]
        cpp_q = interleaved_rope(x @ tensors["blk.0.attn_q.weight"][rows].T, model.config.rope_base)
        cpp_k = interleaved_rope(x @ tensors["blk.0.attn_k.weight"][rows].T, model.config.rope_base)
        torch.testing.assert_close(cpp_q @ cpp_k.T, ours_q @ ours_k.T, atol=1e-4, rtol=1e-4)


def test_the_gguf_export_writes_an_ollama_modelfile_for_the_model(tmp_path, tokenizer, corpus, capsys):
    import generate

    model = random_model(tokenizer.vocab_size, **{**QWEN3, "block_size": 48})
    out = tmp_path / "gguf"
    assert run_export(["--checkpoint", str(write_checkpoint(tmp_path, model, tokenizer, corpus)), "--out", str(out),
                       "--format", "gguf"]) == 0
    assert "ollama create NAME -f" in capsys.readouterr().out
    lines = (out / "Modelfile").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "FROM ./model.gguf" and (out / "model.gguf").is_file()
    assert 'TEMPLATE "{{ .Prompt }}"' in lines  # a base model: the prompt as it is, no chat template
    parameters = dict(line.split(" ", 2)[1:] for line in lines if line.startswith("PARAMETER "))
    assert parameters["stop"] == f'"{EOT}"' and tokenizer.hf.token_to_id(EOT) == tokenizer.eot_id
    assert int(parameters["num_ctx"]) == 48 == model.config.block_size
    defaults = generate.GenerateArgs()
    assert float(parameters["temperature"]) == defaults.temperature and int(parameters["top_k"]) == 200


def test_the_speedrun_shape_comes_back_from_its_export_for_generate_evaluate_and_init_from(tmp_path, tokenizer,
                                                                                          corpus, capsys):
    """The README's quick-start model (Qwen3 layout): the exported folder is a --checkpoint for generate.py and
    evaluate.py with the same text and numbers as the checkpoint, and --init_from starts a run from its weights."""
    import evaluate
    import generate
    import playground
    from config import parse_config

    model = random_model(tokenizer.vocab_size, **QWEN3)
    ckpt = write_checkpoint(tmp_path, model, tokenizer, corpus)
    folder = tmp_path / "qwen3"
    assert run_export(["--checkpoint", str(ckpt), "--out", str(folder)]) == 0
    capsys.readouterr()
    text = tmp_path / "text.txt"
    text.write_text(corpus.read_text(encoding="utf-8")[:3000], encoding="utf-8")
    outputs = []
    for source in (ckpt, folder):
        generate.main(["--checkpoint", str(source), "--prompt", "ROMEO.", "--max_new_tokens", "20", "--device", "cpu",
                       "--temperature", "0"])
        evaluate.main([str(text), "--checkpoint", str(source), "--device", "cpu"])
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and "bits/byte" in outputs[0]
    c, flags = parse_config([str(corpus), "--init_from", str(folder), "--checkpoint", str(tmp_path / "ft.tar"),
                             "--out_dir", str(tmp_path / "runs"), "--batch_size", "2", "--eval_iters", "1",
                             "--warmup_iters", "1", "--sample_tokens", "0", "--device", "cpu", "--max_iters", "1",
                             "--eval_interval", "1", "--lr", "0", "--optimizer", "adamw"])
    playground.train(c, flags)
    saved = load_checkpoint(tmp_path / "ft.tar")
    assert saved["model_config"]["qk_norm"] and not saved["model_config"]["tie_embeddings"]
    assert all(torch.equal(saved["model"][name], w) for name, w in model.state_dict().items())


# ---------------------------------------------------------------------- refusals

@pytest.mark.parametrize(("settings", "named"), [
    (dict(qk_norm=True), "--qk_norm"),
    (dict(logit_softcap=30.0), "--logit_softcap 30"),
    (dict(norm_position="post"), "--norm_position post"),
    (dict(mlp="relu2"), "--mlp relu2"),
    (dict(norm="rmsnorm"), "--norm rmsnorm"),  # learned positions with RMSNorm
    (dict(position="none"), "--position none"),
    (dict(tie_embeddings=False), "--no-tie_embeddings"),
    ({**LLAMA, "bias": True}, "--bias"),
    ({**LLAMA, "mlp": "gelu"}, "--mlp gelu"),
    ({**QWEN3, "logit_softcap": 30.0}, "--logit_softcap 30"),
])
@pytest.mark.parametrize("fmt", ["hf", "gguf"])
def test_models_no_target_computes_exactly_are_refused_and_nothing_is_written(tmp_path, tokenizer, corpus, capsys,
                                                                              settings, named, fmt):
    ckpt = write_checkpoint(tmp_path, random_model(tokenizer.vocab_size, **settings), tokenizer, corpus)
    before = sorted(tmp_path.iterdir())
    assert run_export(["--checkpoint", str(ckpt), "--out", str(tmp_path / "out"), "--format", fmt]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and named in err[0]
    for target in ("GPT-2", "Llama", "Qwen3"):  # each says what it lacks and what it would export
        assert f"{target} cannot express" in err[0]
    assert "Qwen3 cannot express" in err[0] and "(it exports --position rope --norm rmsnorm --mlp swiglu " \
        "--no-bias --qk_norm)" in err[0]
    assert sorted(tmp_path.iterdir()) == before


def test_every_model_setting_is_free_or_decided_for_every_target():
    """A setting added to GPTConfig must be declared free (computes the same everywhere) or get a row per target;
    until then a model using it is refused, never exported as a model that computes something else."""
    names = {f.name for f in fields(GPTConfig)}
    for target, allowed in TARGETS.items():
        assert names <= set(allowed) | FREE, (target, names - set(allowed) - FREE)
        assert set(allowed) <= names and not set(allowed) & FREE, target

    @dataclass
    class WithANewSwitch(GPTConfig):
        new_switch: bool = False

    with pytest.raises(UsageError, match="GPT-2 cannot express --no-new_switch.*Qwen3 cannot express "
                                         ".*--no-new_switch"):
        architecture_for(WithANewSwitch())
    assert architecture_for(GPTConfig(**QWEN3)) == "qwen3"


def test_gguf_refuses_the_character_bpe_tokenizer(tmp_path, corpus, capsys):
    bpe = train_tokenizer([corpus], "bpe", 300, show_progress=False)
    ckpt = write_checkpoint(tmp_path, random_model(bpe.vocab_size), bpe, corpus)
    assert run_export(["--checkpoint", str(ckpt), "--out", str(tmp_path / "out"), "--format", "gguf"]) == 2
    assert "bbpe" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_overwrite_replaces_an_earlier_export_and_nothing_else(tmp_path, tokenizer, corpus, capsys):
    ckpt = write_checkpoint(tmp_path, random_model(tokenizer.vocab_size), tokenizer, corpus)
    out = tmp_path / "out"
    for fmt in ("hf", "gguf", "hf"):  # each replaces the earlier export, which holds only an export's files
        assert run_export(["--checkpoint", str(ckpt), "--out", str(out), "--format", fmt, "--overwrite"]) == 0
        assert {p.name for p in out.iterdir()} <= export.EXPORT_FILES
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_checkpoint.tar", "out"]  # no temporary left
    (out / "notes.txt").write_text("mine")
    (out / "data").mkdir()
    assert run_export(["--checkpoint", str(ckpt), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert run_export(["--checkpoint", str(ckpt), "--out", str(out), "--overwrite"]) == 2
    assert "holds what an export does not write (data/, notes.txt)" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "mine" and (out / "model.safetensors").exists()
    theirs = tmp_path / "theirs"  # a transformers folder this project did not write: its names, not our card
    theirs.mkdir()
    for name in ("config.json", "model.safetensors", "README.md"):
        (theirs / name).write_text("theirs")
    assert run_export(["--checkpoint", str(ckpt), "--out", str(theirs), "--overwrite"]) == 2
    assert "is not an earlier export" in capsys.readouterr().err and (theirs / "README.md").read_text() == "theirs"
    assert run_export(["--checkpoint", str(ckpt), "--out", str(ckpt)]) == 2
    assert run_export(["--checkpoint", str(ckpt), "--out", str(tmp_path), "--overwrite"]) == 2
    assert "holds the checkpoint" in capsys.readouterr().err and ckpt.exists()


@pytest.mark.parametrize("named", [".", "", "HERE", "..", "/"])
def test_the_folder_you_are_in_is_never_out(tmp_path, tokenizer, corpus, capsys, monkeypatch, named):
    ckpt = write_checkpoint(tmp_path, random_model(tokenizer.vocab_size), tokenizer, corpus)
    here = tmp_path / "work"
    here.mkdir()
    (here / "mine.txt").write_text("mine")
    monkeypatch.chdir(here)
    for overwrite in ([], ["--overwrite"]):
        assert run_export(["--checkpoint", str(ckpt), "--out", named.replace("HERE", str(here)), *overwrite]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --out ") and err.count("\n") == 1, err
    assert sorted(p.name for p in here.iterdir()) == ["mine.txt"]


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen3"])
def test_llama_cpp_runs_the_gguf_with_our_tokens_and_logits(tmp_path, tokenizer, corpus, arch):
    llama_cpp = pytest.importorskip("llama_cpp")  # llama-cpp-python; see docs/export.md for the recorded run
    model = random_model(tokenizer.vocab_size, **ARCH_SETTINGS[arch])
    out = tmp_path / "gguf"
    assert run_export(["--checkpoint", str(write_checkpoint(tmp_path, model, tokenizer, corpus)), "--out", str(out),
                       "--format", "gguf"]) == 0
    # type_k/type_v 0: a float32 KV cache (llama.cpp's default float16 one moves these sharp logits by ~0.1)
    llm = llama_cpp.Llama(model_path=str(out / "model.gguf"), n_ctx=64, logits_all=True, verbose=False,
                          type_k=0, type_v=0)
    ids = tokenizer.encode(TRICKY_TEXT)
    assert llm.tokenize(TRICKY_TEXT.encode(), add_bos=False, special=True) == ids
    ids = ids[:64]  # block_size
    llm.eval(ids)
    theirs = torch.from_numpy(llm.scores[:len(ids)].copy())
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0][0]
    # measured: max |difference| 4e-3 (gpt2: llama.cpp's GELU reads a float16 table), 4e-4 (llama), 1.4e-5 (qwen3)
    torch.testing.assert_close(theirs, ours, atol=1e-2 if arch == "gpt2" else 1e-3, rtol=0)


def test_playground_starts_from_a_transformers_folder_and_refuses_contradicting_flags(tmp_path, tokenizer, corpus,
                                                                                      transformers):
    """--init_from: the run takes the folder's shape, weights and tokenizer (with --lr 0 the weights it saves are
    the folder's own)."""
    import playground
    from config import parse_config

    torch.manual_seed(5)
    config = transformers.GPT2Config(vocab_size=tokenizer.vocab_size, n_positions=32, n_embd=32, n_layer=2,
                                     n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    save_hf_folder(transformers.GPT2LMHeadModel(config).eval(), tokenizer, tmp_path / "gpt2")
    common = [str(corpus), "--init_from", str(tmp_path / "gpt2"), "--out_dir", str(tmp_path / "runs"),
              "--batch_size", "4", "--eval_iters", "1", "--warmup_iters", "1", "--sample_tokens", "0",
              "--dropout", "0", "--device", "cpu", "--max_iters", "3", "--eval_interval", "3", "--lr", "0"]
    with pytest.raises(UsageError, match="--embedding_dim 64 contradicts"):
        playground.train(*parse_config([*common, "--checkpoint", str(tmp_path / "x.tar"), "--embedding_dim", "64"]))
    c, flags = parse_config([*common, "--checkpoint", str(tmp_path / "ft.tar")])
    playground.train(c, flags)
    saved = load_checkpoint(tmp_path / "ft.tar")
    assert (saved["model_config"]["embedding_dim"], saved["model_config"]["num_of_layers"]) == (32, 2)
    assert saved["model_config"]["block_size"] == 32
    assert Tokenizer.from_json(saved["tokenizer"]).encode(TRICKY_TEXT) == tokenizer.encode(TRICKY_TEXT)
    _, folder_weights, _ = load_hf_folder(tmp_path / "gpt2")
    assert saved["iteration"] == 3
    assert all(torch.equal(saved["model"][name], folder_weights[name]) for name in folder_weights)


def test_the_model_card_reads_a_metrics_file_whose_last_line_a_kill_tore(tmp_path):
    """The one metrics reader (gptlab.metrics): a torn last line, a blank line or a stray value is skipped."""
    ckpt = tmp_path / "model_checkpoint.tar"
    ckpt.with_name("model_checkpoint.metrics.jsonl").write_text(
        '{"step": 5, "train_loss": 5.0, "val_loss": 5.125, "val_bpb": 2.5}\n\n42\n{"step": 6, "val_lo')
    assert export.final_evaluation({"iteration": 6}, ckpt)["val_loss"] == 5.125


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tokenizer, corpus) -> Path:
    """A tiny GPT-2 exported to a Hugging Face folder, for tests to copy and damage."""
    folder = tmp_path_factory.mktemp("exported")
    ckpt = write_checkpoint(folder, random_model(tokenizer.vocab_size), tokenizer, corpus)
    assert run_export(["--checkpoint", str(ckpt), "--out", str(folder / "hf")]) == 0
    return folder / "hf"


def _damage(folder: Path, case: str) -> None:
    """One way a Hugging Face folder a user names can be broken (truncated, random, wrong shape)."""
    weights = folder / "model.safetensors"
    config = json.loads((folder / "config.json").read_text())
    if case == "truncated safetensors":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif case == "random safetensors":
        weights.write_bytes(os.urandom(4096))
    elif case.endswith("pytorch_model.bin"):
        weights.unlink()
        if case == "random pytorch_model.bin":
            (folder / "pytorch_model.bin").write_bytes(os.urandom(4096))
        else:
            torch.save([1, 2, 3], folder / "pytorch_model.bin")
    elif case == "config.json missing a key":
        del config["n_embd"]
        (folder / "config.json").write_text(json.dumps(config))
    elif case == "config.json holding []":
        (folder / "config.json").write_text("[]")
    elif case == "config.json with a word for a number":
        (folder / "config.json").write_text(json.dumps({**config, "n_layer": "two"}))
    elif case == "index without weight_map":
        (folder / "model.safetensors.index.json").write_text("{}")
    elif case == "random tokenizer.json":
        (folder / "tokenizer.json").write_bytes(os.urandom(512))


@pytest.mark.parametrize("case", ["truncated safetensors", "random safetensors", "random pytorch_model.bin",
                                  "a list in pytorch_model.bin", "config.json missing a key", "config.json holding []",
                                  "config.json with a word for a number", "index without weight_map",
                                  "random tokenizer.json"])
def test_a_damaged_hugging_face_folder_is_one_error_line(tmp_path, exported, case):
    folder = tmp_path / "hf"
    shutil.copytree(exported, folder)
    _damage(folder, case)
    with pytest.raises(UsageError) as e:
        checkpoint_from_hf_folder(folder)
    assert str(folder) in str(e.value) and "\n" not in str(e.value)
