"""Fine-tuning: the SFT loss mask and packing, the DPO loss against a hand computation, the same numbers on every
mesh layout, and bad data named by file and line."""
import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxscale.cli import main
from jaxscale.config import Config, MeshConfig, OptimizerConfig, TrainConfig
from jaxscale.data.tokenizers import ByteTokenizer
from jaxscale.errors import ConfigError
from jaxscale.kernels.cross_entropy import cross_entropy
from jaxscale.model import ModelConfig
from jaxscale.parallel.moe_config import MoEConfig
from jaxscale.posttrain.chat import BuiltinTemplate, load_template
from jaxscale.posttrain.config import PosttrainConfig
from jaxscale.posttrain.losses import dpo_loss, sft_loss
from jaxscale.posttrain.rows import build_rows
from jaxscale.training import build_trainer
from jaxscale.training.language_model import model_options
from jaxscale.training.posttrain import open_posttrain_data
from jaxscale.training.reference import attach_reference

SEQ_LEN = 64


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("posttrain")
    sft, dpo = [], []
    for i in range(64):
        a, b = (int(x) for x in rng.integers(0, 100, 2))
        sft.append({"prompt": f"{a}+{b}=", "response": str(a + b)} if i % 2 else
                   {"messages": [{"role": "system", "content": "add"}, {"role": "user", "content": f"{a}+{b}="},
                                 {"role": "assistant", "content": str(a + b)}]})
        dpo.append({"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + 1)})
    return {"sft": write_jsonl(root / "sft.jsonl", sft), "dpo": write_jsonl(root / "dpo.jsonl", dpo)}


def save_dataset(path, records, **splits):
    """`records` as a Hugging Face dataset written by save_to_disk (with `splits`: a DatasetDict of them and
    records as its "train" split); the rows get every field of any record, None where one lacks it."""
    datasets = pytest.importorskip("datasets")

    def table(rows):  # Dataset.from_list would take its columns from the first record only
        columns = dict.fromkeys(key for row in rows for key in row)
        return datasets.Dataset.from_dict({key: [row.get(key) for row in rows] for key in columns})

    dataset = table(records)
    if splits:
        dataset = datasets.DatasetDict({"train": dataset, **{name: table(rows) for name, rows in splits.items()}})
    dataset.save_to_disk(str(path))
    return str(path)


def make_config(method: str, source: str, mesh: dict | None = None, style: str = "gpt2", moe: dict | None = None,
                **posttrain) -> Config:
    model = ModelConfig.from_preset("tiny" if style == "gpt2" else "tiny-llama", seq_len=SEQ_LEN,
                                    moe=MoEConfig(experts=4, top_k=2, **moe) if moe is not None else None)
    return Config(model=model,
                  mesh=MeshConfig(**{"data": 1, **(mesh or {})}),
                  optimizer=OptimizerConfig(learning_rate=1e-3, warmup_steps=0),
                  train=TrainConfig(steps=2, batch_size=8, compute_dtype="float32", eval_every=0),
                  posttrain=PosttrainConfig(method=method, source=source, validation_fraction=0.0, **posttrain))


def stacked(rows, indices):
    return {k: np.stack([rows[i][k] for i in indices]) for k in rows[0]}


def test_the_builtin_template_trains_on_the_assistant_content_and_its_end_only():
    template = BuiltinTemplate(ByteTokenizer())
    ids, mask = template.tokenize([{"role": "user", "content": "2+2="}, {"role": "assistant", "content": "4"}])
    assert bytes(ids[ids < 256].tolist()).decode() == "user: 2+2=\nassistant: 4"
    assert ids[mask].tolist() == [ord("4"), ByteTokenizer.eos_id]  # the answer and the end-of-turn token


def test_a_jinja_chat_template_masks_each_assistant_turn(tmp_path):
    template = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% if m.role == 'assistant' %}{{ eos_token }}"
                "{% endif %}{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template, "eos_token": "</s>"}))
    chat = load_template(f"hf:{tmp_path}", ByteTokenizer())
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                {"role": "user", "content": "2+2="}, {"role": "assistant", "content": "4"}]
    ids, mask = chat.tokenize(messages)
    assert bytes(ids.tolist()).decode() == "<|user|>hi\n<|assistant|>yo</s>\n<|user|>2+2=\n<|assistant|>4</s>\n"
    assert bytes(ids[mask].tolist()).decode() == "yo</s>\n4</s>\n"
    assert bytes(chat.generation_prompt(messages[:1]).tolist()).decode() == "<|user|>hi\n<|assistant|>"


