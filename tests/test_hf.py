"""Hugging Face checkpoints in and out (jaxscale.hf), against models that transformers itself wrote.

The fixtures in tests/fixtures/hf come from make_fixtures.py there (transformers 5.17, torch 2.11, run on the
GPU machine's CPU): tiny GPT-2 and Llama models with every parameter random, and transformers' float32 logits
for fixed tokens. No torch is needed here. Logits must match to 1e-4 in float32; they differ by at most 2.2e-6
(logits up to 3.8), while a wrong rope theta or scaling moves them by 1.6 and a wrong norm eps by 4e-3.
"""
import dataclasses
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

import jaxscale
import jaxscale.hf as hf
from jaxscale import cli
from jaxscale.config import Config, load_config, save_config
from jaxscale.data import DataError, load_tokenizer, train_tokenizer
from jaxscale.errors import ConfigError
from jaxscale.hf.importer import NOT_WEIGHTS, read_params
from jaxscale.hf.safetensors_io import MAX_SHARD_BYTES
from jaxscale.model.hf_config import model_fields
from jaxscale.training import build_trainer
from jaxscale.training.hf_export import export
from jaxscale.training.loop import open_dataset

FIXTURES = Path(__file__).parent / "fixtures" / "hf"
NAMES = ("gpt2", "llama", "llama-tied")
TOLERANCE = 1e-4


def fixture(name: str) -> tuple[Path, np.ndarray, np.ndarray]:
    directory = FIXTURES / name
    return directory, np.load(directory / "tokens.npy"), np.load(directory / "logits.npy")


def logits_of(model, params, tokens, length) -> np.ndarray:
    return np.asarray(jax.jit(model.apply)(params, jnp.asarray(tokens[:, :length])))[..., :model.cfg.vocab_size]


def reference_loss(tokens: np.ndarray, logits: np.ndarray) -> float:
    """Mean next-token cross-entropy of transformers' logits: what fine-tuning must start from."""
    logits = logits.astype(np.float64)
    top = logits.max(-1, keepdims=True)
    log_probs = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    targets = tokens[:, 1:logits.shape[1] + 1]
    return float(-np.take_along_axis(log_probs, targets[..., None], -1).mean())


def copy_fixture(name: str, tmp_path: Path) -> Path:
    target = tmp_path / name
    shutil.copytree(FIXTURES / name, target)
    return target


def edit_config(directory: Path, **changes) -> None:
    path = directory / "config.json"
    raw = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            raw.pop(key, None)
        else:
            raw[key] = value
    path.write_text(json.dumps(raw))


def fine_tune_config(name: str, tmp_path: Path, *overrides: str) -> Config:
    directory, tokens, logits = fixture(name)
    return load_config("default", [f"model.init_from=hf:{directory}", f"model.seq_len={logits.shape[1]}",
                                   f"train.batch_size={tokens.shape[0]}", "train.compute_dtype=float32",
                                   f"run_dir={tmp_path / 'run'}", *overrides])


def imported_state(config: Config, devices) -> tuple:
    """A trainer and its state started from config.model.init_from, as the training loop starts it."""
    trainer = build_trainer(config, devices)
    return trainer, trainer.init_state()


def save_run(config: Config, trainer, state) -> Path:
    run_dir = config.resolved_run_dir()
    save_config(config, run_dir / "config.yaml")
    trainer.save(state)
    trainer.close()
    return run_dir


# ---------------------------------------------------------------------------------------------------------
# Logits against transformers'


@pytest.mark.parametrize("name", NAMES)
def test_logits_match_transformers_on_one_device(name):
    directory, tokens, expected = fixture(name)
    model, params = hf.load(directory)
    assert all(x.sharding.device_set == {jax.devices()[0]} for x in jax.tree.leaves(params))
    assert np.abs(logits_of(model, params, tokens, expected.shape[1]) - expected).max() <= TOLERANCE


