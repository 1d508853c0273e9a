"""Fine-tuning a small pretrained jaxscale model to add two-digit numbers: SFT, then DPO.

Everything is made here, offline, in --work (default runs/finetune_arithmetic):
  1. pretrain: the default experiment's 0.9M-parameter GPT-2-style model on the built-in corpus (byte tokens),
     exported as a Hugging Face directory (jaxscale.training.hf_export.export)
  2. SFT on "07+42=" -> "049" pairs (posttrain.method=sft, model.init_from=hf:<pretrained>), exported
  3. DPO on the SFT model's own mistakes: for 2,000 more prompts, its greedy answer where that is wrong is the
     rejected answer and the sum the chosen one (posttrain.method=dpo, model.init_from=hf:<SFT model>), with
     the chosen answers' negative log-likelihood added (posttrain.nll_weight)
  4. with --control: SFT continued instead, on the same prompts' right answers, as many examples as DPO's
     pairs (what the likelihood term alone does)
Sums of 400 held-out number pairs are never trained on. Measured on each model, on held-out prompts:
exact-match accuracy of greedy answers (200 prompts), and how often the model gives the right sum a higher
probability than a wrong one, for two kinds of wrong answer: the SFT model's own wrong greedy answers to the
same 200 prompts (the held-out split of what DPO trains on), and the sum with one digit off by one (200 others).

    python examples/finetune_arithmetic.py [--work DIR] [--pretrain-steps 300 --sft-steps 400 --dpo-steps 150]
        [--dpo-learning-rate 2e-4 --dpo-beta 0.1 --dpo-nll-weight 1] [--control]
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jaxscale
import jaxscale.hf
from jaxscale.data.tokenizers import ByteTokenizer
from jaxscale.posttrain.chat import BuiltinTemplate
from jaxscale.training.hf_export import export

HELD_OUT = 400  # number pairs kept out of training: the first half for exact match, the rest for preferences


def problem(a: int, b: int) -> tuple[str, str]:
    return f"{a:02d}+{b:02d}=", f"{a + b:03d}"


def wrong_answer(a: int, b: int, rng: random.Random) -> str:
    """A near miss: one digit of the sum off by one."""
    digits = list(f"{a + b:03d}")
    i = rng.randrange(3)
    digits[i] = str((int(digits[i]) + rng.choice([1, 9])) % 10)
    return "".join(digits)


def write_data(work: Path, seed: int = 0) -> dict:
    rng = random.Random(seed)
    pairs = [(a, b) for a in range(100) for b in range(100)]
    rng.shuffle(pairs)
    rng = random.Random(seed + 1)  # the near misses
    held, train = pairs[:HELD_OUT], pairs[HELD_OUT:]

    def jsonl(name, records):
        path = work / name
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        return str(path)

    def preference(a, b):
        prompt, answer = problem(a, b)
        return {"prompt": prompt, "chosen": answer, "rejected": wrong_answer(a, b, rng)}

    return {
        "sft": jsonl("sft.jsonl", [dict(zip(("prompt", "response"), problem(a, b))) for a, b in train[:4000]]),
        "dpo_prompts": train[4000:6000],
        "exact_match": held[:HELD_OUT // 2],
        "preferences": [preference(a, b) for a, b in held[HELD_OUT // 2:]],
    }


def greedy_answers(model_dir: Path, pairs: list[tuple[int, int]]) -> list[str]:
    """The model's greedy 3-character answer to each prompt."""
    model, params = jaxscale.hf.load(model_dir)
    template = BuiltinTemplate(ByteTokenizer())
    prompts = np.stack([template.generation_prompt([{"role": "user", "content": problem(a, b)[0]}])
                        for a, b in pairs])
    next_token = jax.jit(lambda p, t: jnp.argmax(model.apply(p, t)[:, -1, :model.cfg.vocab_size], -1))
    tokens = jnp.asarray(prompts)
    for _ in range(3):
        tokens = jnp.concatenate([tokens, next_token(params, tokens)[:, None].astype(tokens.dtype)], 1)
    return [ByteTokenizer().decode(row) for row in np.asarray(tokens[:, -3:]).tolist()]


def own_mistakes(model_dir: Path, pairs: list[tuple[int, int]]) -> list[dict]:
    """Preference pairs from the model's wrong greedy answers: the sum chosen, its answer rejected."""
    return [{"prompt": problem(a, b)[0], "chosen": problem(a, b)[1], "rejected": answer}
            for answer, (a, b) in zip(greedy_answers(model_dir, pairs), pairs) if answer != problem(a, b)[1]]


def exact_match(model_dir: Path, pairs: list[tuple[int, int]]) -> float:
    """Share of prompts whose greedy 3-digit answer is the sum."""
    answers = greedy_answers(model_dir, pairs)
    return float(np.mean([answer == problem(a, b)[1] for answer, (a, b) in zip(answers, pairs)]))


