"""Large tensors streamed in blocks of rows (issue #5) give what whole tensors give.

`cmerge add` feeds element-wise rules row blocks of large tensors (read with pread,
hashed incrementally, written with `write_rows`), and `export` does the same for the
merged model. Here the block size is made tiny, so every tensor of a small model is
split, and each step's accumulators, scalars, hashes and the exported model are
compared with the whole-tensor path of the same code and with float64 references.
"""
from __future__ import annotations

import threading

import pytest
import torch
from safetensors.torch import save_file

import helpers
from cmerge import Merger
from cmerge.engine import ReadAhead, StepOptions, row_blocks
from cmerge.io import StreamingSafetensorsWriter, data_offsets, open_source
from cmerge.errors import CmergeError
from cmerge.linalg import opcm_project
from cmerge.state import init_state, open_state

METHODS = [("opcm", {}), ("opcm", {"norm_average": "projected"}), ("task_arithmetic", {"lam": 0.3}),
           ("average", {}), ("magmax", {}), ("ema", {}), ("fisher_merge", {}), ("ties", {})]


def run_chain(tmp_path, tag, method, params, block, monkeypatch, dtype=torch.float32, steps=3):
    """init + ``steps`` adds + export in blocks of ``block`` elements; returns what each step left."""
    options = StepOptions(block_elements=block)
    base = helpers.tiny_base(seed=1, hidden=12, vocab=23, dtype=dtype)
    models = helpers.experts(base, steps, seed=2)
    root = tmp_path / "models"
    if not root.exists():
        helpers.save_model(base, root / "base")
        for i, m in enumerate(models):
            helpers.save_model(m, root / f"m{i}")
            save_file(helpers.fisher_like(m, i), str(root / f"m{i}" / "exp_avg_sq.safetensors"))
    st = init_state(tmp_path / tag, root / "base", method, **params)
    out = []
    for i in range(steps):
        entry = st.add(root / f"m{i}", options=options)
        acc = open_source(next((tmp_path / tag).glob("gen-*/accumulators.safetensors")))
        out.append({"entry": entry, "acc": {n: acc.get(n) for n in acc.keys()},
                    "scalars": dict(open_state(tmp_path / tag).manifest.scalars)})
    st.export(tmp_path / f"{tag}-out", options=options)
    return out, helpers.load_safetensors_dir(tmp_path / f"{tag}-out"), base, models


def count_row_writes(monkeypatch) -> list[int]:
    calls = [0]
    original = StreamingSafetensorsWriter.write_rows

    def spy(self, name, block):
        calls[0] += 1
        return original(self, name, block)

    monkeypatch.setattr(StreamingSafetensorsWriter, "write_rows", spy)
    return calls


