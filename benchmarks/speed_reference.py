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
              Eq. 9; compares P(τ_t) = S_t − S_{t−1} and λ_t with cmerge's.
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
    projected = set(json.loads(Path(a.projected).read_text()))
    names = set(json.loads(Path(a.names).read_text())) if a.names else None
    prev, new_s = _acc(a.prev_acc), _acc(a.new_acc)
    base, inc = LazyModel(Path(a.base)), LazyModel(Path(a.model))
    worst_p, worst_p_name, worst_s = 0.0, None, 0.0
    checked = 0
    s_sq, tau_sq = 0.0, 0.0
    for name in base.keys():
        tau = inc.get(name, torch.float64) - base.get(name, torch.float64)
        tau_sq += float((tau ** 2).sum())
        s_prev = prev(name).double()
        s_new = new_s(name).double()
        if names is not None and name not in names:
            s_sq += float((s_new ** 2).sum())  # unchecked: cmerge's own S_t enters λ
            continue
        p64 = project_float64(s_prev, tau, a.alpha) if name in projected else tau
        s64 = s_prev + p64
        s_sq += float((s64 ** 2).sum())
        rel_p = float(((s_new - s_prev) - p64).norm() / p64.norm())
        rel_s = float((s_new - s64).norm() / s64.norm())
        checked += 1
        if rel_p > worst_p:
            worst_p, worst_p_name = rel_p, name
        worst_s = max(worst_s, rel_s)
    mean_norm = (a.norm_sum + math.sqrt(tau_sq)) / a.t
    lam64 = math.sqrt(s_sq) / mean_norm
    return {"checked": checked, "max_rel_p": worst_p, "max_rel_p_tensor": worst_p_name, "max_rel_s": worst_s,
            "lambda64": lam64, "lambda_rel": abs(lam64 - a.lam_cmerge) / lam64}


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
    p.add_argument("--new-acc", required=True)
    p.add_argument("--t", type=int, required=True)
    p.add_argument("--norm-sum", type=float, required=True, help="Σ‖τ_i‖ for i < t")
    p.add_argument("--lam-cmerge", type=float, required=True)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--projected", required=True)
    p.add_argument("--names", help="JSON list: check only these tensors")
    p = sub.add_parser("floor")
    p.add_argument("--read", nargs="+", required=True)
    p.add_argument("--write-from", required=True)
    p.add_argument("--out", required=True)
    a = ap.parse_args()
    result = {"approach": cmd_approach, "exact": cmd_exact, "floor": cmd_floor}[a.cmd](a)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
