"""`fastddpm bench` and the diffusers provider of fastddpm.cli.benchmarking."""
import json

import pytest
import torch

from fastddpm.cli import benchmarking as B
from fastddpm import cli, ops
from fastddpm.cli import bench

CPU = torch.device("cpu")
# Two ops every provider offers (diffusers has no separate MSE op): the test stays short while
# torch.compile still compiles something.
TEST_CASES = ("q_sample_noise", "p_sample_draw")


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "bench.json"
    argv = ["bench", "--quick", "--device", "cpu", "--sizes", "tiny", "--cases", ",".join(TEST_CASES),
            "--min-time", "0.01", "--json", str(path)]
    return argv, path


def test_quick_bench_table_lists_every_installed_provider(quick_report, capsys):
    argv, path = quick_report
    assert cli.main(argv) == 0
    table = capsys.readouterr().out
    report = json.loads(path.read_text())
    rows = report["results"]
    for name, prov in B.PROVIDERS.items():
        ok, reason = prov.available(CPU)
        if ok:
            expected = [c for c in ("copy",) + TEST_CASES if c in prov.cases]
            assert expected, name
            for case in expected:
                assert f"| {case} | {name} |" in table, (name, case)
                assert sum(r["provider"] == name and r["case"] == case for r in rows) == 1, (name, case)
        else:
            assert f"not run: {name} ({reason})" in table
            assert report["unavailable"][name] == reason
            assert not any(r["provider"] == name for r in rows)
    for r in rows:
        assert r["median_s"] > 0 and r["rounds"] >= 10
        assert r["bytes"] == B.bytes_moved(r["case"], B.SIZES["tiny"])
        assert r["gb_per_s"] == pytest.approx(r["bytes"] / r["median_s"] / 1e9)
        if r["provider"] == "eager":
            assert r["vs_eager"] == 1.0
        if r["case"] == "copy":
            assert r["fraction_of_copy"] == 1.0 and r["vs_eager"] is None
    assert report["machine"]["torch"] == torch.__version__
    assert report["config"]["cases"] == list(TEST_CASES)


def test_bench_ratios_are_computed_from_the_same_run():
    results = [
        {"size": "s", "case": "copy", "provider": "copy_", "median_s": 1.0, "bytes": 8},
        {"size": "s", "case": "op", "provider": "eager", "median_s": 4.0, "bytes": 12},
        {"size": "s", "case": "op", "provider": "fast", "median_s": 2.0, "bytes": 12},
    ]
    bench._add_ratios(results)
    fast = results[2]
    assert fast["vs_eager"] == 0.5
    assert fast["gb_per_s"] == pytest.approx(6e-9)
    assert fast["fraction_of_copy"] == pytest.approx(6 / 8)


# ---- the diffusers provider computes the same math as fastddpm ---------------------------------

def _diffusers():
    return pytest.importorskip("diffusers", reason="diffusers is optional: pip install diffusers")


def test_diffusers_provider_is_listed_with_a_reason_when_absent():
    ok, reason = B.PROVIDERS["diffusers"].available(CPU)
    try:
        import diffusers  # noqa: F401
        assert ok and reason == ""
    except ImportError:
        assert not ok and "pip install diffusers" in reason


def test_diffusers_add_noise_matches_q_sample():
    _diffusers()
    inp = B.Inputs((5, 3, 7, 9), CPU)
    got = B.make_callable("diffusers", "q_sample_noise", inp)()
    want = ops.q_sample(inp.x0, inp.t, inp.tables["sqrt_ab"], inp.tables["sqrt_1m_ab"], inp.noise,
                        backend="reference")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_diffusers_step_matches_p_sample_step():
    _diffusers()
    inp = B.Inputs((5, 3, 7, 9), CPU)
    step = B.make_callable("diffusers", "p_sample_draw", inp)
    torch.manual_seed(123)
    got = step()
    torch.manual_seed(123)  # step() draws its noise from the global generator
    z = torch.randn(inp.shape)
    t = torch.full((inp.shape[0],), B.N_STEPS // 2)
    tab = inp.tables
    want = ops.p_sample_step(inp.x0, inp.eps_theta, t, tab["c1"], tab["c2"], tab["sigma"], z, backend="reference")
    # diffusers goes through the predicted x0 in float32: a few ulp of the larger terms apart.
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_diffusers_train_step_gives_the_model_a_gradient():
    _diffusers()
    inp = B.Inputs((4, 2, 3, 5), CPU)
    B.make_callable("diffusers", "train_step", inp)()
    assert inp.model.w.grad is not None and torch.isfinite(inp.model.w.grad)
    assert inp.model.w.grad != 0


def test_time_interleaved_gives_every_function_the_same_rounds():
    calls = {"a": 0, "b": 0}

    def make(name):
        def fn():
            calls[name] += 1
        return fn

    times = bench.time_interleaved([make("a"), make("b")], min_time=0.001, warmup=2, min_rounds=10, max_rounds=50)
    assert len(times) == 2 and len(times[0]) == len(times[1]) >= 10
    assert calls == {"a": 2 + len(times[0]), "b": 2 + len(times[1])}
    assert all(t >= 0 for ts in times for t in ts)