@pytest.mark.parametrize("method,params", METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_blocks_give_the_whole_tensor_results(tmp_path, monkeypatch, method, params, dtype):
    whole, whole_out, base, models = run_chain(tmp_path, "whole", method, params, 1 << 40, monkeypatch, dtype)
    calls = count_row_writes(monkeypatch)
    blocks, blocks_out, _, _ = run_chain(tmp_path, "blocks", method, params, 30, monkeypatch, dtype)
    # the blocks path did run; TIES needs whole tensors, and fisher_merge's two accumulators
    # of a tensor lie side by side in the file (its export is still streamed by rows)
    assert calls[0] > (len(whole[0]["acc"]) if method in ("ties", "fisher_merge") else 100)
    for w, b in zip(whole, blocks):
        assert w["acc"].keys() == b["acc"].keys()
        for n in w["acc"]:
            assert torch.equal(w["acc"][n], b["acc"][n]), n  # element-wise: bit for bit
        assert w["entry"]["sha256"] == b["entry"]["sha256"]  # the incremental hash is the whole one
        for k, v in w["scalars"].items():
            if isinstance(v, float):
                assert b["scalars"][k] == pytest.approx(v, rel=1e-12, abs=0), k  # sums added in another order
            else:
                assert b["scalars"][k] == v, k
    assert whole_out.keys() == blocks_out.keys()
    for n in whole_out:
        # export scales by λ, which may differ from the whole run's in the last bits
        assert torch.allclose(whole_out[n].double(), blocks_out[n].double(), rtol=1e-6, atol=0), n
    if method == "task_arithmetic":  # and against the float64 reference
        want = helpers.ref_task_arithmetic(base, models, lam=0.3)[-1]
        assert helpers.max_rel_err(blocks_out, want) < (1e-6 if dtype == torch.float32 else 2e-3)


def test_blocks_path_refuses_nan_and_a_changed_base_like_the_whole_path(tmp_path, monkeypatch):
    options = StepOptions(block_elements=30)
    base = helpers.tiny_base(seed=1, hidden=12, vocab=23)
    pb = helpers.save_model(base, tmp_path / "base")
    m = helpers.expert(base, 1)
    bad = dict(m)
    bad["embed_tokens.weight"] = m["embed_tokens.weight"].clone()
    bad["embed_tokens.weight"][17, 3] = float("nan")  # in a late block of a split tensor
    st = init_state(tmp_path / "s", pb, "task_arithmetic")
    st.add(helpers.save_model(m, tmp_path / "m"), options=options)
    before = helpers.snapshot(tmp_path / "s")
    with pytest.raises(CmergeError, match="NaN"):
        st.add(helpers.save_model(bad, tmp_path / "bad"), options=options)
    assert helpers.snapshot(tmp_path / "s") == before
    changed = dict(base)
    changed["embed_tokens.weight"] = base["embed_tokens.weight"].clone()
    changed["embed_tokens.weight"][20, 0] += 1.0
    helpers.save_model(changed, pb)
    with pytest.raises(CmergeError, match="changed since"):
        st.add(helpers.save_model(helpers.expert(base, 2), tmp_path / "m2"), options=options)
    with pytest.raises(CmergeError, match="changed since"):
        st.export(tmp_path / "out", options=options)
    assert helpers.snapshot(tmp_path / "s") == before


def test_row_blocks_cover_every_row_once():
    assert row_blocks((10, 3), 1 << 20) is None
    assert row_blocks((), 1) is None
    for shape, block in [((10, 3), 7), ((10, 3), 3), ((10, 3), 2), ((7,), 3), ((5, 2, 2), 8)]:
        bl = row_blocks(shape, block)
        rows = [r for s in bl for r in range(s.start, s.stop)]
        assert rows == list(range(shape[0])), (shape, block)
        per_row = 1 if len(shape) == 1 else shape[1] * (shape[2] if len(shape) > 2 else 1)
        assert all((s.stop - s.start) * per_row <= max(block, per_row) for s in bl)


def test_get_rows_reads_exactly_those_rows(tmp_path):
    g = torch.Generator().manual_seed(0)
    sd = {"a": torch.randn(9, 4, generator=g).half(), "b": torch.randn(7, generator=g).double(),
          "c": torch.randn(5, 2, 3, generator=g)}
    save_file(sd, str(tmp_path / "m.safetensors"))
    src = open_source(tmp_path / "m.safetensors")
    for n, t in sd.items():
        for rows in [slice(0, 1), slice(2, 5), slice(0, t.shape[0]), slice(t.shape[0] - 1, t.shape[0])]:
            assert torch.equal(src.get(n, rows), t[rows]), (n, rows)
    with pytest.raises(CmergeError, match="no tensor"):
        src.get("zz", slice(0, 1))
    start, _ = data_offsets(tmp_path / "m.safetensors")
    with open(tmp_path / "m.safetensors", "r+b") as f:  # truncated after opening: the data is gone
        f.truncate(start + 8)
    for n, t in sd.items():
        with pytest.raises(CmergeError, match="ended early"):
            src.get(n, slice(t.shape[0] - 1, t.shape[0]))


def test_writer_rows_in_order_only(tmp_path):
    specs = [("a", torch.float32, (4, 2)), ("b", torch.float32, (3,))]
    w = StreamingSafetensorsWriter(tmp_path / "x.safetensors", specs)
    a = torch.arange(8.0).reshape(4, 2)
    with pytest.raises(ValueError):
        w.write_rows("b", torch.zeros(1))  # not the current tensor
    w.write_rows("a", a[:1])
    with pytest.raises(ValueError):
        w.write("a", a)  # a whole tensor in the middle of a row stream
    with pytest.raises(ValueError):
        w.write_rows("a", a[:4])  # more rows than are left
    with pytest.raises(ValueError):
        w.write_rows("a", torch.zeros(1, 3))  # wrong row shape
    w.write_rows("a", a[1:3])
    w.write_rows("a", a[3:])
    w.write("b", torch.ones(3))
    w.close()
    got = open_source(tmp_path / "x.safetensors")
    assert torch.equal(got.get("a"), a) and torch.equal(got.get("b"), torch.ones(3))
    w2 = StreamingSafetensorsWriter(tmp_path / "y.safetensors", specs)
    w2.write_rows("a", a[:2])
    with pytest.raises(ValueError, match="only 0 of 2"):
        w2.close()  # a tensor left half-written


def test_large_items_are_not_read_ahead():
    """A large item is read only once the consumer is done with the previous one."""
    sizes = {"s1": 10, "big1": 500, "s2": 10, "s3": 10, "big2": 500, "big3": 500, "s4": 10}
    live: set[str] = set()
    lock = threading.Lock()
    peaks = []

    def produce(n):
        with lock:
            live.add(n)
            peaks.append(sum(sizes[x] for x in live))
        return n

    for n, _ in ReadAhead(produce, list(sizes), depth=3, size=sizes.__getitem__, budget=100):
        with lock:
            peaks.append(sum(sizes[x] for x in live))
        for _ in range(2000):  # give the reader every chance to run ahead
            pass
        with lock:
            live.discard(n)
    assert max(peaks) <= 500 + 100 - 10  # never two large ones, never a large one beside > budget


@pytest.mark.parametrize("shape", [(12, 30), (30, 12)])
@pytest.mark.parametrize("variant", [{}, {"keep_diagonal": True}, {"drop_cross_blocks": True}])
@pytest.mark.parametrize("rank", [None, 3])
def test_projection_written_over_its_input_is_the_same(shape, variant, rank, monkeypatch):
    """opcm_project(out=x) gives P(X) bit for bit, also when X is read in several column chunks,
    and for a rank-deficient D (the LAPACK SVD route)."""
    monkeypatch.setattr("cmerge.linalg.COLUMN_CHUNK_ELEMENTS", 64)
    g = torch.Generator().manual_seed(5)
    d = torch.randn(*shape, generator=g) @ torch.diag(torch.linspace(1, 0.01, shape[1]))
    if rank is not None:
        d = torch.randn(shape[0], rank, generator=g) @ torch.randn(rank, shape[1], generator=g)
    x = torch.randn(*shape, generator=g)
    keep = x.clone()
    want, k = opcm_project(d, x, 0.5, **variant)
    assert torch.equal(x, keep)  # without out, X is left alone
    got, k2 = opcm_project(d, x, 0.5, out=x, **variant)
    assert got.data_ptr() == x.data_ptr() and k2 == k
    assert torch.equal(got, want)
    if rank is None:
        ref, _ = helpers.ref_project(d.double(), keep.double(), 0.5, **variant)
        assert (got.double() - ref).norm() / ref.norm() < 1e-6
    elif not variant:  # the null-space terms depend on LAPACK's basis; Theorem 5.1 does not
        assert abs(float((got.double() * d.double()).sum())) < 1e-5 * float(got.norm() * d.norm())


def test_rules_leave_a_task_vector_they_do_not_own():
    """The in-memory Merger and a rule given tau_owned=False never write into τ."""
    from cmerge.methods import get_method
    from cmerge.methods.base import TensorStep

    g = torch.Generator().manual_seed(2)
    s_prev, tau = torch.randn(8, 6, generator=g), torch.randn(8, 6, generator=g)
    for name in ("opcm", "task_arithmetic", "average", "magmax", "ema", "ties"):
        m = get_method(name)
        for projected in (True, False):
            keep = tau.clone()
            step = TensorStep(name="w", t=2, base=torch.zeros(8, 6), tau=tau, acc={a: s_prev for a in m.accumulators},
                              scalars={}, projected=projected)
            m.rule(step)
            assert torch.equal(tau, keep), (name, projected)
    base = helpers.tiny_base()
    model = helpers.expert(base, 1)
    keep = {n: t.clone() for n, t in model.items()}
    merger = Merger(base, "opcm")
    merger.add(helpers.expert(base, 0))
    merger.add(model)
    assert all(torch.equal(model[n], keep[n]) for n in model)


@pytest.mark.parametrize("base_dtype", [torch.float16, torch.float32])
def test_a_rule_that_reads_the_base_gets_its_rows(monkeypatch, base_dtype):
    """The engine drops the base tensor once τ is formed; a rule that asks gets it read again."""
    from cmerge.engine import Plan, run_step
    from cmerge.io import MappingSource
    from cmerge.methods.base import Method, TensorUpdate

    g = torch.Generator().manual_seed(4)
    b = {"w": torch.randn(10, 5, generator=g).to(base_dtype), "v": torch.randn(3, generator=g).to(base_dtype)}
    x = {n: (t.float() + 0.1).to(base_dtype) for n, t in b.items()}
    seen: dict[str, list] = {"base": [], "tau": []}

    class Probe(Method):
        name, summary, accumulators = "probe", "", ("M",)

        def elementwise(self, projected):
            return True

        def rule(self, s):
            seen["base"].append((s.name, s.base.clone()))
            seen["tau"].append((s.name, s.tau.clone()))
            return TensorUpdate({"M": s.base + s.tau})

    class Sink:
        def __init__(self):
            self.parts: dict[str, list] = {}

        def put(self, acc, name, tensor, rows=None):
            self.parts.setdefault(name, []).append(tensor)

    sink = Sink()
    plan = Plan({n: MappingSource(b).meta(n) for n in b}, {"w": "linear", "v": "other"})
    run_step(Probe(), {}, 1, plan, MappingSource(b), MappingSource(x), None, sink,
             options=StepOptions(block_elements=12))
    assert len(sink.parts["w"]) == 5  # 10 rows of 5 in blocks of 2 rows
    for n in b:
        got_base = torch.cat([t for m, t in seen["base"] if m == n])
        got_tau = torch.cat([t for m, t in seen["tau"] if m == n])
        assert torch.equal(got_base, b[n].float())
        assert torch.equal(got_tau, x[n].float() - b[n].float())
        assert torch.equal(torch.cat(sink.parts[n]), x[n].float())