def sft_rows(files, **posttrain):
    cfg = make_config("sft", files["sft"], **posttrain).posttrain
    rows, _ = build_rows(cfg, BuiltinTemplate(ByteTokenizer()), SEQ_LEN + 1, ByteTokenizer.eos_id)
    return rows


def test_packed_rows_keep_each_conversation_apart(files):
    rows = sft_rows(files)
    row = rows[0]
    segments = row["segment_ids"]
    assert segments.max() >= 2  # several conversations share the row
    starts = np.flatnonzero(np.diff(segments) != 0) + 1
    assert not row["loss_mask"][starts].any()  # a conversation's first token is never a target
    assert not row["loss_mask"][segments == 0].any()  # nor padding
    assert rows.conversations == 64


def all_rows(rows):
    return [rows[i] for i in range(len(rows))]


@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_a_saved_hugging_face_dataset_gives_the_rows_of_the_same_jsonl(files, tmp_path, method):
    """hf:<dir> rows hold the JSONL's fields as columns (None where a record lacks one: the SFT file mixes
    "messages" with "prompt"/"response"); they make the same rows and the same held-out split."""
    with open(files[method]) as f:
        directory = save_dataset(tmp_path / "hf", [json.loads(line) for line in f])
    template = BuiltinTemplate(ByteTokenizer())
    built = [build_rows(dataclasses.replace(make_config(method, source).posttrain, validation_fraction=0.25),
                        template, SEQ_LEN + 1, ByteTokenizer.eos_id) for source in (files[method], f"hf:{directory}")]
    for jsonl_rows, hf_rows in zip(*built):  # training rows, then held-out rows
        assert len(hf_rows) == len(jsonl_rows) > 0
        for want, got in zip(all_rows(jsonl_rows), all_rows(hf_rows)):
            assert want.keys() == got.keys()
            for key in want:
                np.testing.assert_array_equal(got[key], want[key])


def dataset_dict_overrides(files, tmp_path, method) -> list[str]:
    """A run's settings with posttrain.source and validation_source the "train" and "test" splits of one saved
    DatasetDict (48 and 16 of the fixture's examples)."""
    with open(files[method]) as f:
        records = [json.loads(line) for line in f]
    directory = save_dataset(tmp_path / "hf", records[:48], test=records[48:])
    return [f"posttrain.method={method}", f"posttrain.source=hf:{directory}",
            f"posttrain.validation_source=hf:{directory}", "model.d_model=32", "model.n_layers=1", "model.n_heads=2",
            f"model.seq_len={SEQ_LEN}", "train.steps=2", "train.batch_size=8", "train.eval_every=2",
            "train.eval_batches=1", "train.progress=false", f"run_dir={tmp_path / 'run'}"]


@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_a_dataset_dict_gives_training_and_held_out_examples_from_the_named_splits(files, tmp_path, method):
    """posttrain.hf_split (train) and posttrain.validation_hf_split (test) pick the splits; a split that is not
    there is named with its setting."""
    import jaxscale

    overrides = dataset_dict_overrides(files, tmp_path, method)
    with pytest.raises(ConfigError, match=r"has splits \['test', 'train'\], not 'validation'; set "
                                          r"posttrain.validation_hf_split"):
        open_posttrain_data(jaxscale.load_config("default", [*overrides, "posttrain.validation_hf_split=validation"]))
    train, held = open_posttrain_data(jaxscale.load_config("default", overrides))
    counts = (train.conversations, held.conversations) if method == "sft" else (len(train), len(held))
    assert counts == (48, 16)


