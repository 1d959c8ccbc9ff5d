"""The I/O fast paths of `cmerge add` / `export` (issue #5) give what the plain paths give.

Mapped reads against pread, the reused-buffer ‖x‖² against fresh float64 chunks, the
NaN check folded into ‖τ‖², τ from the stored base (in place in the converted copy of
the model's tensor), the lazily converted base, the background writer: each gives the
same bytes, numbers and errors as the straightforward code.
"""
from __future__ import annotations

import math
import os
import threading
import time

import pytest
import torch
from safetensors.torch import save_file

import helpers
from cmerge import Merger
from cmerge.engine import ReadAhead, StepOptions
from cmerge.io import SafetensorsSource, StreamingSafetensorsWriter, open_source
from cmerge.errors import CmergeError
from cmerge.methods.base import sq_norm


def mixed_tensors() -> dict[str, torch.Tensor]:
    """Dtypes whose byte offsets in a safetensors file are not all multiples of their item size."""
    g = torch.Generator().manual_seed(0)
    return {
        "a.odd_half": torch.randn(3, 5, generator=g).half(),  # 30 bytes: shifts what follows
        "b.float": torch.randn(7, 9, generator=g),
        "c.bf16": torch.randn(11, generator=g).bfloat16(),
        "d.double": torch.randn(4, 4, generator=g).double(),
        "e.ints": torch.arange(13, dtype=torch.int64),
        "f.mask": torch.tensor([True, False, True]),
        "g.scalar": torch.tensor(2.5),
        "h.big": torch.randn(300, 301, generator=g),
    }


@pytest.fixture
def map_everything(monkeypatch):
    monkeypatch.setattr(SafetensorsSource, "MAP_MIN_BYTES", 0)


def test_mapped_reads_equal_pread(tmp_path, map_everything):
    sd = mixed_tensors()
    path = tmp_path / "m.safetensors"
    save_file(sd, str(path))
    src, msrc = open_source(path), open_source(path, mapped=True)
    for name, want in sd.items():
        plain, mapped = src.get(name), msrc.get(name)
        assert mapped.dtype == want.dtype and mapped.shape == want.shape
        assert torch.equal(plain, want) and torch.equal(mapped, want), name
    before = path.read_bytes()
    t = msrc.get("h.big")
    t.mul_(2)  # a private map: writing to the tensor never reaches the file
    assert path.read_bytes() == before
    del src, msrc
    assert torch.equal(t, sd["h.big"] * 2)  # the tensor outlives its source


def test_mapped_read_of_a_file_truncated_after_opening(tmp_path, map_everything):
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.randn(64, 64)}, str(path))
    src, msrc = open_source(path), open_source(path, mapped=True)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 100)
    with pytest.raises(CmergeError, match="ended early"):
        msrc.get("w")
    with pytest.raises(CmergeError, match="ended early"):
        src.get("w")


def sq_norm_fresh_chunks(x: torch.Tensor, chunk: int = 1 << 22) -> float:
    """The former implementation: a fresh float64 copy of every chunk."""
    flat = x.reshape(-1)
    total = 0.0
    for i in range(0, flat.numel(), chunk):
        part = flat[i:i + chunk].to(torch.float64)
        total += float(torch.dot(part, part))
    return total


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("n,chunk", [(0, 8), (5, 8), (8, 8), (1000, 64), (1001, 64), (3 * (1 << 12) + 17, 1 << 12)])
def test_sq_norm_is_bit_identical_to_fresh_chunks(dtype, n, chunk):
    x = (torch.randn(n, generator=torch.Generator().manual_seed(n)) * 3).to(dtype)
    assert sq_norm(x, chunk) == sq_norm_fresh_chunks(x, chunk)
    assert sq_norm(x.reshape(-1, 1)[::1], chunk) == sq_norm_fresh_chunks(x, chunk)


