from router.policies import WorkerLoad, kv_aware, least_loaded, round_robin

A = WorkerLoad("a:1", outstanding=3, kv_free_bytes=100)
B = WorkerLoad("b:1", outstanding=1, kv_free_bytes=500)
C = WorkerLoad("c:1", outstanding=1, kv_free_bytes=500)
D = WorkerLoad("d:1", outstanding=0, kv_free_bytes=50)


def test_no_candidates_gives_none():
    for policy in (round_robin, least_loaded, kv_aware):
        assert policy([], 0) is None


def test_round_robin_cycles_in_order():
    picks = [round_robin([A, B, C], counter).address for counter in range(5)]
    assert picks == ["a:1", "b:1", "c:1", "a:1", "b:1"]


def test_least_loaded_picks_fewest_outstanding():
    assert least_loaded([A, B, D], 0) == D


def test_least_loaded_rotates_ties():
    assert [least_loaded([A, B, C], counter) for counter in range(3)] == [B, C, B]


def test_kv_aware_picks_most_free_memory():
    assert kv_aware([A, D, B], 0) == B


def test_kv_aware_breaks_ties_by_outstanding():
    busier = WorkerLoad("e:1", outstanding=5, kv_free_bytes=500)
    assert kv_aware([busier, C], 0) == C
    assert kv_aware([busier, C], 1) == C