@pytest.mark.slow  # 40-60 s each on the shared 2-core CPU machine: train, eval (DPO: reference) steps compiled
@pytest.mark.parametrize("method, reference", [("sft", "cached"), ("dpo", "frozen")])
def test_a_run_trains_on_a_dataset_dicts_split_evaluates_on_another_and_exports(files, tmp_path, method, reference):
    """Trained on the "train" split, evaluated on "test", then exported as a Hugging Face checkpoint (DPO's frozen
    reference is in the checkpointed state): imported again, it computes the trained model's logits."""
    import jaxscale
    from jaxscale.training.hf_export import export

    overrides = [*dataset_dict_overrides(files, tmp_path, method), f"posttrain.reference={reference}"]
    result = jaxscale.train(jaxscale.load_config("default", overrides))
    rows = result.metrics
    evaluated = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2] and [r["step"] for r in evaluated] == [2]
    assert math.isfinite(evaluated[0]["eval_loss"])
    if method == "dpo":
        assert {"eval_reward_accuracy", "eval_reward_margin", "eval_kl_to_reference"} <= evaluated[0].keys()

    out = export(tmp_path / "run", tmp_path / "exported")
    config = jaxscale.load_config("default", [f"model.init_from=hf:{out}", f"model.seq_len={SEQ_LEN}"])
    imported = build_trainer(config, jax.devices()[:1])
    tokens = jnp.asarray(stacked(open_posttrain_data(jaxscale.load_config("default", overrides))[0], range(2))[
        "tokens" if method == "sft" else "chosen_tokens"])[:, :-1]
    vocab = config.model.vocab_size
    trained = result.model.bind(jax.device_get(result.state.params))(tokens, None, compute_dtype=jnp.float32)
    again = imported.model.bind(imported.init_state().params)(tokens, None, compute_dtype=jnp.float32)
    np.testing.assert_array_equal(np.asarray(again)[..., :vocab], np.asarray(trained)[..., :vocab])


def tiny_model(config):
    trainer = build_trainer(config, jax.devices()[:1])
    params = trainer.init_state().params
    return trainer, trainer.model.bind(params)


def test_no_loss_comes_from_prompt_targets_and_no_attention_crosses_conversations(files):
    config = make_config("sft", files["sft"])
    trainer, model = tiny_model(config)
    row = sft_rows(files)[0]
    tokens, segments, mask = (jnp.asarray(row[k])[None] for k in ("tokens", "segment_ids", "loss_mask"))
    logits = model(tokens[:, :-1], segments[:, :-1], compute_dtype=jnp.float32)
    targets, weights = tokens[:, 1:], mask[:, 1:]
    changed = jnp.where(weights == 0, (targets + 7) % 256, targets)  # every prompt target different
    assert not np.array_equal(changed, targets)
    assert float(cross_entropy(logits, changed, weights)) == float(cross_entropy(logits, targets, weights))
    loss, metrics = sft_loss(model_options(config, "cpu"))(model, {k: v[None] for k, v in row.items()}, None)
    assert float(loss) == float(cross_entropy(logits, targets, weights))
    assert float(metrics["trained_fraction"]) == pytest.approx(float(weights.mean()))
    # the first conversation's tokens changed: the second one's logits stay exactly the same
    first = segments[0, :-1] == 1
    other = tokens.at[0, 1:int(first.sum())].set((tokens[0, 1:int(first.sum())] + 1) % 256)
    other_logits = model(other[:, :-1], segments[:, :-1], compute_dtype=jnp.float32)
    second = np.asarray(segments[0, :-1] == 2)
    np.testing.assert_array_equal(other_logits[0][second], logits[0][second])
    assert not np.allclose(other_logits[0][np.asarray(first)], logits[0][np.asarray(first)])


def log_softmax_sum(logits, tokens, mask):
    """By hand, in float64: sum over the masked targets of log softmax(logits)[target]."""
    x = np.asarray(logits, np.float64)
    lse = np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1)) + x.max(-1)
    picked = np.take_along_axis(x, np.asarray(tokens)[:, 1:, None], -1)[..., 0]
    return ((picked - lse) * np.asarray(mask)[:, 1:]).sum(-1)