@pytest.mark.parametrize("name", NAMES)
def test_logits_match_transformers_on_a_sharded_mesh(name):
    directory, tokens, expected = fixture(name)
    config = load_config("default", ["mesh.data=1", "mesh.fsdp=4", "mesh.tensor=2"])
    model, params = hf.load(directory, config)
    wqkv = params["blocks"]["wqkv"]  # (layers, embed: fsdp, kv_heads: tensor, groups, head_dim)
    assert wqkv.sharding.spec[1:3] == ("fsdp", "tensor") and len(wqkv.sharding.device_set) == 8
    assert wqkv.addressable_shards[0].data.shape[1:3] == (wqkv.shape[1] // 4, wqkv.shape[2] // 2)
    assert np.abs(logits_of(model, params, tokens, expected.shape[1]) - expected).max() <= TOLERANCE


def test_padding_ids_are_masked_out_of_the_softmax():
    directory, tokens, _ = fixture("gpt2")
    model, params = hf.load(directory)
    assert model.cfg.padded_vocab > model.cfg.vocab_size
    logits = np.asarray(model.apply(params, jnp.asarray(tokens[:, :8])))
    assert (logits[..., model.cfg.vocab_size:] == np.finfo(np.float32).min).all()


def test_transformers_4_config_reads_as_transformers_5(tmp_path):
    """transformers 4 writes rope_theta beside rope_scaling (with "rope_type" or, older, "type");
    transformers 5 writes both inside rope_parameters, as the fixture has it."""
    five = json.loads((FIXTURES / "llama" / "config.json").read_text())
    assert "rope_parameters" in five
    expected = model_fields(FIXTURES / "llama")
    assert expected["rope_theta"] == 500000.0 and expected["rope_scaling"]["factor"] == 8.0
    for type_key in ("rope_type", "type"):
        directory = copy_fixture("llama", tmp_path / type_key)
        scaling = {k: v for k, v in five["rope_parameters"].items() if k not in ("rope_theta", "rope_type")}
        edit_config(directory, rope_parameters=None, rope_theta=five["rope_parameters"]["rope_theta"],
                    rope_scaling={type_key: "llama3", **scaling})
        assert model_fields(directory) == expected
    _, tokens, logits = fixture("llama")
    model, params = hf.load(directory)
    assert np.abs(logits_of(model, params, tokens, logits.shape[1]) - logits).max() <= TOLERANCE


def test_bfloat16_checkpoint_loads(tmp_path):
    directory = copy_fixture("llama-tied", tmp_path)
    tensors = load_file(directory / "model.safetensors")
    save_file({k: v.astype(ml_dtypes.bfloat16) for k, v in tensors.items()}, directory / "model.safetensors",
              metadata={"format": "pt"})
    _, params = hf.load(directory)
    expected = tensors["model.layers.1.mlp.down_proj.weight"].astype(ml_dtypes.bfloat16).astype(np.float32)
    assert params["blocks"]["w_down"].dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(params["blocks"]["w_down"][1]), expected)


def test_special_token_ids_outside_the_vocabulary_are_ignored(tmp_path):
    directory = copy_fixture("gpt2", tmp_path)
    edit_config(directory, pad_token_id=100000, eos_token_id=[299, 5000])
    model, _ = hf.load(directory)
    assert model.cfg.vocab_size == 300


# ---------------------------------------------------------------------------------------------------------
# model.init_from: fine-tuning


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_fine_tuning_starts_at_the_reference_loss(name, tmp_path):
    _, tokens, logits = fixture(name)
    config = fine_tune_config(name, tmp_path, "mesh.data=1", "mesh.fsdp=2", "mesh.tensor=2")
    assert config.model.init_from and config.model.mask_vocab_padding
    trainer, state = imported_state(config, jax.devices()[:4])
    batch = {"tokens": tokens, "segment_ids": np.ones_like(tokens)}
    _, metrics = trainer.train_step(state, jax.device_put(batch, trainer.data_sharding))
    assert float(metrics["loss"]) == pytest.approx(reference_loss(tokens, logits), abs=1e-5)


def test_fine_tuning_with_offloaded_parameters_and_optimizer_starts_at_the_reference_loss(tmp_path):
    """The imported parameters go to pinned_host memory as a fresh state's would; the step reads them there."""
    _, tokens, logits = fixture("llama")
    config = fine_tune_config("llama", tmp_path, "mesh.data=1", "mesh.fsdp=2", "mesh.tensor=2",
                              "train.offload_params=true", "train.offload_optimizer=true")
    trainer, state = imported_state(config, jax.devices()[:4])
    assert {x.sharding.memory_kind for x in jax.tree.leaves(state.params)} == {"pinned_host"}
    assert {x.sharding.memory_kind for x in jax.tree.leaves(state.opt_state) if x.ndim} == {"pinned_host"}
    batch = {"tokens": tokens, "segment_ids": np.ones_like(tokens)}
    _, metrics = trainer.train_step(state, jax.device_put(batch, trainer.data_sharding))
    assert float(metrics["loss"]) == pytest.approx(reference_loss(tokens, logits), abs=1e-5)


