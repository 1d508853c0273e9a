"""generate(): reproducible for a key, greedy at temperature 0, and only ids of the real vocabulary."""
import jax
import numpy as np
import pytest

from jaxscale.model import Model, ModelConfig
from jaxscale.model.sample import generate

SEQ_LEN = 16


@pytest.fixture(scope="module")
def model_and_params():
    # vocab 257 is padded to 384 ids: at a random init the 127 padding ids would be drawn about a third of the time
    model = Model.build(ModelConfig.from_preset("tiny", seq_len=SEQ_LEN))
    return model, model.init(jax.random.key(0))


def test_same_key_same_tokens_and_other_keys_differ(model_and_params):
    model, params = model_and_params
    prompt = np.array([72, 105, 32], np.int32)
    first = generate(model, params, prompt, 20, temperature=1.0, key=jax.random.key(1))
    again = generate(model, params, prompt, 20, temperature=1.0, key=jax.random.key(1))
    other = generate(model, params, prompt, 20, temperature=1.0, key=jax.random.key(2))
    assert first.shape == (20,) and first.dtype == np.int32
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_temperature_zero_takes_the_argmax_past_the_window(model_and_params):
    """Each greedy token is the argmax over the real vocabulary of the unpadded model on the last seq_len tokens;
    the prompt is long enough that the window slides."""
    model, params = model_and_params
    prompt = np.arange(SEQ_LEN - 3, dtype=np.int32) + 40
    steps = 6
    tokens = generate(model, params, prompt, steps, temperature=0.0, key=jax.random.key(0))
    sequence = list(prompt)
    for token in tokens:
        window = np.asarray(sequence[-SEQ_LEN:], np.int32)[None]
        logits = np.asarray(model.apply(params, window))[0, -1, :model.cfg.vocab_size]
        assert token == logits.argmax()
        sequence.append(int(token))
    assert len(sequence) > SEQ_LEN


def test_tokens_stay_in_the_real_vocabulary(model_and_params):
    model, params = model_and_params
    tokens = generate(model, params, np.array([10], np.int32), 60, temperature=1.0, key=jax.random.key(3))
    assert tokens.min() >= 0 and tokens.max() < model.cfg.vocab_size
    assert len(np.unique(tokens)) > 10  # drawn, not stuck on one id


@pytest.mark.parametrize("prompt", [np.array([], np.int32), np.array([[1, 2]], np.int32), np.array([1, 300]),
                                    np.array([0.5, 1.0])])
def test_bad_prompts_are_refused(model_and_params, prompt):
    model, params = model_and_params
    with pytest.raises(ValueError, match="prompt_tokens"):
        generate(model, params, prompt, 1, key=jax.random.key(0))