@pytest.fixture(scope="module")
def pairs_and_model(files):
    """A tiny model's parameters, four pairs, and the model's logits of both sides (jitted once)."""
    config = make_config("dpo", files["dpo"])
    trainer = build_trainer(config, jax.devices()[:1])
    params = trainer.init_state().params
    pairs, _ = open_posttrain_data(config)
    batch = stacked(pairs, range(4))
    batch["reference_chosen"] = np.array([-40.0, -35.0, -30.0, -20.0], np.float32)
    batch["reference_rejected"] = np.array([-41.0, -30.0, -35.0, -19.0], np.float32)
    logits = jax.jit(lambda p, t: trainer.model.bind(p)(t[:, :-1], None, compute_dtype=jnp.float32))
    return trainer, params, batch, {side: logits(params, batch[f"{side}_tokens"]) for side in ("chosen", "rejected")}


@pytest.mark.parametrize("settings", [dict(), dict(label_smoothing=0.2), dict(loss="ipo", beta=0.5),
                                      dict(nll_weight=0.5)])
def test_dpo_loss_margin_and_accuracy_equal_a_hand_computation(files, pairs_and_model, settings):
    trainer, params, batch, logits = pairs_and_model
    config = make_config("dpo", files["dpo"], **settings)
    loss, metrics = jax.jit(lambda p, b: dpo_loss(config.posttrain, model_options(config, "cpu"))(trainer.model.bind(p), b, None))(params, batch)
    policy = {side: log_softmax_sum(logits[side], batch[f"{side}_tokens"], batch[f"{side}_mask"])
              for side in ("chosen", "rejected")}
    chosen, rejected = policy["chosen"] - batch["reference_chosen"], policy["rejected"] - batch["reference_rejected"]
    h, beta, eps = chosen - rejected, config.posttrain.beta, config.posttrain.label_smoothing
    log_sigmoid = lambda x: -np.log1p(np.exp(-x))  # noqa: E731
    want = ((h - 1 / (2 * beta)) ** 2 if config.posttrain.loss == "ipo"
            else -(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h)).mean()
    nll = -policy["chosen"].sum() / np.asarray(batch["chosen_mask"])[:, 1:].sum()  # per chosen token
    assert float(metrics["chosen_nll"]) == pytest.approx(nll, rel=1e-5)
    assert float(loss) == pytest.approx(want + config.posttrain.nll_weight * nll, rel=1e-5)
    assert float(metrics["reward_margin"]) == pytest.approx((beta * h).mean(), rel=1e-5, abs=1e-6)
    assert float(metrics["reward_accuracy"]) == (h > 0).mean()
    assert 0 < (h > 0).mean() < 1  # the hand-picked references make both outcomes occur
    assert float(metrics["kl_to_reference"]) == pytest.approx((chosen + rejected).mean() / 2, rel=1e-5)


def test_the_cached_reference_is_the_initial_policy_so_the_first_loss_is_log_2(files, pairs_and_model):
    trainer, params, _, _ = pairs_and_model
    pairs, _ = open_posttrain_data(trainer.config)
    attach_reference(trainer, pairs)
    batch = stacked(pairs, range(8))
    loss, metrics = jax.jit(lambda p, b: dpo_loss(trainer.config.posttrain, model_options(trainer.config, "cpu"))(trainer.model.bind(p), b, None))(params, batch)
    assert float(loss) == pytest.approx(math.log(2), abs=1e-6)
    assert float(metrics["reward_margin"]) == pytest.approx(0, abs=1e-6)
    assert float(metrics["kl_to_reference"]) == pytest.approx(0, abs=1e-5)
    assert (pairs.reference < 0).all()  # log-probabilities of whole responses


