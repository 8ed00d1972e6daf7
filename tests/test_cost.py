"""Cost on the device: measured figures, analytic floors, energy counters (faked), the machine-speed cache."""

from __future__ import annotations

import json
import math
import os
import sys
import types

import pytest
import torch

from slmkit.config import preset
from slmkit.errors import SlmError
from slmkit.eval import cost, machine
from slmkit.eval.cost import CostConfig, format_cost, measure_cost
from slmkit.loader import LoadedModel
from slmkit.model import Decoder, cast_weights_

FAKE_SPEED = {"read_bandwidth_gbs": 20.0, "read_bandwidth_how": "fake", "matmul_gflops": 100.0,
              "matmul_how": "fake", "threads": 2, "measured_at": "2025-01-01T00:00:00+00:00"}
SMALL = CostConfig(prompt_tokens=16, new_tokens=5, runs=3, warmup=1)
KEYS = {"ttft_ms", "prefill_tokens_per_s", "decode_tokens_per_s", "decode_ms_per_token", "runs", "peak_rss_mb",
        "weight_bytes", "weight_bytes_by_dtype", "file_bytes", "energy_j_per_token", "energy_source", "floor",
        "config", "threads", "notes"}
FLOOR_KEYS = {"bytes_per_token", "read_bandwidth_gbs", "decode_floor_ms_per_token", "decode_ceiling_tokens_per_s",
              "prefill_flops", "matmul_gflops", "prefill_floor_ms"}