def test_init_from_takes_the_shape_from_config_json(tmp_path):
    directory = FIXTURES / "llama"
    config = load_config("gpt2-124m", [f"model.init_from=hf:{directory}"])  # the experiment's model is replaced
    m = config.model
    assert (m.style, m.d_model, m.n_layers, m.n_heads, m.n_kv_heads, m.d_ff, m.vocab_size, m.seq_len) == (
        "llama", 64, 2, 4, 2, 96, 300, 64)
    assert (m.rope_theta, m.rope_scaling.original_max_positions, m.norm_eps, m.tie_embeddings) == (
        500000.0, 64, 1e-6, False)
    assert load_config("default", [f"model.init_from=hf:{directory}", "model.seq_len=16"]).model.seq_len == 16
    same = load_config("default", [f"model.init_from=hf:{directory}", "model.d_model=64", "model.n_kv_heads=2"])
    assert same.model == m


@pytest.mark.parametrize("override, named", [
    ("model.d_model=128", "model.d_model=128 disagrees"),
    ("model.n_kv_heads=4", "model.n_kv_heads=4 disagrees"),
    ("model.tie_embeddings=true", "model.tie_embeddings=True disagrees"),
    ("model.seq_len=65", "or set it <= 64"),
])
def test_init_from_refuses_a_model_key_that_disagrees(override, named):
    with pytest.raises(ConfigError, match=named) as error:
        load_config("default", [f"model.init_from=hf:{FIXTURES / 'llama'}", override])
    assert str(FIXTURES / "llama" / "config.json") in str(error.value)


def test_gpt2_positions_fix_its_seq_len():
    with pytest.raises(ConfigError, match="model.seq_len=16 disagrees .* gives 32"):
        load_config("default", [f"model.init_from=hf:{FIXTURES / 'gpt2'}", "model.seq_len=16"])


def test_hf_tokenizer_directory(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    train_tokenizer([str(text)], 300, str(tmp_path / "tok" / "tokenizer.json"))
    tokenizer = load_tokenizer(f"hf:{tmp_path / 'tok'}")
    assert tokenizer.vocab_size == 384 and tokenizer.decode(tokenizer.encode_batch(["the fox"])[0]) == "the fox"
    with pytest.raises(DataError, match=r"tokenizer.json does not exist"):
        load_tokenizer(f"hf:{tmp_path}")


# ---------------------------------------------------------------------------------------------------------
# Export


@pytest.mark.parametrize("name", NAMES)
def test_import_export_import_is_bitwise(name, tmp_path):
    directory, tokens, logits = fixture(name)
    config = fine_tune_config(name, tmp_path, "mesh.data=1", "mesh.fsdp=4", "mesh.tensor=2", "train.batch_size=8")
    trainer, state = imported_state(config, jax.devices())
    run_dir = save_run(config, trainer, state)
    out = tmp_path / "exported"
    export(run_dir, out, max_shard_bytes=200_000 if name == "llama" else MAX_SHARD_BYTES)

    original = {}
    for file in directory.glob("*.safetensors"):
        original.update({k: v for k, v in load_file(file).items() if not NOT_WEIGHTS.search(k)})
    exported = {}
    for file in out.glob("*.safetensors"):
        with safe_open(str(file), framework="numpy") as f:
            assert f.metadata() == {"format": "pt"}
            exported.update({k: f.get_tensor(k) for k in f.keys()})
    assert exported.keys() == {k for k in original if k != "lm_head.weight" or not config.model.tie_embeddings}
    for key, value in exported.items():
        assert value.dtype == original[key].dtype and np.array_equal(value, original[key]), key
    if name == "llama":  # split like transformers' shards, with an index naming each tensor's file
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == exported.keys() and len(set(index["weight_map"].values())) > 1

    _, again = hf.load(out)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), again, state.params)