def resumed_losses(tmp_path, method, source, stops, extra=()):
    """Training rows' losses of a run trained to each step in `stops` in turn, resuming from its checkpoint (a
    constant learning rate: the schedule does not depend on train.steps)."""
    import jaxscale

    rows = []
    for steps in stops:
        config = jaxscale.load_config("default", [*extra,
            f"posttrain.method={method}", f"posttrain.source={source}", "posttrain.validation_fraction=0",
            f"model.seq_len={SEQ_LEN}", "model.d_model=64", "model.n_layers=2", "mesh.data=2", "mesh.fsdp=2",
            "mesh.tensor=2", "optimizer.warmup_steps=0", "optimizer.min_lr_ratio=1", f"train.steps={steps}", "train.batch_size=8", "train.log_every=1",
            "train.eval_every=0", "train.progress=false", "checkpoint.every_steps=1", f"run_dir={tmp_path}"])
        rows += [(r["step"], r["loss"]) for r in jaxscale.train(config).metrics if "loss" in r]
    return rows


@pytest.mark.slow  # 4-6 minutes each on the shared 2-core CPU machine: four sessions of a run on 8 devices
@pytest.mark.parametrize("method, reference", [("sft", "cached"), ("dpo", "cached"), ("dpo", "frozen")])
def test_a_resumed_run_continues_exactly(files, tmp_path, method, reference):
    """With posttrain.reference=frozen the frozen copy is checkpointed with the state and restored with it."""
    extra = [f"posttrain.reference={reference}"]
    straight = resumed_losses(tmp_path / "straight", method, files[method], [4], extra)
    resumed = resumed_losses(tmp_path / "resumed", method, files[method], [2, 4], extra)
    assert [step for step, _ in resumed] == [1, 2, 3, 4]
    np.testing.assert_array_equal(resumed, straight)


@pytest.mark.slow  # about 2 minutes each on the shared 2-core CPU machine: three `jaxscale train` processes
@pytest.mark.parametrize("method, reference", [("sft", "cached"), ("dpo", "cached"), ("dpo", "frozen")])
def test_an_elastic_restart_on_fewer_devices_continues_the_loss_curve(files, tmp_path, method, reference):
    """Checkpointed at step 2 on 8 devices (data 2 x fsdp 2 x tensor 2), continued on 4: the mesh loses its data
    axis, so each step runs 2 microbatches; the losses of steps 3 and 4 are those of a run on 8 devices
    throughout (within 1e-5: other summation orders; the cached reference is computed again on the 4)."""
    from fault_helpers import run_train

    from jaxscale.training.events import read_metrics

    settings = [f"posttrain.method={method}", f"posttrain.source={files[method]}", f"posttrain.reference={reference}",
                "posttrain.validation_fraction=0", "model.d_model=32", "model.n_layers=1", "model.n_heads=2",
                f"model.seq_len={SEQ_LEN}", "mesh=cpu-8", "train.elastic=true", "train.batch_size=8",
                "train.eval_every=0", "train.log_every=1", "train.progress=false", "optimizer.warmup_steps=0",
                "optimizer.min_lr_ratio=1", "checkpoint.every_steps=2"]

    def train(run_dir, steps, devices):
        result = run_train([*settings, f"run_dir={run_dir}", f"train.steps={steps}"], tmp_path, devices=devices)
        assert result.returncode == 0, result.stderr[-3000:]
        return result

    def losses(run_dir):
        rows = read_metrics(run_dir / "metrics.jsonl")
        return {r["step"]: r["loss"] for r in rows if "loss" in r and "event" not in r}

    train(tmp_path / "straight", 4, 8)
    train(tmp_path / "elastic", 2, 8)
    restarted = train(tmp_path / "elastic", 4, 4)
    assert "elastic: 4 devices" in restarted.stderr and "train.microbatches 1 -> 2" in restarted.stderr
    want, got = losses(tmp_path / "straight"), losses(tmp_path / "elastic")
    assert sorted(got) == [1, 2, 3, 4]
    for step in (3, 4):
        assert got[step] == pytest.approx(want[step], rel=1e-5), f"step {step}"


