"""The benchmark script runs and writes the documented JSON records (speed is not asserted)."""
from __future__ import annotations

import importlib.util
import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from malloc_env import clean_env

REPO = Path(__file__).resolve().parents[1]


def test_benchmark_writes_records_for_each_implementation(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "run.py"), "--workloads", "sinusoid",
         "--orders", "second", "--impls", "fastmaml,loop,learn2learn", "--repeats", "1",
         "--warmup", "0", "--json", str(out)], capture_output=True, text=True, timeout=300,
        env=clean_env())
    assert result.returncode == 0, result.stderr[-2000:]
    records = json.loads(out.read_text())
    assert {r["impl"] for r in records} >= {"fastmaml", "loop"}
    for r in records:
        assert {"workload", "order", "impl", "s_per_iter", "peak_mem_mb"} <= set(r)
        assert r["workload"] == "sinusoid" and r["order"] == "second" and r["s_per_iter"] > 0
        assert r["precision"] == "fp32"
    loop = next(r for r in records if r["impl"] == "loop")
    assert loop["speedup_vs_loop"] == 1.0
    if platform.libc_ver()[0] == "glibc":  # the default; --malloc default turns it off
        assert loop["malloc_tuned"] is True
    if not any(r["impl"] == "learn2learn" for r in records):
        assert "learn2learn is not installed; skipped" in result.stdout


def test_conv_share_reports_the_convolution_time_of_a_conv_net_step(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "run.py"), "--workloads", "omniglot-5w1s-q5",
         "--orders", "first", "--impls", "fastmaml,loop", "--repeats", "1", "--warmup", "0",
         "--conv-share", "--malloc", "default", "--json", str(out)],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "conv %" in result.stdout
    for record in json.loads(out.read_text()):
        assert record["conv_s_per_iter"] > 0.0 and 0.0 < record["conv_share"] < 1.0
        assert record["malloc_tuned"] is False


def test_tf32_is_refused_off_cuda_with_a_clear_message():
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "run.py"), "--workloads", "sinusoid",
         "--device", "cpu", "--precision", "tf32"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "--precision tf32 is a CUDA tensor-core format" in result.stderr
    assert "Traceback" not in result.stderr


def _records_of(script: str, tmp_path: Path, *args: str) -> list[dict]:
    """The JSON records of ``benchmarks/<script>`` run with ``args``."""
    out = tmp_path / "records.json"
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args,
                             "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(out.read_text())


def test_precision_benchmark_measures_meta_gradient_error_against_float64(tmp_path):
    records = {r["precision"]: r for r in _records_of(
        "precision.py", tmp_path, "--workloads", "sinusoid", "--device", "cpu", "--repeats", "1")}
    assert set(records) == {"fp32", "bf16"}  # tf32 only on CUDA
    assert records["fp32"]["grad_rel_error"] < 1e-5  # float32 against float64: rounding only
    # bfloat16 keeps 8 bits of mantissa: its meta-gradient is visibly off, but still aligned
    assert 1e-4 < records["bf16"]["grad_rel_error"] < 0.5
    assert 0.9 < records["bf16"]["grad_cosine"] <= 1.0
    assert records["bf16"]["s_per_iter"] > 0


def test_metric_cost_benchmark_times_each_path_with_and_without_a_metric(tmp_path):
    records = {r["path"]: r for r in _records_of(
        "metric_cost.py", tmp_path, "--workloads", "sinusoid", "--device", "cpu", "--repeats", "1")}
    assert set(records) == {"looped", "batched"}
    for r in records.values():
        assert r["metric"] == "l1_loss"  # (a regression workload)
        assert r["with_over_without"] == pytest.approx(r["s_per_iter_with"]
                                                       / r["s_per_iter_without"])


def _benchmark_module():
    spec = importlib.util.spec_from_file_location("fastmaml_benchmark", REPO / "benchmarks" / "run.py")
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # for dataclasses
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("workload", ["sinusoid", "sequence-lstm"])
@pytest.mark.parametrize("first_order", [False, True])
def test_every_adapter_computes_the_loops_meta_gradient_in_float64(workload, first_order):
    """The yardstick compares equal work: each implementation's meta-gradient on the sinusoid
    and the LSTM workloads equals the naive loop's, in float64 (adapters whose library is
    missing, or that cannot run this workload or order, are skipped)."""
    bench = _benchmark_module()
    w = bench.WORKLOADS[workload]
    batch = bench.TaskBatch(*(t.double() for t in w.make_batch(torch.Generator().manual_seed(0))))

    def gradient(impl):
        torch.manual_seed(0)
        model = w.build_model().double()
        step = bench.IMPLS[impl][0](model, w, first_order)
        step(batch)
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    reference = gradient("loop")
    checked = []
    for impl, (_, package) in bench.IMPLS.items():
        if impl in ("loop", "fastmaml-compiled", "fastmaml-auto-compiled") or (
                package and importlib.util.find_spec(package) is None):
            continue
        try:
            got = gradient(impl)
        except bench.Unsupported:
            continue
        # 1e-7: parallel-metalearn keeps its step size in float32 (4e-9 off); a missing term of
        # the meta-gradient (e.g. second order) is off by far more
        assert ((got - reference).norm() / reference.norm()).item() < 1e-7, impl
        checked.append(impl)
    assert {"fastmaml", "fastmaml-auto"} <= set(checked)
    if importlib.util.find_spec("torchopt"):
        assert ("torchopt-vmap" in checked) == (workload == "sinusoid")  # no recurrent kernels
        assert ("torchopt" in checked) == (not first_order)
    if importlib.util.find_spec("metalearn") and workload == "sinusoid":
        assert "parallel-metalearn" in checked


def test_exactness_check_passes_on_fastmamls_norms_and_fails_on_torchs_fused_weight(
        tmp_path, monkeypatch):
    """The device check of ``fastmaml.norms`` (run by gpu.sh): exact here, and it says so when
    batch norm's weight goes back inside torch's kernel, whose vmap second derivative is wrong."""
    import fastmaml.norms

    spec = importlib.util.spec_from_file_location("fastmaml_exactness",
                                                  REPO / "benchmarks" / "exactness.py")
    exactness = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(exactness)

    def verdicts(out: Path) -> dict[str, bool]:
        records = json.loads(out.read_text())
        assert {r["torch"] for r in records} == {torch.__version__}
        return {r["model"]: r["exact"] for r in records}
    assert exactness.main(["--device", "cpu", "--json", str(tmp_path / "a.json")]) == 0
    assert verdicts(tmp_path / "a.json") == dict.fromkeys(exactness.MODELS, True)
    monkeypatch.setattr(fastmaml.norms, "batch_stats_norm", lambda x, weight, bias, eps:
                        torch.nn.functional.batch_norm(x, None, None, weight, bias, True, 0.0, eps))
    assert exactness.main(["--device", "cpu", "--json", str(tmp_path / "b.json")]) == 1
    assert not verdicts(tmp_path / "b.json")["conv + batch norm"]