def preference_accuracy(model_dir: Path, preferences: list[dict]) -> float:
    """Share of pairs where the model gives the right answer a higher log-probability than the wrong one."""
    model, params = jaxscale.hf.load(model_dir)
    template = BuiltinTemplate(ByteTokenizer())

    def encoded(side):
        out = [template.tokenize([{"role": "user", "content": p["prompt"]},
                                  {"role": "assistant", "content": p[side]}]) for p in preferences]
        return jnp.asarray(np.stack([ids for ids, _ in out])), jnp.asarray(np.stack([mask for _, mask in out]))

    @jax.jit
    def log_probs(params, tokens, mask):
        logits = model.apply(params, tokens[:, :-1])[..., :model.cfg.vocab_size]
        picked = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), tokens[:, 1:, None], -1)[..., 0]
        return jnp.sum(picked * mask[:, 1:], -1)

    chosen, rejected = (log_probs(params, *encoded(side)) for side in ("chosen", "rejected"))
    return float(jnp.mean(chosen > rejected))


def train_and_export(name: str, overrides: list[str], work: Path) -> tuple[Path, float, dict]:
    """Train the run work/<name> and export it to work/<name>-hf; (that directory, seconds, last metrics)."""
    run_dir, out = work / name, work / f"{name}-hf"
    config = jaxscale.load_config("default", [f"run_dir={run_dir}", "train.progress=false", *overrides])
    started = time.perf_counter()
    result = jaxscale.train(config)
    seconds = time.perf_counter() - started
    shutil.rmtree(out, ignore_errors=True)
    export(run_dir, out)
    last = {k: v for row in result.metrics for k, v in row.items()}
    return out, seconds, last


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", default="runs/finetune_arithmetic")
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--sft-steps", type=int, default=400)
    parser.add_argument("--dpo-steps", type=int, default=150)
    parser.add_argument("--dpo-learning-rate", type=float, default=2e-4)
    parser.add_argument("--dpo-beta", type=float, default=0.1)
    parser.add_argument("--dpo-nll-weight", type=float, default=1.0)
    parser.add_argument("--control", action="store_true",
                        help="also continue SFT on the DPO prompts' right answers for --dpo-steps instead")
    args = parser.parse_args(argv)
    work = Path(args.work)
    if work.exists():
        shutil.rmtree(work)  # a fresh run each time: the runs here would otherwise resume
    work.mkdir(parents=True)
    data = write_data(work)
    results: dict = {}

    def measure(name: str, model_dir: Path) -> None:
        results[f"exact_match_{name}"] = exact_match(model_dir, data["exact_match"])
        results[f"own_mistake_accuracy_{name}"] = preference_accuracy(model_dir, held_out_mistakes)
        results[f"near_miss_accuracy_{name}"] = preference_accuracy(model_dir, data["preferences"])

    pretrained, results["pretrain_s"], _ = train_and_export(
        "pretrain", [f"train.steps={args.pretrain_steps}", "train.eval_every=0"], work)
    results["exact_match_pretrained"] = exact_match(pretrained, data["exact_match"])

    sft, results["sft_s"], last = train_and_export("sft", [
        f"model.init_from=hf:{pretrained}", "posttrain.method=sft", f"posttrain.source={data['sft']}",
        f"train.steps={args.sft_steps}", f"train.eval_every={args.sft_steps}", "train.batch_size=16",
        "optimizer.learning_rate=2e-3", "optimizer.warmup_steps=20"], work)
    results["sft_eval_loss"] = last.get("eval_loss")
    held_out_mistakes = own_mistakes(sft, data["exact_match"])
    measure("sft", sft)

    pairs = work / "dpo.jsonl"
    mistakes = own_mistakes(sft, data["dpo_prompts"])
    pairs.write_text("".join(json.dumps(r) + "\n" for r in mistakes))
    results["dpo_pairs"], results["held_out_mistakes"] = len(mistakes), len(held_out_mistakes)
    dpo, results["dpo_s"], last = train_and_export("dpo", [
        f"model.init_from=hf:{sft}", "posttrain.method=dpo", f"posttrain.source={pairs}",
        f"posttrain.beta={args.dpo_beta}", f"posttrain.nll_weight={args.dpo_nll_weight}",
        f"train.steps={args.dpo_steps}", f"train.eval_every={args.dpo_steps}", "train.batch_size=16",
        f"optimizer.learning_rate={args.dpo_learning_rate}", "optimizer.warmup_steps=10"], work)
    results["dpo_eval_reward_accuracy"] = last.get("eval_reward_accuracy")
    measure("dpo", dpo)

    if args.control:  # the same prompts' right answers, as many as DPO's pairs: 16 rows of 4 a step, 1/4 the steps
        answers = work / "control.jsonl"
        answers.write_text("".join(json.dumps(dict(zip(("prompt", "response"), problem(a, b)))) + "\n"
                                   for a, b in data["dpo_prompts"]))
        control, results["control_s"], _ = train_and_export("control", [
            f"model.init_from=hf:{sft}", "posttrain.method=sft", f"posttrain.source={answers}",
            f"train.steps={max(1, args.dpo_steps // 4)}", "train.eval_every=0", "train.batch_size=16",
            f"optimizer.learning_rate={args.dpo_learning_rate}", "optimizer.warmup_steps=3"], work)
        measure("control", control)

    (work / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    for key, value in results.items():
        print(f"{key}: {value:.3f}" if isinstance(value, float) else f"{key}: {value}")
    return results


if __name__ == "__main__":
    main()