def layout_run(config: Config, devices):
    """(loss, gradient norm) per step and the reference values, on `devices`."""
    trainer = build_trainer(config, devices)
    rows, _ = open_posttrain_data(config)
    if config.posttrain.method == "dpo" and config.posttrain.reference == "cached":
        attach_reference(trainer, rows)
    state, out = trainer.init_state(), []
    for step in range(config.train.steps):
        batch = stacked(rows, range(step * 8, step * 8 + 8))
        state, metrics = trainer.train_step(state, jax.device_put(batch, trainer.data_sharding))
        out.append((float(metrics["loss"]), float(metrics["grad_norm"])))
    return out, getattr(rows, "reference", None)


@pytest.mark.slow  # 2-4 minutes on the 2-core CPU machine: 4 layouts, each compiled
@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_one_device_equals_data_fsdp_and_tensor_layouts(files, method):
    want, reference = layout_run(make_config(method, files[method]), jax.devices()[:1])
    if method == "dpo":
        assert want[0][0] == pytest.approx(math.log(2), abs=1e-6)  # the policy is the reference at step 0
    for mesh in ({"data": 8}, {"fsdp": 8}, {"data": 2, "fsdp": 2, "tensor": 2}):
        got, got_reference = layout_run(make_config(method, files[method], mesh), jax.devices())
        np.testing.assert_allclose(got, want, rtol=1e-5)
        if method == "dpo":
            np.testing.assert_allclose(got_reference, reference, rtol=1e-5)


@pytest.mark.slow  # 25-50 s on the loaded 2-core CPU machine: two train steps compiled
def test_sft_microbatches_weigh_in_proportion_to_their_response_tokens(files):
    """The two microbatches of a batch hold different numbers of response tokens; the step weighs each by its
    count (LOSS_WEIGHT), so the losses and gradient norms are those of the whole batch at once (within float32
    rounding of another summation order)."""
    config = make_config("sft", files["sft"])
    rows, _ = open_posttrain_data(config)
    masks = stacked(rows, range(8))["loss_mask"][:, 1:]
    assert masks[:4].sum() != masks[4:].sum()
    one, two = (layout_run(dataclasses.replace(config, train=dataclasses.replace(config.train, microbatches=count)),
                           jax.devices()[:1])[0] for count in (1, 2))
    np.testing.assert_allclose(two, one, rtol=1e-5)


FROZEN_TOLERANCE = dict(rtol=2e-6, atol=1e-6)  # in-step and cached reference: separately compiled float32


@pytest.mark.parametrize("mesh", [pytest.param(None, id="one-device", marks=pytest.mark.slow),
                                  pytest.param({"data": 2, "fsdp": 2, "tensor": 2}, id="data2-fsdp2-tensor2",
                                               marks=pytest.mark.slow)])  # ~1 minute: 8 devices, 2 compilations
def test_a_frozen_reference_gives_the_cached_references_losses(files, mesh):
    """posttrain.reference=frozen computes the reference in the step from a frozen copy of the initial
    parameters (in the state, sharded like them); the losses and gradient norms are the cached reference's."""
    devices = jax.devices()[:1] if mesh is None else jax.devices()
    cached, _ = layout_run(make_config("dpo", files["dpo"], mesh, reference="cached"), devices)
    config = make_config("dpo", files["dpo"], mesh, reference="frozen")
    trainer = build_trainer(config, devices)
    state = trainer.init_state()
    assert jax.tree.structure(state.reference) == jax.tree.structure(state.params)
    assert all(r.sharding == p.sharding for r, p in zip(jax.tree.leaves(state.reference), jax.tree.leaves(state.params)))
    frozen, _ = layout_run(config, devices)
    assert frozen[0][0] == pytest.approx(math.log(2), abs=1e-6)
    np.testing.assert_allclose(frozen, cached, **FROZEN_TOLERANCE)