def test_sq_norm_is_not_finite_exactly_when_x_is_not():
    x = torch.full((1000,), 3.0e38)  # finite float32 values whose squares overflow float32 but not float64
    assert math.isfinite(sq_norm(x, 64))
    for bad in (float("nan"), float("inf"), float("-inf")):
        y = x.clone()
        y[500] = bad
        assert not math.isfinite(sq_norm(y, 64))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_nan_in_a_large_mapped_tensor_is_refused(tmp_path, cli, map_everything, dtype):
    base = {k: v.to(dtype) for k, v in helpers.tiny_base(seed=0).items() if v.is_floating_point()}
    paths = [helpers.save_model(base, tmp_path / "base.safetensors")]
    good = {k: v + 0.01 for k, v in base.items()}
    paths.append(helpers.save_model(good, tmp_path / "good.safetensors"))
    bad = dict(good)
    w = bad["layers.1.mlp.down.weight"].clone()
    w[2, 3] = float("nan")
    bad["layers.1.mlp.down.weight"] = w
    paths.append(helpers.save_model(bad, tmp_path / "bad.safetensors"))
    state = tmp_path / "state"
    assert cli("init", state, "--base", paths[0], "--method", "task_arithmetic", "-q").exit_code == 0
    assert cli("add", state, paths[1], "-q").exit_code == 0
    before = helpers.snapshot(state)
    res = cli("add", state, paths[2], "-q")
    helpers.assert_one_sentence_error(res, "NaN or Inf", "layers.1.mlp.down.weight")
    assert helpers.snapshot(state) == before


def test_finite_input_whose_task_vector_norm_overflows_is_refused():
    """‖τ‖² may overflow for finite inputs (float64 precision). Issue #18 changed this test: the step
    used to be taken with ‖τ‖ = inf in the step log; now nothing non-finite is recorded, and the
    step is refused with one sentence naming the tensor and the cause."""
    base = {"w": torch.full((4, 4), -1e300, dtype=torch.float64)}
    model = {"w": torch.full((4, 4), 1e300, dtype=torch.float64)}
    m = Merger(base, "task_arithmetic", precision="float64")
    with pytest.raises(CmergeError, match=r"tensor 'w' has values so large .* norm overflows float64"):
        m.add(model)  # τ = 2e300 per entry: ‖τ‖² is inf, the input is finite
    assert m.steps == []


def test_incoming_state_dict_is_not_modified(tmp_path):
    base = helpers.tiny_base(seed=0)
    exps = helpers.experts(base, 2, seed=1)
    keep = [{k: v.clone() for k, v in e.items()} for e in exps]
    half = {k: (v.half() if v.is_floating_point() else v) for k, v in exps[1].items()}
    keep_half = {k: v.clone() for k, v in half.items()}
    m = Merger(base, "average")
    m.add(exps[0])
    m.add(half)  # converted to float32: τ is computed in place in the converted copy
    for e, k in zip([exps[0], half], [keep[0], keep_half]):
        assert all(torch.equal(e[n], k[n]) for n in e)


def specs_of(sd):
    return [(n, t.dtype, tuple(t.shape)) for n, t in sd.items()]


@pytest.mark.parametrize("background", [False, True])
def test_writer_round_trip(tmp_path, background):
    sd = mixed_tensors()
    sd["i.large"] = torch.randn(3 << 20)  # 12 MiB: its writeback is started early
    path = tmp_path / "w.safetensors"
    w = StreamingSafetensorsWriter(path, specs_of(sd), {"k": "v"}, background=background)
    for n, t in sd.items():
        w.write(n, t)
    w.close()
    got = open_source(path)
    assert got.metadata == {"k": "v"}
    assert all(torch.equal(got.get(n), t) for n, t in sd.items())


