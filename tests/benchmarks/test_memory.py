"""The memory benchmark's arithmetic, on readings written out here (the benchmark itself runs the stack)."""

from benchmarks.memory import growth_per_request, request_settings, summarize


def readings(actor_mib):
    return {"rounds": [
        {"requests": 1 + 8 * number, "seconds": 1.0, "decode": 2000.0, "prefill server": 478.0,
         "prefill actor": mib, "router": 461.0}
        for number, mib in enumerate(actor_mib)
    ]}


def test_growth_counts_from_settled_round():
    # Rounds 0 to 2 settle. From request 17 to request 33 the actor grows by 32 MiB.
    result = readings([1800.0, 2000.0, 2100.0, 2116.0, 2132.0])
    assert growth_per_request(result, "prefill actor") == 2.0
    assert growth_per_request(result, "decode") == 0.0


def test_growth_needs_two_settled_rounds():
    assert growth_per_request(readings([1800.0, 2000.0, 2100.0]), "prefill actor") is None


def test_summary_lists_growth_per_process():
    summary = summarize(readings([1800.0, 2000.0, 2100.0, 2116.0, 2132.0]))
    assert "| 33 | 2,000 | 478 | 2,132 | 461 |" in summary
    assert "- prefill actor: +2.00 MiB a request from request 17 on" in summary
    assert "- decode: +0.00 MiB a request from request 17 on" in summary


def test_request_settings_vary():
    settings = [request_settings(index) for index in range(1, 9)]
    assert settings[0] == (1287, 384, 9)
    assert len({tokens for tokens, _, _ in settings}) == 8
    assert {budget for _, budget, _ in settings} == {256, 384, 512, 640}
