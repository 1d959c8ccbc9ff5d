"""Reference computations for `benchmarks/speed.py`, each run as its own process.

``approach``  one OPCM step the way the paper's code computes it: the base, the merged
              model and the new model all in memory in float32; for every linear weight a
              full SVD (``full_matrices=True``) of D = θ_merged − θ0, C = UᵀXV with the full
              U and V, the k × k block and the diagonal of C zeroed, P = U C' Vᵀ; then
              Eq. 10. Prints timings and, with ``--compare``, how far cmerge's exported
              model is from it. ``--precision float64``: the same arithmetic in float64,
              the precision that issue #5's exactness target asks of the result.
``exact``     the same step in float64 from cmerge's own stored S_{t−1} (so both start
              from identical numbers), with an independent thin-SVD implementation of
              Eq. 9; compares P(τ_t) = S_t − S_{t−1} and λ_t with cmerge's, for one or more
              states that started from the same S_{t−1} (``--accs``: one per kernel), and
              with ``--with-reference`` the reference approach's own float32 arithmetic
              (``project_full_svd``) on the same S_{t−1} and τ_t.
``rates``     the machine's rates that bound a step (the roofline): read and write bandwidth
              of a file, and for each weight shape and precision the time of one r·m·n
              product, of the thin SVD and of the ``eigh`` of the r × r Gram matrix.
``candidates`` the kernel candidates on one task-vector-like pair per weight shape: time
              and relative error against the float64 thin-SVD computation.
``floor``     the I/O floor: read the given safetensors files (`safetensors.torch.load` of
              the file's bytes: every byte is read, as cmerge must; `load_file` maps the
              file lazily and reads nothing until a tensor is touched), write the tensors
              of one of them back with `save_file`; then fsync the written file, timed
              apart (cmerge fsyncs what it writes, plain `save_file` does not).

Every subcommand prints one JSON object on its last line.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed_models import LazyModel, load_model  # noqa: E402


def reference_k(s: torch.Tensor, alpha: float) -> int:
    c = torch.cumsum(s.double(), 0) / s.double().sum()
    c[-1] = 1.0
    above = (c > alpha).nonzero()
    return int(above[0, 0]) if len(above) else 0


def project_full_svd(d: torch.Tensor, x: torch.Tensor, alpha: float) -> torch.Tensor:
    """The paper's code's arithmetic: full SVD, full-matrix products, mask (Eq. 9)."""
    u, s, vh = torch.linalg.svd(d, full_matrices=True)
    k = reference_k(s, alpha)
    c = u.T @ x @ vh.T
    c[:k, :k] = 0
    c.diagonal().zero_()
    return u @ c @ vh


def project_float64(d: torch.Tensor, x: torch.Tensor, alpha: float) -> torch.Tensor:
    """Eq. 9 in float64 from the thin SVD, written out term by term (equal to the full-SVD mask)."""
    d, x = d.double(), x.double()
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    k = reference_k(s, alpha)
    coeff = u.T @ x  # r × n
    block = coeff[:k] @ vh[:k].T
    diag = (coeff * vh).sum(1)[k:]
    return x - u[:, :k] @ block @ vh[:k] - (u[:, k:] * diag) @ vh[k:]


def cmd_approach(a: argparse.Namespace) -> dict:
    projected = set(json.loads(Path(a.projected).read_text()))
    t0 = time.perf_counter()
    dtype = {"float32": torch.float32, "float64": torch.float64}[a.precision]
    base = load_model(Path(a.base), dtype)
    merged = load_model(Path(a.merged), dtype)
    new = load_model(Path(a.model), dtype)
    t_load = time.perf_counter() - t0
    t1 = time.perf_counter()
    lam_prev, norm_sum = a.lam, a.norm_sum
    if a.t == 2:  # merged = θ_1, λ_1 = 1, N̄_1 = ‖τ_1‖
        lam_prev = 1.0
        norm_sum = math.sqrt(sum(float(((merged[n] - base[n]) ** 2).sum()) for n in base))
    tau_sq = 0.0
    a_sq = 0.0
    for name in base:
        tau = new.pop(name).sub_(base[name])
        tau_sq += float((tau.double() ** 2).sum())
        d = merged[name].sub_(base[name])  # D = θ_{t−1} − θ0, in place (no fourth model)
        p = project_full_svd(d, tau, a.alpha) if name in projected else tau
        acc = d.mul_(lam_prev).add_(p)  # A = λ_{t−1} D + P(τ_t)
        a_sq += float((acc.double() ** 2).sum())
        del tau, p
    mean_norm = (norm_sum + math.sqrt(tau_sq)) / a.t
    lam = math.sqrt(a_sq) / mean_norm
    for name in base:
        merged[name].div_(lam).add_(base[name])
    t_compute = time.perf_counter() - t1
    out = {"load_s": t_load, "compute_s": t_compute, "lambda": lam}
    if a.compare:  # in row blocks, so that comparing adds next to nothing to the peak RSS
        worst, worst_name = 0.0, None
        theirs = LazyModel(Path(a.compare))
        for name in base:
            ref_all, base_all = merged[name], base[name]
            rows = max(1, (1 << 20) // max(1, ref_all[0].numel()))
            num = den = 0.0
            for r0 in range(0, ref_all.shape[0], rows):
                sl = slice(r0, r0 + rows)
                b = base_all[sl].double()
                ref_tv = ref_all[sl].double() - b
                cm_tv = theirs.rows(name, sl).double() - b
                num += float(((cm_tv - ref_tv) ** 2).sum())
                den += float((ref_tv ** 2).sum())
            rel = (num / den) ** 0.5 if den > 0 else 0.0
            if rel > worst:
                worst, worst_name = rel, name
        out.update(max_rel_diff=worst, max_rel_diff_tensor=worst_name)
    return out


def _acc(path: str):
    from cmerge.state import accumulator_key

    h = safe_open(path, framework="pt", device="cpu")
    return lambda name: h.get_tensor(accumulator_key("S", name))


def cmd_exact(a: argparse.Namespace) -> dict:
    """Per state of ``--accs`` (label, new accumulator file, its λ_t): the largest relative error of its
    P(τ_t) over the checked tensors and of its λ_t, against float64 from the shared S_{t−1}."""
    projected = set(json.loads(Path(a.projected).read_text()))
    names = set(json.loads(Path(a.names).read_text())) if a.names else None
    accs = json.loads(Path(a.accs).read_text())
    prev = _acc(a.prev_acc)
    news = {x["label"]: _acc(x["path"]) for x in accs}
    base, inc = LazyModel(Path(a.base)), LazyModel(Path(a.model))
    out = {x["label"]: {"checked": 0, "max_rel_p": 0.0, "max_rel_p_tensor": None, "max_rel_s": 0.0}
           for x in accs}
    ref = {"checked": 0, "max_rel_p": 0.0, "max_rel_p_tensor": None} if a.with_reference else None
    s_sq = {x["label"]: 0.0 for x in accs}
    tau_sq = 0.0
    for name in base.keys():
        tau = inc.get(name, torch.float64) - base.get(name, torch.float64)
        tau_sq += float((tau ** 2).sum())
        s_prev = prev(name).double()
        check = names is None or name in names
        p64 = (project_float64(s_prev, tau, a.alpha) if name in projected else tau) if check else None
        for label, new_s in news.items():
            s_new = new_s(name).double()
            if not check:
                s_sq[label] += float((s_new ** 2).sum())  # unchecked: cmerge's own S_t enters λ
                continue
            s64 = s_prev + p64
            s_sq[label] += float((s64 ** 2).sum())
            o = out[label]
            rel_p = float(((s_new - s_prev) - p64).norm() / p64.norm())
            o["checked"] += 1
            if rel_p > o["max_rel_p"]:
                o["max_rel_p"], o["max_rel_p_tensor"] = rel_p, name
            o["max_rel_s"] = max(o["max_rel_s"], float((s_new - s64).norm() / s64.norm()))
        if ref is not None and check and name in projected:  # the paper's float32 arithmetic, same S_{t−1}, τ_t
            p32 = project_full_svd(s_prev.float(), tau.float(), a.alpha)
            rel_p = float((p32.double() - p64).norm() / p64.norm())
            ref["checked"] += 1
            if rel_p > ref["max_rel_p"]:
                ref["max_rel_p"], ref["max_rel_p_tensor"] = rel_p, name
    for x in accs:
        mean_norm = (a.norm_sum + math.sqrt(tau_sq)) / a.t
        lam64 = math.sqrt(s_sq[x["label"]]) / mean_norm
        out[x["label"]].update(lambda64=lam64, lambda_rel=abs(lam64 - x["lambda"]) / lam64)
    return {"states": out, "reference": ref}


def _median_time(fn, reps: int) -> float:
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2]


def cmd_rates(a: argparse.Namespace) -> dict:
    """The rates that bound a step on this machine (one process, the threads it was given)."""
    out: dict = {"threads": torch.get_num_threads(), "shapes": []}
    path = Path(a.scratch)
    nbytes = a.io_mb << 20
    block = os.urandom(1 << 20)
    t0 = time.perf_counter()
    with open(path, "wb") as f:  # written and made durable, as cmerge writes an accumulator file
        for _ in range(a.io_mb):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    out["write_gbs"] = nbytes / (time.perf_counter() - t0) / 1e9
    buf = bytearray(nbytes)

    def read() -> None:
        with open(path, "rb", buffering=0) as f:
            f.readinto(buf)

    out["read_gbs"] = nbytes / _median_time(read, 3) / 1e9  # from the page cache, as a step reads fresh files
    path.unlink()
    g = torch.Generator().manual_seed(0)
    for m, n, svd_precisions in json.loads(a.shapes):
        r = min(m, n)
        row = {"shape": [m, n]}
        for name, dt in (("float32", torch.float32), ("float64", torch.float64)):
            d = torch.randn(r, max(m, n), generator=g, dtype=torch.float64).to(dt)
            reps = 3 if r * max(m, n) <= (1 << 22) else 1
            u = torch.randn(r, r, generator=g, dtype=torch.float64).to(dt)
            row[f"gemm_{name}"] = _median_time(lambda: u @ d, reps)  # one r·m·n product
            gram = d @ d.T
            row[f"eigh_{name}"] = _median_time(lambda: torch.linalg.eigh(gram), reps)
            if name in svd_precisions:
                row[f"svd_{name}"] = _median_time(lambda: torch.linalg.svd(d, full_matrices=False), reps)
        out["shapes"].append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    return out


def _candidate_factors(name: str, d: torch.Tensor):
    """(u, s, v, product dtype) of a wide d by one candidate route (see cmd_candidates)."""
    f32 = torch.float32
    if name == "thin float32 SVD, float32 products":
        u, s, vh = torch.linalg.svd(d.float(), full_matrices=False)
        return u, s.double(), vh.mT, f32
    if name == "float32 eigh of the Gram matrix, float32 products":
        d32 = d.float()
        lam, u = torch.linalg.eigh(d32 @ d32.mT)
        u = u.flip(1)
        w = d32.mT @ u
        s = torch.linalg.vector_norm(w, dim=0)
        order = torch.argsort(s, descending=True)
        u, s, w = u[:, order], s[order], w[:, order]
        return u, s.double(), w / s.clamp_min(torch.finfo(f32).tiny), f32
    raise ValueError(name)


def _project_with(u, s, v, x, alpha: float, dtype) -> torch.Tensor:
    k = reference_k(s, alpha)
    u, v, x = u.to(dtype), v.to(dtype), x.to(dtype)
    coeff = u.mT @ x
    block = coeff[:k] @ v[:, :k]
    diag = torch.linalg.vecdot(coeff[k:], v[:, k:].mT)
    left = torch.cat([u[:, :k] @ block, u[:, k:] * diag], 1)
    return torch.addmm(x, left, v.mT, alpha=-1.0)


def cmd_candidates(a: argparse.Namespace) -> dict:
    """Each candidate kernel on D = τ_1 + τ_2 + τ_3 + τ_4 and X = τ_5 of speed_models (a step-5-like pair)
    for each weight shape: median time and relative error against the float64 thin-SVD computation."""
    from cmerge.linalg import opcm_project
    from speed_models import task_vector

    rows = []
    for m, n in json.loads(a.shapes):
        name = f"candidates.{m}x{n}.weight"
        d = sum(task_vector(name, (m, n), t) for t in range(1, 5)).float()
        x = task_vector(name, (m, n), 5).float()
        truth = project_float64(d.double(), x.double(), a.alpha)
        wide = m <= n
        dw, xw = (d, x) if wide else (d.T.contiguous(), x.T.contiguous())
        runs = {
            "reference approach (full float32 SVD)": lambda: project_full_svd(d, x, a.alpha),
            "thin float32 SVD, float32 products": None,
            "float32 eigh of the Gram matrix, float32 products": None,
            "cmerge float32 kernel": lambda: opcm_project(d, x, a.alpha, kernel="float32")[0],
            "cmerge float64 kernel": lambda: opcm_project(d, x, a.alpha, kernel="float64")[0],
        }
        for cand, fn in runs.items():
            if fn is None:
                def fn(cand=cand):
                    u, s, v, dt = _candidate_factors(cand, dw)
                    p = _project_with(u, s, v, xw, a.alpha, dt)
                    return p if wide else p.T
            reps = 3 if m * n <= (1 << 22) else 1
            if reps > 1:
                fn()  # warm-up: the first call of a size pays for allocations
            result = []
            t = _median_time(lambda: result.append(fn()), reps)
            err = float((result[-1].double() - truth).norm() / truth.norm())
            rows.append({"shape": [m, n], "candidate": cand, "seconds": t, "rel_error": err})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return {"rows": rows, "threads": torch.get_num_threads()}


def cmd_floor(a: argparse.Namespace) -> dict:
    t0 = time.perf_counter()
    keep = None
    for path in a.read:
        files = sorted(Path(path).glob("*.safetensors")) if Path(path).is_dir() else [Path(path)]
        loaded = {}
        for f in files:
            loaded.update(load(f.read_bytes()))
        if path == a.write_from:
            keep = loaded
        del loaded
    save_file(keep, a.out)
    t1 = time.perf_counter()
    fd = os.open(a.out, os.O_RDONLY)  # cmerge makes its writes durable; time that apart
    os.fsync(fd)
    os.close(fd)
    return {"floor_s": t1 - t0, "fsync_s": time.perf_counter() - t1}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("approach")
    p.add_argument("--base", required=True)
    p.add_argument("--merged", required=True, help="θ_{t−1}: model 1 for t = 2, else cmerge's float32 export")
    p.add_argument("--model", required=True)
    p.add_argument("--t", type=int, required=True)
    p.add_argument("--lam", type=float, default=1.0)
    p.add_argument("--norm-sum", type=float, default=0.0)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--projected", required=True, help="JSON list of the projected tensor names")
    p.add_argument("--compare", help="cmerge's float32 export after step t")
    p.add_argument("--precision", choices=("float32", "float64"), default="float32",
                   help="the models and the arithmetic in this dtype (the paper's code: float32)")
    p = sub.add_parser("exact")
    p.add_argument("--base", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--prev-acc", required=True)
    p.add_argument("--accs", required=True,
                   help="JSON file: [{label, path (the new accumulator file), lambda (its λ_t)}], states that "
                        "started from --prev-acc")
    p.add_argument("--t", type=int, required=True)
    p.add_argument("--norm-sum", type=float, required=True, help="Σ‖τ_i‖ for i < t")
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--projected", required=True)
    p.add_argument("--names", help="JSON list: check only these tensors")
    p.add_argument("--with-reference", action="store_true",
                   help="also the reference approach's float32 arithmetic on the same S_{t−1} and τ_t")
    p = sub.add_parser("rates")
    p.add_argument("--shapes", required=True,
                   help="JSON list of [m, n, precisions whose thin SVD is timed], e.g. [[768, 3072, [\"float32\"]]]")
    p.add_argument("--scratch", required=True, help="a file path for the bandwidth test (removed)")
    p.add_argument("--io-mb", type=int, default=512)
    p = sub.add_parser("candidates")
    p.add_argument("--shapes", required=True, help="JSON list of [m, n]")
    p.add_argument("--alpha", type=float, default=0.5)
    p = sub.add_parser("floor")
    p.add_argument("--read", nargs="+", required=True)
    p.add_argument("--write-from", required=True)
    p.add_argument("--out", required=True)
    a = ap.parse_args()
    result = {"approach": cmd_approach, "exact": cmd_exact, "floor": cmd_floor, "rates": cmd_rates,
              "candidates": cmd_candidates}[a.cmd](a)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
