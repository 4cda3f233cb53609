import pytest

from snapkv.config import CompressionConfig, SamplingParams


@pytest.mark.parametrize(
    "field, value",
    [
        ("window", 0),
        ("window", 2.5),
        ("budget", 32),  # equal to the default window
        ("budget", 8),
        ("kernel", 4),
        ("kernel", 0),
        ("pooling", "median"),
        ("gqa_reduction", "sum"),
        ("method", "h2o"),
        ("seed", -1),
        ("seed", 2**32),
        ("seed", True),
    ],
)
def test_compression_config_rejects(field, value):
    with pytest.raises(ValueError) as error:
        CompressionConfig(**{field: value})
    assert f"{field}={value!r}" in str(error.value)


def test_compression_defaults():
    config = CompressionConfig()
    assert (config.window, config.budget, config.kernel, config.pooling, config.gqa_reduction) == (
        32,
        1024,
        13,
        "max",
        "mean",
    )
    assert (config.method, config.seed) == ("snapkv", 0)
    assert config.kept_length(4000) == 1024
    assert config.kept_length(100) == 100


@pytest.mark.parametrize(
    "field, value",
    [
        ("max_tokens", 0),
        ("max_tokens", -3),
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_k", -1),
        ("seed", "7"),
        ("stop", ("",)),
    ],
)
def test_sampling_params_rejects(field, value):
    with pytest.raises(ValueError) as error:
        SamplingParams(**{field: value})
    assert f"{field}=" in str(error.value)