@pytest.mark.parametrize("name", NAMES)
def test_exported_config_keeps_what_transformers_reads(name, tmp_path):
    directory, _, _ = fixture(name)
    config = fine_tune_config(name, tmp_path)
    trainer, state = imported_state(config, jax.devices()[:1])
    out = export(save_run(config, trainer, state), tmp_path / "exported")
    written = json.loads((out / "config.json").read_text())
    source = json.loads((directory / "config.json").read_text())
    shared = {"architectures", "model_type", "vocab_size", "tie_word_embeddings", "bos_token_id", "eos_token_id"}
    shared |= ({"n_embd", "n_layer", "n_head", "layer_norm_epsilon", "activation_function", "n_positions"}
               if name == "gpt2" else {"hidden_size", "intermediate_size", "num_hidden_layers", "rms_norm_eps",
                                       "num_attention_heads", "num_key_value_heads", "hidden_act", "head_dim"})
    for key in shared:
        assert written[key] == source.get(key, written[key] if key == "head_dim" else None), key
    fields = model_fields(out)
    if name != "gpt2":  # a Llama's max_position_embeddings is the context fine-tuning used
        fields["seq_len"] = model_fields(directory)["seq_len"]
    assert fields == model_fields(directory)


def test_export_cli_writes_the_tokenizer_and_picks_a_step(tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    train_tokenizer([str(text)], 300, str(tmp_path / "tok" / "tokenizer.json"))
    config = fine_tune_config("llama-tied", tmp_path, f"data.tokenizer=hf:{tmp_path / 'tok'}")
    trainer, state = imported_state(config, jax.devices()[:1])
    save_run(config, trainer, state)
    changed = state.replace(step=state.step + 5, params=jax.tree.map(lambda x: x + 1, state.params))
    run_dir = save_run(config, trainer, changed)

    assert cli.main(["export", str(run_dir), "--hf", str(tmp_path / "at-0"), "--step", "0"]) == 0
    assert "AutoModelForCausalLM.from_pretrained" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "at-0").iterdir()) == ["config.json", "model.safetensors",
                                                                     "tokenizer.json"]
    assert (tmp_path / "at-0" / "tokenizer.json").read_bytes() == (tmp_path / "tok" / "tokenizer.json").read_bytes()
    _, at_0 = hf.load(tmp_path / "at-0")
    np.testing.assert_array_equal(np.asarray(at_0["final_norm"]), np.asarray(state.params["final_norm"]))
    assert cli.main(["export", str(run_dir), "--hf", str(tmp_path / "newest")]) == 0
    _, newest = hf.load(tmp_path / "newest")
    np.testing.assert_array_equal(np.asarray(newest["final_norm"]), np.asarray(changed.params["final_norm"]))

    assert cli.main(["export", str(run_dir), "--hf", str(tmp_path / "at-3"), "--step", "3"]) == 2
    assert "no checkpoint of that step; it has 0, 5" in capsys.readouterr().err
    assert not (tmp_path / "at-3").exists()