@pytest.fixture
def lm() -> LoadedModel:
    torch.manual_seed(0)
    model = Decoder(preset("tiny")).eval()
    return LoadedModel(model, tokenizer=None, source="preset:tiny", kind="slmkit", file_bytes=12345)


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """A private cache folder, fixed machine speeds and an empty powercap tree, unless a test changes them."""
    monkeypatch.setenv("SLMKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(machine, "measure_speed", lambda: dict(FAKE_SPEED))
    (tmp_path / "powercap").mkdir()
    monkeypatch.setattr(cost, "RAPL_ROOT", tmp_path / "powercap")


def fake_rapl_zone(root, name: str, label: str, energy: int, top: int = 1_000_000):
    zone = root / name
    zone.mkdir()
    (zone / "name").write_text(label + "\n")
    (zone / "energy_uj").write_text(f"{energy}\n")
    (zone / "max_energy_range_uj").write_text(f"{top}\n")
    return zone


# ---- measure_cost ----------------------------------------------------------------------------------------
def test_measure_cost_keys_types_and_runs(lm):
    result = measure_cost(lm, SMALL, prompt_ids=list(range(3, 40)))  # tokenizer is None: not needed
    assert set(result) == KEYS and set(result["floor"]) == FLOOR_KEYS
    assert len(result["runs"]) == SMALL.runs
    assert all(run["new_tokens"] == SMALL.new_tokens for run in result["runs"])
    for key in ("ttft_ms", "prefill_tokens_per_s", "decode_tokens_per_s", "decode_ms_per_token", "peak_rss_mb"):
        assert isinstance(result[key], float) and math.isfinite(result[key]) and result[key] > 0, key
    assert result["decode_ms_per_token"] == pytest.approx(1e3 / result["decode_tokens_per_s"])
    assert result["ttft_ms"] == sorted(run["ttft_ms"] for run in result["runs"])[1]  # median of 3
    assert result["weight_bytes"] == sum(result["weight_bytes_by_dtype"].values()) > 0
    assert result["file_bytes"] == 12345 and result["threads"] == torch.get_num_threads()
    assert result["config"] == {"prompt_tokens": 16, "new_tokens": 5, "runs": 3, "warmup": 1}
    assert any("ru_maxrss" in note and "whole process" in note for note in result["notes"])
    json.dumps(result)  # plain data, ready for a report file


def test_default_prompt_is_synthetic_and_deterministic(lm):
    assert cost.synthetic_prompt(20, 512) == cost.synthetic_prompt(20, 512)
    assert all(0 <= i < 512 for i in cost.synthetic_prompt(300, 512))
    result = measure_cost(lm, CostConfig(prompt_tokens=8, new_tokens=3, runs=1, warmup=1))
    assert result["runs"][0]["new_tokens"] == 3
    assert any("synthetic" in note for note in result["notes"])


def test_generation_has_no_stop_ids(lm, monkeypatch):
    """measure_cost passes no stop ids, so no run can end early at EOS."""
    seen = []

    def spy(model, prompt, config, timings):
        seen.append((len(prompt), config.max_new_tokens, set(config.stop_ids)))
        return cost_generate(model, prompt, config, timings)

    cost_generate = cost.generate
    monkeypatch.setattr(cost, "generate", spy)
    measure_cost(lm, SMALL)
    assert seen == [(16, 5, set())] * (SMALL.warmup + SMALL.runs)


def test_prompt_and_context_are_checked(lm):
    with pytest.raises(SlmError, match="16 prompt tokens wanted, 4 given"):
        measure_cost(lm, SMALL, prompt_ids=[1, 2, 3, 4])
    with pytest.raises(SlmError, match="must lie in"):
        measure_cost(lm, SMALL, prompt_ids=[600] * 16)
    with pytest.raises(SlmError, match="exceed the model's context of 256"):
        measure_cost(lm, CostConfig(prompt_tokens=250, new_tokens=10))


@pytest.mark.parametrize("field", ["prompt_tokens", "new_tokens", "runs", "warmup"])
@pytest.mark.parametrize("value", [0, -3])
def test_cost_config_rejects_non_positive(field, value):
    with pytest.raises(SlmError, match=field):
        CostConfig(**{field: value}).validate()


def test_cost_config_needs_two_new_tokens():
    with pytest.raises(SlmError, match="at least 2"):
        CostConfig(new_tokens=1).validate()
    assert CostConfig().validate() == CostConfig(128, 64, 5, 1)


# ---- floors ----------------------------------------------------------------------------------------------
def test_floor_math(lm):
    cast_weights_(lm.model, torch.bfloat16)
    result = measure_cost(lm, SMALL)
    fl = result["floor"]
    # tiny: width 64, 2 layers, 4 heads of 16 (2 kv heads), SwiGLU 128, tied 512 x 64 embedding
    linear_per_layer = 64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128
    assert fl["bytes_per_token"] == 2 * (2 * linear_per_layer + 512 * 64)  # bf16: 2 bytes per weight
    assert fl["decode_floor_ms_per_token"] == pytest.approx(fl["bytes_per_token"] / 20e9 * 1e3)
    assert fl["decode_ceiling_tokens_per_s"] == pytest.approx(1e3 / fl["decode_floor_ms_per_token"])
    T = 16
    attention = 4 * 4 * 16 * (T * (T + 1) // 2)
    assert fl["prefill_flops"] == 2 * 512 * 64 + 2 * (2 * T * linear_per_layer + attention)
    assert fl["prefill_floor_ms"] == pytest.approx(fl["prefill_flops"] / 100e9 * 1e3)
    assert (fl["read_bandwidth_gbs"], fl["matmul_gflops"]) == (20.0, 100.0)


def test_floor_counts_untied_head_and_shared_blocks():
    model = Decoder(preset("tiny", tie_embeddings=False, n_layers=4, share_blocks=2))
    linear_per_block = 64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128
    assert cost.decode_bytes_per_token(model) == 4 * (2 * linear_per_block + 64 * 512)  # stored once, fp32
    T = 3
    assert cost.prefill_flops(model, T) == 2 * 64 * 512 + 4 * (2 * T * linear_per_block + 4 * 4 * 16 * 6)


def test_attended_pairs():
    assert cost.attended_pairs(5, None) == 15
    assert cost.attended_pairs(5, 2) == 1 + 2 + 2 + 2 + 2


# ---- energy --------------------------------------------------------------------------------------------
def test_no_counter_is_unavailable_with_reason(lm, tmp_path, monkeypatch):
    result = measure_cost(lm, SMALL)
    assert result["energy_j_per_token"] is None
    assert result["energy_source"].startswith("unavailable: no RAPL counter under")
    assert all(run["energy_j"] is None for run in result["runs"])
    monkeypatch.setattr(cost, "RAPL_ROOT", tmp_path / "does-not-exist")
    assert cost.find_rapl()[0] is None


def test_rapl_energy_with_wraparound(lm, monkeypatch):
    """The fake counter advances 0.7 J per read and wraps at 1 J, so decode energy is 0.7 J a run."""
    fake_rapl_zone(cost.RAPL_ROOT, "intel-rapl:0", "package-0", energy=900_000)
    fake_rapl_zone(cost.RAPL_ROOT / "intel-rapl:0", "intel-rapl:0:0", "core", energy=5)  # sub-zone: ignored
    real_read = cost.RaplMeter.read

    def ticking_read(self):
        values = real_read(self)
        for path, value, top in zip(self.counters, values, self.max_ranges):
            path.write_text(str((value + 700_000) % top))
        return values

    monkeypatch.setattr(cost.RaplMeter, "read", ticking_read)
    result = measure_cost(lm, SMALL)
    assert result["energy_source"] == "rapl:package-0"
    assert result["energy_j_per_token"] == pytest.approx(0.7 / (SMALL.new_tokens - 1))
    assert all(run["energy_j"] == pytest.approx(1.4) for run in result["runs"])
    assert "mJ (rapl:package-0)" in format_cost(result)


def test_rapl_joules_unwraps_each_zone():
    meter = cost.RaplMeter(["package-0", "package-1"], [], [1_000_000, 2_000_000])
    assert meter.joules((999_000, 10), (1_000, 20)) == pytest.approx((2_000 + 10) / 1e6)


def test_rapl_permission_denied(monkeypatch):
    fake_rapl_zone(cost.RAPL_ROOT, "intel-rapl:0", "package-0", energy=1)

    def denied(self):
        raise PermissionError(13, "Permission denied", str(self.counters[0]))

    monkeypatch.setattr(cost.RaplMeter, "read", denied)
    meter, reason = cost.find_rapl()
    assert meter is None and reason.startswith("unavailable: permission denied reading") and "energy_uj" in reason


def test_rapl_unreadable_range(monkeypatch):
    zone = fake_rapl_zone(cost.RAPL_ROOT, "intel-rapl:0", "package-0", energy=1)
    (zone / "max_energy_range_uj").write_text("garbage")
    meter, reason = cost.find_rapl()
    assert meter is None and reason.startswith("unavailable: unreadable RAPL counter")


def test_nvml_meter_with_fake_pynvml(monkeypatch):
    class NVMLError(Exception):
        pass

    readings = iter([1_000, 1_500, 4_000])
    fake = types.SimpleNamespace(NVMLError=NVMLError, nvmlInit=lambda: None,
                                 nvmlDeviceGetHandleByIndex=lambda i: f"gpu{i}",
                                 nvmlDeviceGetTotalEnergyConsumption=lambda handle: next(readings))
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    meter, source = cost.find_meter(torch.device("cuda", 1))
    assert source == "nvml:gpu1"
    assert meter.joules(meter.read(), meter.read()) == pytest.approx(2.5)
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails
    assert cost.find_meter(torch.device("cuda", 0)) == (None, "unavailable: the model is on a GPU and pynvml "
                                                                "is not installed")


# ---- reporting -------------------------------------------------------------------------------------------
def test_format_cost_is_a_markdown_table(lm):
    text = format_cost(measure_cost(lm, SMALL))
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert len(table) == 8 and all(line.count("|") == 4 for line in table)
    assert "| measured | floor |" in table[0] and "unavailable: no RAPL counter" in text
    assert "20.0 GB/s" in text and "100 GFLOP/s" in text


def test_a_figure_beating_its_floor_is_flagged(lm, monkeypatch):
    slow = dict(FAKE_SPEED, read_bandwidth_gbs=1e-6, matmul_gflops=1e-6)  # floors of hours
    monkeypatch.setattr(machine, "measure_speed", lambda: slow)
    result = measure_cost(lm, SMALL)
    assert sum("under-measured" in note for note in result["notes"]) == 2
    assert format_cost(result).count("Warning:") == 2
    assert "Warning" not in format_cost(dict(result, floor=dict(result["floor"], prefill_floor_ms=1e-9,
                                                                decode_floor_ms_per_token=1e-9)))


# ---- the machine ---------------------------------------------------------------------------------------
def test_machine_info():
    info = machine.machine_info()
    assert set(info) >= {"cpu_model", "cores", "threads", "total_memory_bytes", "os", "python", "torch",
                         "accelerator"}
    assert info["cores"] >= 1 and info["threads"] == torch.get_num_threads() and info["torch"] == torch.__version__


def test_machine_speed_cached_atomically_and_reused(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(machine, "measure_speed", lambda: calls.append(1) or dict(FAKE_SPEED))
    replaced = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: replaced.append((src, dst)) or real_replace(src, dst))
    first = machine.machine_speed()
    assert first == FAKE_SPEED and len(calls) == 1
    path = tmp_path / "cache" / "machine.json"
    assert replaced == [(replaced[0][0], path)] and os.path.dirname(replaced[0][0]) == str(path.parent)
    assert os.listdir(path.parent) == ["machine.json"]  # no temporary file left behind
    saved = json.loads(path.read_text())
    assert saved["machines"] == {machine.machine_key(machine.machine_info()): FAKE_SPEED}
    assert machine.machine_speed() == first and len(calls) == 1  # reused, not re-measured
    machine.machine_speed(refresh=True)
    assert len(calls) == 2


def test_machine_speed_keyed_by_threads_and_survives_corrupt_cache(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(machine, "measure_speed", lambda: calls.append(1) or dict(FAKE_SPEED))
    path = tmp_path / "cache" / "machine.json"
    path.parent.mkdir()
    path.write_text("{not json")
    machine.machine_speed()
    assert len(calls) == 1 and json.loads(path.read_text())["schema"] == machine.CACHE_SCHEMA
    monkeypatch.setattr(torch, "get_num_threads", lambda: 7)
    machine.machine_speed()
    assert len(calls) == 2 and len(json.loads(path.read_text())["machines"]) == 2


def test_microbenchmarks_are_short_and_positive():
    assert machine.best_time(lambda: None, seconds=0.01, min_repeats=3) >= 0
    assert machine.measure_read_bandwidth_gbs(4 << 20) > 0
    assert machine.measure_matmul_gflops(64) > 0