BAD = [
    ("sft", {"messages": [{"content": "hi"}, {"role": "assistant", "content": "4"}]}, "messages[0] has no 'role'"),
    ("sft", {"prompt": "2+2="}, "no 'response' field"),
    ("sft", {"prompt": "2+2=", "response": "  "}, "'response' must be a non-empty string"),
    ("sft", {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]},
     "empty assistant response"),
    ("sft", {"prompt": "x" * 80, "response": "4"}, "longer than a row of seq_len + 1 = 65; set posttrain.truncate"),
    ("dpo", {"prompt": "2+2=", "chosen": "4"}, "no 'rejected' field"),
    ("sft", {"messages": [{"role": "tool", "content": "x"}]}, "role 'tool'"),
]


@pytest.mark.parametrize("form", ["jsonl", "hf"])
@pytest.mark.parametrize("method, record, message", BAD)
def test_bad_examples_are_named_by_file_and_line_with_exit_code_2(tmp_path, capsys, method, record, message, form):
    """A JSONL example is named by file and line; a Hugging Face dataset's by its directory and row index."""
    good = {"prompt": "1+1=", "response": "2"} if method == "sft" else {"prompt": "1+1=", "chosen": "2",
                                                                        "rejected": "3"}
    if form == "jsonl":
        path = write_jsonl(tmp_path / "bad.jsonl", [good, good, record])
        source, where = path, f"{path}:3"
    else:
        path = save_dataset(tmp_path / "bad", [good, good, record])
        source, where = f"hf:{path}", f"{path} row 2"
    code = main(["train", "default", "--set", f"posttrain.method={method}", "--set", f"posttrain.source={source}",
                 "--set", f"model.seq_len={SEQ_LEN}", "--set", f"run_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"{where}: " in err and message in err
    assert not (tmp_path / "run").exists()  # nothing written before every check has passed


def test_sources_that_hold_no_examples_are_refused_naming_the_setting(tmp_path):
    """The built-in corpus, token files, a missing file, and a directory that save_to_disk did not write."""
    np.save(tmp_path / "ids.npy", np.arange(8))
    (tmp_path / "plain").mkdir()
    template = BuiltinTemplate(ByteTokenizer())
    for source, message in (("builtin", "not the built-in corpus"), (str(tmp_path / "ids.npy"), "not token or Parquet"),
                            (str(tmp_path / "none.jsonl"), "does not exist; fix posttrain.source"),
                            (f"hf:{tmp_path / 'plain'}", "not a dataset written by Hugging Face datasets")):
        with pytest.raises(ConfigError, match=message):
            build_rows(make_config("sft", source).posttrain, template, SEQ_LEN + 1, ByteTokenizer.eos_id)


def test_a_preference_in_chat_form_gives_the_rows_of_its_string_form(tmp_path):
    """A prompt as a list of messages and answers as lists of assistant messages: the same rows as strings make
    (one user turn, one assistant turn each); a system turn goes before the prompt in both responses, and a
    non-assistant message among the answers is refused."""
    strings = {"prompt": "2+2=", "chosen": "4", "rejected": "5"}
    chat = {"prompt": [{"role": "user", "content": "2+2="}], "chosen": [{"role": "assistant", "content": "4"}],
            "rejected": [{"role": "assistant", "content": "5"}]}
    system = {**chat, "prompt": [{"role": "system", "content": "add"}, *chat["prompt"]]}
    template = BuiltinTemplate(ByteTokenizer())

    def rows(record):
        pairs, _ = build_rows(make_config("dpo", write_jsonl(tmp_path / "p.jsonl", [record])).posttrain, template,
                              SEQ_LEN + 1, ByteTokenizer.eos_id)
        return pairs[0]

    def text(row, side):
        return bytes(row[f"{side}_tokens"][row[f"{side}_tokens"] < 256].tolist()).decode()

    want, got, with_system = rows(strings), rows(chat), rows(system)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key])
    assert text(with_system, "chosen") == "system: add\nuser: 2+2=\nassistant: 4"
    assert text(with_system, "rejected") == "system: add\nuser: 2+2=\nassistant: 5"
    assert bytes(with_system["chosen_tokens"][with_system["chosen_mask"] == 1].tolist()[:1]).decode() == "4"
    with pytest.raises(ConfigError, match=r"p.jsonl:1: 'chosen' may hold assistant messages only"):
        rows({**chat, "chosen": [{"role": "user", "content": "4"}]})


