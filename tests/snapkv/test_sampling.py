import torch

from snapkv.config import SamplingParams
from snapkv.sampling import make_generator, sample_token

LOGITS = torch.tensor([0.5, 3.0, 2.9, -1.0, 1.0])


def draws(params, count=200):
    generator = make_generator(params)
    return [sample_token(LOGITS, params, generator) for _ in range(count)]


def test_greedy_takes_argmax():
    assert make_generator(SamplingParams()) is None
    assert sample_token(LOGITS, SamplingParams(), None) == 1


def test_top_k_one_is_greedy():
    assert set(draws(SamplingParams(temperature=1.5, top_k=1, seed=0))) == {1}


def test_top_k_limits_choices():
    assert set(draws(SamplingParams(temperature=5.0, top_k=2, seed=0))) == {1, 2}


def test_small_top_p_keeps_only_top_token():
    assert set(draws(SamplingParams(temperature=1.0, top_p=0.01, seed=0))) == {1}


def test_top_p_keeps_smallest_set_reaching_p():
    # Softmax of LOGITS puts 0.467 on token 1, 0.423 on token 2 and 0.063 on token 4, so p=0.85 keeps
    # tokens 1 and 2 only, and p=0.9 adds token 4.
    assert set(draws(SamplingParams(temperature=1.0, top_p=0.85, seed=1), 400)) == {1, 2}
    assert set(draws(SamplingParams(temperature=1.0, top_p=0.9, seed=1), 400)) == {1, 2, 4}


def test_seed_repeats_and_differs():
    params = SamplingParams(temperature=5.0, seed=42)
    assert draws(params) == draws(params)
    assert draws(params) != draws(SamplingParams(temperature=5.0, seed=43))


def test_tiny_temperature_is_greedy():
    # 1e-300 underflows to 0 in fp32, where dividing the logits by it gave NaN probabilities.
    for temperature in (1e-300, 1e-40):
        params = SamplingParams(temperature=temperature, seed=0)
        assert set(draws(params, 20)) == {1}