def test_background_writer_errors_and_abort(tmp_path, monkeypatch):
    sd = {"a": torch.ones(3), "b": torch.zeros(2), "c": torch.ones(1)}
    w = StreamingSafetensorsWriter(tmp_path / "x.safetensors", specs_of(sd), background=True)
    with pytest.raises(ValueError):
        w.write("b", sd["b"])  # out of order: refused at once, in the caller

    def failing(self, *args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(StreamingSafetensorsWriter, "_write_bytes", failing)
    for n, t in sd.items():
        try:
            w.write(n, t)
        except OSError:  # a later write may already see the error
            break
    with pytest.raises(OSError, match="No space"):
        w.close()
    w.abort()  # after a failed close, as state.add does: no error, no wait
    monkeypatch.undo()
    # abort drops what is still queued and stops the thread
    w2 = StreamingSafetensorsWriter(tmp_path / "y.safetensors", specs_of(sd), background=True)
    w2.write("a", sd["a"])
    w2.abort()
    assert not w2.running


def test_prefetch_keeps_order_bounds_lookahead_and_raises_at_the_item():
    produced: list[str] = []
    lock = threading.Lock()

    def produce(n: str) -> str:
        time.sleep(0.002 * (hash(n) % 3))
        with lock:
            produced.append(n)
        if n == "k13":
            raise CmergeError("bad k13")
        return n.upper()

    names = [f"k{i:02d}" for i in range(20)]
    seen = []
    with pytest.raises(CmergeError, match="bad k13"):
        for n, item in ReadAhead(produce, names, depth=2):
            assert item == n.upper()
            with lock:
                assert len(produced) <= len(seen) + 1 + 3  # the one in use and at most depth + 1 ahead
            seen.append(n)
    assert seen == names[:13]
    assert list(ReadAhead(str.upper, [], depth=2)) == []
    assert [i for _, i in ReadAhead(str.upper, ["a", "b", "c"], depth=1)] == ["A", "B", "C"]


@pytest.mark.parametrize("base_dtype,x_dtype", [(torch.float16, torch.float16), (torch.bfloat16, torch.float32),
                                                (torch.float32, torch.float16), (torch.float64, torch.float64),
                                                (torch.float64, torch.float32)])
@pytest.mark.parametrize("compute", [torch.float32, torch.float64])
def test_rules_see_the_same_base_and_task_vector(base_dtype, x_dtype, compute):
    """τ from the stored base (no compute-dtype copy of it) and the lazily converted base are exact."""
    from cmerge.io import MappingSource
    from cmerge.engine import Plan, run_step
    from cmerge.methods.base import Method, TensorUpdate

    g = torch.Generator().manual_seed(3)
    b = {"w": (torch.randn(6, 5, generator=g, dtype=torch.float64) * 3).to(base_dtype)}
    x = {"w": (b["w"].double() + torch.randn(6, 5, generator=g, dtype=torch.float64) * 1e-3).to(x_dtype)}
    keep = {k: v.clone() for k, v in x.items()}
    seen = {}

    class Probe(Method):
        name, summary, accumulators = "probe", "", ("M",)

        def rule(self, s):
            seen["tau"], seen["base"] = s.tau, s.base
            return TensorUpdate({"M": s.tau})

    class Sink:
        def put(self, acc, name, tensor, rows=None):
            seen["put"] = tensor

    plan = Plan({"w": open_source(b).meta("w")}, {"w": "other"})
    out = run_step(Probe(), {}, 1, plan, MappingSource(b), MappingSource(x), None, Sink(),
                   options=StepOptions(compute_dtype=compute, acc_dtype=compute))
    want_tau = x["w"].to(compute) - b["w"].to(compute)
    assert seen["tau"].dtype == compute and torch.equal(seen["tau"], want_tau)
    assert seen["base"].dtype == compute and torch.equal(seen["base"], b["w"].to(compute))
    assert out.tau_norm == sq_norm_fresh_chunks(want_tau) ** 0.5
    assert torch.equal(x["w"], keep["w"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kept_task_vectors_are_never_overwritten(dtype):
    """average stores τ itself at step 1: every kept τ is its own tensor, whatever the stored dtype."""
    g = torch.Generator().manual_seed(7)
    base = {f"l{i}.weight": torch.randn(8, 8, generator=g).to(dtype) for i in range(6)}
    model = {n: (w.float() + torch.randn(8, 8, generator=g) * 0.1).to(dtype) for n, w in base.items()}
    m = Merger(base, "average")
    m.add(model)
    got = m.state_dict()
    for n in base:
        assert torch.equal(got[n].float() if dtype == torch.float32 else got[n],
                           (base[n].float() + (model[n].float() - base[n].float())).to(got[n].dtype)), n


def test_state_add_then_export_of_a_step_that_stores_tau(tmp_path, cli, map_everything):
    """The same through the CLI: background writer, mapped reads, step 1 of average, float16 files."""
    g = torch.Generator().manual_seed(8)
    base = {f"l{i}.weight": torch.randn(16, 16, generator=g).half() for i in range(5)}
    model = {n: (w.float() + torch.randn(16, 16, generator=g) * 0.1).half() for n, w in base.items()}
    pb, pm = helpers.save_model(base, tmp_path / "b.safetensors"), helpers.save_model(model, tmp_path / "m.safetensors")
    state = tmp_path / "state"
    assert cli("init", state, "--base", pb, "--method", "average", "-q").exit_code == 0
    assert cli("add", state, pm, "-q").exit_code == 0
    acc = open_source(next(state.glob("gen-*/accumulators.safetensors")))
    for n in base:
        assert torch.equal(acc.get(f"M/{n}"), model[n].float() - base[n].float()), n
    assert cli("export", state, tmp_path / "out", "-q").exit_code == 0
    out = open_source(tmp_path / "out")
    for n in base:
        assert torch.equal(out.get(n), (base[n].float() + (model[n].float() - base[n].float())).half()), n