def test_export_refuses_before_writing_anything(tmp_path):
    config = fine_tune_config("llama-tied", tmp_path)
    trainer, state = imported_state(config, jax.devices()[:1])
    run_dir = save_run(config, trainer, state)
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="already exists and is not an empty directory"):
        export(run_dir, occupied)
    assert [p.name for p in occupied.iterdir()] == ["notes.txt"]
    with pytest.raises(ConfigError, match="config.yaml does not exist"):
        export(tmp_path, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_export_refuses_a_gpt2_with_grouped_query_attention(tmp_path):
    config = load_config("default", ["model.n_kv_heads=2"])
    run_dir = tmp_path / "run"
    save_config(config, run_dir / "config.yaml")  # refused before the checkpoint is looked at
    with pytest.raises(ConfigError, match="GPT2LMHeadModel has no grouped-query attention"):
        export(run_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------
# Bad checkpoints: a clear error naming the file and the field


def _truncate(directory: Path) -> str:
    file = sorted(directory.glob("*.safetensors"))[0]
    data = file.read_bytes()
    file.write_bytes(data[:len(data) - 1000])
    return f"{file.name} is not a readable safetensors file"


def _int8_tensor(directory: Path) -> str:
    tensors = load_file(directory / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"].astype(np.int8)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    return "tensor model.norm.weight has dtype I8"


def _wrong_shape(directory: Path) -> str:
    edit_config(directory, intermediate_size=128)
    return r"tensor model.layers.0.mlp.gate_proj.weight has shape \(64, 32\), but .*config.json implies \(128, 32\)"


def _lost_lm_head(directory: Path) -> str:
    edit_config(directory, tie_word_embeddings=False)
    return "no tensor lm_head.weight.*sets tie_word_embeddings=false"


def _missing_shard(directory: Path) -> str:
    sorted(directory.glob("model-*.safetensors"))[-1].unlink()
    return "model.safetensors.index.json names model-.*, which does not exist"


CASES = {
    "missing config.json": ("gpt2", lambda d: (d / "config.json").unlink() or "config.json does not exist"),
    "missing weights": ("gpt2", lambda d: (d / "model.safetensors").unlink() or "has neither model.safetensors"),
    "architecture": ("gpt2", lambda d: edit_config(d, architectures=["MistralForCausalLM"]) or
                     r"architectures=\['MistralForCausalLM'\].* is not supported"),
    "sliding window": ("llama-tied", lambda d: edit_config(d, sliding_window=4096) or
                       "sliding_window=4096 is not supported"),
    "rope type": ("llama", lambda d: edit_config(d, rope_parameters={"rope_type": "yarn", "rope_theta": 1e4,
                                                                     "factor": 4.0}) or
                  "rope_parameters.rope_type='yarn' is not supported"),
    "activation": ("gpt2", lambda d: edit_config(d, activation_function="relu") or
                   "activation_function='relu' is not supported"),
    "attention bias": ("llama-tied", lambda d: edit_config(d, attention_bias=True) or
                       "attention_bias=True is not supported"),
    "dtype": ("llama-tied", _int8_tensor),
    "shape": ("llama-tied", _wrong_shape),
    "untied without lm_head": ("llama-tied", _lost_lm_head),
    "truncated": ("gpt2", _truncate),
    "missing shard": ("llama", _missing_shard),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_checkpoints_are_refused_with_the_file_and_field(case, tmp_path):
    name, damage = CASES[case]
    directory = copy_fixture(name, tmp_path)
    expected = damage(directory)
    with pytest.raises(ConfigError, match=expected) as error:
        hf.load(directory)
    assert str(directory) in str(error.value)
    with pytest.raises(ConfigError, match=expected):  # the same check when training starts from it
        config = load_config("default", [f"model.init_from=hf:{directory}"])
        build = build_trainer(config, jax.devices()[:1])
        hf.initial_params(config, build.abstract_state().params)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_any_block_of_a_fused_parameter_reads_as_the_whole(name):
    """Blocks cut across layers, KV heads and the fused q/k/v groups hold what the whole tensor holds there."""
    directory, _, _ = fixture(name)
    model, params = hf.load(directory)
    mesh = jax.make_mesh((2, 2, 2), ("x", "y", "z"), devices=jax.devices())
    specs = {("blocks", "wqkv"): ("x", None, "y", "z") if name == "llama" else ("x", "y", "z"),  # gpt2: (L, d, H, 3, hd)
             ("blocks", "bqkv"): ("x", "y", None, "z")}

    def layout(path, s):
        spec = jax.sharding.PartitionSpec(*specs.get(tuple(k.key for k in path), ()))
        return jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=jax.sharding.NamedSharding(mesh, spec))

    abstract = jax.tree_util.tree_map_with_path(layout, model.shapes)
    again = read_params(directory, model.cfg, abstract)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), again, params)
    assert len({str(s.index) for s in again["blocks"]["wqkv"].addressable_shards}) == 8


@pytest.mark.slow
def test_jaxscale_train_fine_tunes_from_the_imported_weights(tmp_path):
    """The training loop starts from model.init_from: its first loss is the imported model's on that batch, not
    a randomly initialized model's."""
    config = fine_tune_config("gpt2", tmp_path, "train.steps=2", "train.eval_every=0", "train.log_every=1",
                              "train.batch_size=8",
                              "train.progress=false", "optimizer.learning_rate=1e-6")
    first = jaxscale.train(config).metrics[0]["loss"]
    random_start = jaxscale.train(dataclasses.replace(
        config, model=dataclasses.replace(config.model, init_from=""),
        run_dir=str(tmp_path / "random"))).metrics[0]["loss"]
    trainer, state = imported_state(config, jax.devices())
    assert first != random_start
    batch = open_dataset(config).batch(0, config.train.batch_size)
    _, metrics = trainer.train_step(state, jax.device_put(batch, trainer.data_sharding))
    assert first == pytest.approx(float(metrics["loss"]), rel=1e-6)