def test_truncation_keeps_the_end_or_the_start(files, tmp_path):
    long = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "x" * 80, "response": "42"}])
    template = BuiltinTemplate(ByteTokenizer())
    for rule, kept in (("prompt", "42"), ("end", None)):
        cfg = make_config("sft", long, truncate=rule).posttrain
        if kept is None:  # the response was cut off: nothing to train on is an error too
            with pytest.raises(ConfigError, match="long.jsonl:1: no assistant token left"):
                build_rows(cfg, template, SEQ_LEN + 1, ByteTokenizer.eos_id)
            continue
        rows, _ = build_rows(cfg, template, SEQ_LEN + 1, ByteTokenizer.eos_id)
        row = rows[0]
        assert (row["segment_ids"] == 1).all()
        assert bytes(row["tokens"][row["loss_mask"] == 1][:-1].tolist()).decode() == kept


def test_a_template_that_fails_to_render_is_named_with_the_example(tmp_path):
    template = "{% if messages[0].role != 'user' %}{{ raise_exception('must start with user') }}{% endif %}x"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    source = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "system", "content": "s"},
                                                              {"role": "assistant", "content": "4"}]}])
    cfg = make_config("sft", source).posttrain
    with pytest.raises(ConfigError, match=r"c.jsonl:1: the chat template failed to render .*must start with user"):
        build_rows(cfg, load_template(str(tmp_path / "tokenizer_config.json"), ByteTokenizer()), 65, 256)


def bound(trainer, loss_fn, batch):
    return lambda params: loss_fn(trainer.model.bind(params), batch, None)


@pytest.mark.parametrize("method", ["sft", pytest.param("dpo", marks=pytest.mark.slow)])
def test_with_experts_the_balance_losses_are_added_and_trained(files, method):
    """With model.moe the fine-tuning loss adds the experts' balance and z-losses with their weights, reports
    the loss without them, and their gradient reaches the router."""
    weights = dict(aux_loss_weight=0.5, z_loss_weight=0.25)
    configs = {name: make_config(method, files[method], moe=moe) for name, moe in
               (("weighted", weights), ("off", dict(aux_loss_weight=0.0, z_loss_weight=0.0)))}
    trainer = build_trainer(configs["off"], jax.devices()[:1])
    params = trainer.init_state().params
    rows, _ = open_posttrain_data(configs["off"])
    batch = stacked(rows, range(4))
    if method == "dpo":
        batch["reference_chosen"], batch["reference_rejected"] = np.full(4, -30.0, np.float32), np.full(4, -31.0, np.float32)
    out = {}
    for name, config in configs.items():
        settings, options = config.posttrain, model_options(config, "cpu")
        loss_fn = (sft_loss(options, config.model.moe) if method == "sft"
                   else dpo_loss(settings, options, config.model.moe))
        out[name] = jax.jit(jax.value_and_grad(bound(trainer, loss_fn, batch), has_aux=True))(params)
    ((loss, metrics), grads), ((plain, _), plain_grads) = out["weighted"], out["off"]
    name = "cross_entropy" if method == "sft" else "dpo_loss"
    assert float(metrics[name]) == pytest.approx(float(plain), rel=1e-6)
    want = plain + weights["aux_loss_weight"] * metrics["moe_aux_loss"] + weights["z_loss_weight"] * metrics["moe_z_loss"]
    assert float(metrics["moe_aux_loss"]) > 0 and float(loss) == pytest.approx(float(want), rel=1e-6)
    assert float(loss) > float(plain)
    router = [(path, g) for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]
              if jax.tree_util.keystr(path).endswith("['router']")]
    plain_router = [g for path, g in jax.tree_util.tree_flatten_with_path(plain_grads)[0]
                    if jax.tree_util.keystr(path).endswith("['router']")]
    assert len(router) == len(plain_router) == 1
    assert not np.allclose(router[0][1], plain_router[0])
