"""Tiny-model builders and slow float64 reference implementations for the core tests.

The references here are written from the papers' equations (docs/methods.md), not
from cmerge: whole models in memory, float64, full SVDs. They are deliberately slow and
plain so that a reader can check them against the equations line by line.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Mapping, Sequence

import torch
from safetensors.torch import save_file

# ---------------------------------------------------------------- tiny models

#: A small decoder-like layout. Under cmerge's name rule (no config.json) the weights of
#: q_proj / up / down / head are linear layers; the embedding, norms, biases and the 4-D
#: convolution use the identity; position_ids is an integer buffer (passed through).
TINY_PROJECTED = ("head.weight",) + tuple(
    f"layers.{i}.{n}" for i in range(2) for n in ("attn.q_proj.weight", "mlp.up.weight", "mlp.down.weight"))


def tiny_base(seed: int = 0, hidden: int = 16, vocab: int = 11, dtype: torch.dtype = torch.float32) -> dict:
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    sd = {"embed_tokens.weight": rnd(vocab, hidden), "conv.weight": rnd(4, 2, 3, 3), "head.weight": rnd(3, hidden),
          "position_ids": torch.arange(8, dtype=torch.int64)}
    for i in range(2):
        p = f"layers.{i}."
        sd[p + "attn.q_proj.weight"] = rnd(hidden, hidden)
        sd[p + "attn.q_proj.bias"] = rnd(hidden)
        sd[p + "mlp.up.weight"] = rnd(2 * hidden, hidden)
        sd[p + "mlp.down.weight"] = rnd(hidden, 2 * hidden)
        sd[p + "norm.weight"] = rnd(hidden)
    return sd


def expert(base: Mapping[str, torch.Tensor], seed: int, scale: float = 0.05) -> dict:
    """A 'fine-tuned' model: every floating tensor moved by scale·N(0, 1); integer tensors kept."""
    g = torch.Generator().manual_seed(1000 + seed)
    out = {}
    for name, t in base.items():
        if t.dtype.is_floating_point:
            noise = torch.randn(t.shape, generator=g, dtype=torch.float64) * scale
            out[name] = (t.double() + noise).to(t.dtype)
        else:
            out[name] = t.clone()
    return out


def experts(base, n: int, seed: int = 0, scales: Sequence[float] | None = None) -> list[dict]:
    scales = scales or [0.02 * (1 + (i % 3)) for i in range(n)]  # different norms on purpose
    return [expert(base, seed * 100 + i, scales[i]) for i in range(n)]


def save_model(sd: Mapping[str, torch.Tensor], path: Path) -> Path:
    """Save as one .safetensors file (a path ending in .safetensors) or a folder with model.safetensors."""
    path = Path(path)
    if path.suffix == ".safetensors":
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path / "model.safetensors"))
    return path


def load_safetensors_dir(folder: Path) -> dict:
    """Every tensor of a folder holding model.safetensors or shards + index, read with safetensors itself."""
    from safetensors import safe_open

    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    files = ["model.safetensors"]
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    out = {}
    for f in files:
        with safe_open(str(folder / f), framework="pt") as h:
            for k in h.keys():
                out[k] = h.get_tensor(k)
    return out


def snapshot(folder: Path) -> dict[str, bytes]:
    """Relative path → bytes of every file under ``folder`` (directories as markers)."""
    folder = Path(folder)
    out = {}
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            out[os.path.relpath(os.path.join(root, d), folder) + "/"] = b""
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, folder)] = fh.read()
    return out


def assert_one_sentence_error(res, *fragments: str) -> None:
    """Exit status 2, no traceback, exactly one line on stderr that reads as one sentence."""
    assert res.exception is None, f"unexpected exception {res.exception!r}"
    assert res.exit_code == 2, (res.exit_code, res.stdout, res.stderr)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    line = lines[0]
    assert "Traceback" not in line
    assert line.rstrip().endswith("."), line
    for frag in fragments:
        assert frag.lower() in line.lower(), (frag, line)


# ---------------------------------------------------------------- tiny transformers models

def tiny_bert(folder: Path, seed: int = 0, hidden: int = 16):
    """A random 1-layer BertModel saved with save_pretrained (config.json + model.safetensors)."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=40, hidden_size=hidden, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=2 * hidden, max_position_embeddings=24, type_vocab_size=2)
    model = BertModel(cfg).eval()
    model.save_pretrained(str(folder))
    return model


def tiny_gpt2(folder: Path, seed: int = 0, hidden: int = 16):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=40, n_embd=hidden, n_layer=1, n_head=2, n_positions=24)
    model = GPT2LMHeadModel(cfg).eval()
    model.save_pretrained(str(folder))
    return model


def perturbed_copy(src: Path, dst: Path, seed: int, scale: float = 0.02) -> dict:
    """Copy an HF folder with every floating tensor perturbed (an 'expert' of that base)."""
    import shutil

    from safetensors.torch import load_file

    dst.mkdir(parents=True)
    for p in src.iterdir():
        if p.name != "model.safetensors":
            shutil.copy2(p, dst / p.name)
    sd = expert(load_file(str(src / "model.safetensors")), seed, scale)
    save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return sd


# ---------------------------------------------------------------- reference math (float64)


def reference_k(s: torch.Tensor, alpha: float) -> int:
    """Number of i with c_i ≤ alpha (c = cumulative mass, last one exactly 1)."""
    c = (torch.cumsum(s.double(), 0) / s.double().sum()).tolist()
    c[-1] = 1.0
    k = sum(1 for ci in c if ci <= alpha)
    return 0 if k == len(c) else k


def f64(sd: Mapping[str, torch.Tensor]) -> dict:
    return {k: v.double() for k, v in sd.items() if v.dtype.is_floating_point}


def global_norm(sd: Mapping[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float((v.double() ** 2).sum()) for v in sd.values()))


def sub(a, b):
    return {k: a[k] - b[k] for k in a}


def ref_protected_rank(s: torch.Tensor, alpha: float) -> int:
    """0-based index of the first cumulative singular-value share > alpha (0 if none; last share = 1)."""
    shares = []
    acc, total = 0.0, float(s.sum())
    if not total > 0:
        return 0
    for v in s.tolist():
        acc += v
        shares.append(acc / total)
    shares[-1] = 1.0
    for i, c in enumerate(shares):
        if c > alpha:
            return i
    return 0


def ref_project(d: torch.Tensor, x: torch.Tensor, alpha: float, keep_diagonal: bool = False,
                drop_cross_blocks: bool = False, rank_rule: bool = False) -> tuple[torch.Tensor, int]:
    """Eq. 9 with a full SVD: C = UᵀXV, mask the k×k block (and the diagonal), P = U C' Vᵀ.

    ``rank_rule``: the rule for a rank-deficient D (docs/methods.md): with R the number of singular
    values above 1e-10 s_1, k from the mass of those R only, and the diagonal zeroed for i < R only.
    """
    d, x = d.double(), x.double()
    u, s, vh = torch.linalg.svd(d, full_matrices=True)
    v = vh.T
    rank = int((s > 1e-10 * s.max()).sum()) if rank_rule else min(d.shape)
    k = ref_protected_rank(s[:rank], alpha)
    c = u.T @ x @ v
    mask = torch.ones_like(c)
    mask[:k, :k] = 0
    if drop_cross_blocks:
        mask[:k, :] = 0
        mask[:, :k] = 0
    if not keep_diagonal:
        for i in range(rank):
            mask[i, i] = 0
    return u @ (c * mask) @ v.T, k


def ref_opcm(base, models, projected, alpha=0.5, keep_diagonal=False, drop_cross_blocks=False,
             scaling="adaptive", norm_average="raw", rank_rule=False) -> list[dict]:
    """Algorithm 1 / Eq. 6-10 on whole models, keeping D = θ_merged − θ0 and λ.

    Returns one record per step: merged (θ0 + D), D, lambda, mean_norm, proj (P(τ_t)), tau.
    """
    b = f64(base)
    history = []
    norms = []
    d, lam = None, None
    for t, m in enumerate(models, start=1):
        tau = sub(f64(m), b)
        if t == 1:
            proj = dict(tau)
            a = dict(tau)
        else:
            proj = {n: (ref_project(d[n], tau[n], alpha, keep_diagonal, drop_cross_blocks, rank_rule)[0]
                        if n in projected else tau[n]) for n in tau}
            a = {n: lam * d[n] + proj[n] for n in tau}
        norms.append(global_norm(tau) if norm_average == "raw" else global_norm(proj))
        mean_norm = sum(norms) / t
        lam = global_norm(a) / mean_norm if scaling == "adaptive" else math.sqrt(t)
        d = {n: a[n] / lam for n in a}
        history.append({"merged": {n: b[n] + d[n] for n in b}, "D": d, "lambda": lam, "mean_norm": mean_norm,
                        "proj": proj, "tau": tau})
    return history


def ref_task_arithmetic(base, models, lam=0.3) -> list[dict]:
    """Eq. 35: θ_t = θ_{t−1} + λ(θ_t − θ0), θ_merged^(0) = θ0."""
    b = f64(base)
    merged, out = dict(b), []
    for m in models:
        merged = {n: merged[n] + lam * (m[n].double() - b[n]) for n in b}
        out.append(merged)
    return out


def ref_average(base, models) -> list[dict]:
    """Eq. 33: the plain mean of the experts seen so far (θ0 not included)."""
    b = f64(base)
    out = []
    for t in range(1, len(models) + 1):
        out.append({n: sum(models[i][n].double() for i in range(t)) / t for n in b})
    return out


def _trim(x: torch.Tensor, density: float, variant: str = "paper") -> torch.Tensor:
    """Keep the largest-magnitude entries of one tensor: ⌈density·numel⌉ of them (decimal density, e.g.
    0.07 · 100 = 7), or for the public code's variant ⌊density·numel⌋ + 1 and every entry tied with the
    last one kept."""
    from fractions import Fraction

    flat = x.reshape(-1)
    n = flat.numel()
    if variant == "paper":
        keep = math.ceil(Fraction(repr(float(density))) * n)
    else:
        keep = int(density * n) + 1
    keep = min(n, max(1, keep))
    order = sorted(range(n), key=lambda i: -abs(float(flat[i])))
    out = torch.zeros_like(flat)
    last = abs(float(flat[order[keep - 1]]))
    for rank, i in enumerate(order):
        if rank < keep or (variant != "paper" and abs(float(flat[i])) == last):
            out[i] = flat[i]
    return out.reshape(x.shape)


def ref_ties_pair(a: torch.Tensor, b: torch.Tensor, density: float, variant: str = "paper") -> torch.Tensor:
    """TIES on two vectors: trim each, elect sign = sign of the sum, add the agreeing entries; the public
    code's variant gives an entry whose sum is exactly 0 the sign of the total (+ if that is 0)."""
    ta, tb = _trim(a, density, variant), _trim(b, density, variant)
    sign = torch.sign(ta + tb)
    if variant != "paper":
        majority = 1.0 if float((ta + tb).sum()) >= 0 else -1.0
        sign = torch.where(sign == 0, torch.full_like(sign, majority), sign)
    out = torch.zeros_like(ta)
    for v in (ta, tb):
        agree = (torch.sign(v) == sign) & (v != 0)
        out = out + torch.where(agree, v, torch.zeros_like(v))
    return out


def ref_ties(base, models, density=0.2, lam=0.3, variant="paper") -> list[dict]:
    """Eq. 38 (variant 'paper') or the public code's M_t = M_{t−1} + λ·TIES (variant 'reference'), per tensor."""
    b = f64(base)
    out, m_prev = [], None
    for t, m in enumerate(models, start=1):
        tau = sub(f64(m), b)
        if t == 1:
            m_new = {n: lam * tau[n] for n in b}
        else:
            tied = {n: lam * ref_ties_pair(m_prev[n], tau[n], density, variant) for n in b}
            m_new = tied if variant == "paper" else {n: m_prev[n] + tied[n] for n in b}
        m_prev = m_new
        out.append({n: b[n] + m_new[n] for n in b})
    return out


def ref_magmax(base, models, scale=0.5) -> list[dict]:
    """Entry by entry, the task-vector value of largest magnitude so far (ties: newer); θ0 + scale·τ_max."""
    b = f64(base)
    out, best = [], None
    for m in models:
        tau = sub(f64(m), b)
        if best is None:
            best = tau
        else:
            best = {n: torch.where(tau[n].abs() >= best[n].abs(), tau[n], best[n]) for n in b}
        out.append({n: b[n] + scale * best[n] for n in b})
    return out


def fisher_like(model: Mapping[str, torch.Tensor], seed: int) -> dict:
    """Positive 'second moments' for every floating tensor of a model (a stand-in for Adam's exp_avg_sq)."""
    g = torch.Generator().manual_seed(5000 + seed)
    return {n: (torch.rand(t.shape, generator=g, dtype=torch.float64) ** 3 * 1e-4).to(torch.float32)
            for n, t in model.items() if t.dtype.is_floating_point}


def ref_fisher(base, models, fishers, alpha=0.4, schedule="constant", eps=1e-12) -> list[dict]:
    """Holistic CMM's during-merging rule (docs/methods.md, "Fisher merging with optimizer states"), element by element, on whole models."""
    b = f64(base)
    out, merged, f_bar = [], None, None
    for t, (m, f) in enumerate(zip(models, fishers), start=1):
        theta, ft = f64(m), {n: f[n].double() for n in b}
        if t == 1:
            merged, f_bar = theta, ft
        else:
            a = 1.0 / t if schedule == "running" else alpha
            omega = {n: a * ft[n] / ((1 - a) * f_bar[n] + a * ft[n] + eps) for n in b}
            merged = {n: merged[n] + omega[n] * (theta[n] - merged[n]) for n in b}
            f_bar = {n: (1 - a) * f_bar[n] + a * ft[n] for n in b}
        out.append(dict(merged))
    return out


def max_rel_err(got: Mapping[str, torch.Tensor], want: Mapping[str, torch.Tensor]) -> float:
    """max over tensors of ‖got − want‖ / max(‖want‖, 1e-30)."""
    worst = 0.0
    for n, w in want.items():
        g = got[n].double()
        worst = max(worst, float((g - w.double()).norm()) / max(float(w.double().norm()), 1e-30))
    return worst


# ---------------------------------------------------------------- a CLI run in a child process (crash tests)

KILL_POINTS = ("mid_write", "after_gen_rename", "before_manifest_switch", "after_manifest_switch")


def cli_child(args: list[str], kill_at: str | None = None) -> None:
    """Run ``cmerge ARGS`` in this process (a child), SIGKILLing itself at ``kill_at`` if given.

    Kill points: half-way through writing the accumulators (or an exported model); right
    after the new generation folder is renamed into place; with the new manifest written
    but not yet switched; right after the manifest switch (before the old generation is
    removed); ``mid_read``: half-way through reading a model's tensors (init hashing the
    base); ``before_replace:NAME`` / ``after_replace:NAME``: around the rename that puts
    NAME into place (an init's state folder, an export's output folder).
    """
    import signal
    import threading

    from tqdm import tqdm

    from cmerge.cli import main
    from cmerge.io import StreamingSafetensorsWriter

    tqdm.set_lock(threading.RLock())  # not tqdm's default multiprocessing lock, which a SIGKILL would leak

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if kill_at == "mid_write":
        real_write = StreamingSafetensorsWriter.write
        count = {"n": 0}

        def write(self, name, tensor):
            real_write(self, name, tensor)
            count["n"] += 1
            if count["n"] == max(1, len(self._specs) // 2):
                die()

        StreamingSafetensorsWriter.write = write
    elif kill_at == "mid_read":
        from cmerge.io import TensorSource

        real_get = TensorSource.get
        reads = {"n": 0}

        def get(self, name, rows=None):
            reads["n"] += 1
            if reads["n"] == max(1, len(self) // 2):
                die()
            return real_get(self, name, rows)

        TensorSource.get = get
    elif kill_at is not None and kill_at.split(":")[0] in ("before_replace", "after_replace"):
        where, target = kill_at.split(":", 1)
        real = os.replace

        def replace_at(src, dst):
            if where == "before_replace" and Path(dst).name == target:
                die()
            real(src, dst)
            if where == "after_replace" and Path(dst).name == target:
                die()

        os.replace = replace_at
    elif kill_at is not None:
        real_replace = os.replace

        def replace(src, dst):
            is_manifest = Path(dst).name == "manifest.json"
            if kill_at == "before_manifest_switch" and is_manifest:
                die()
            real_replace(src, dst)
            if kill_at == "after_gen_rename" and Path(dst).name.startswith("gen-"):
                die()
            if kill_at == "after_manifest_switch" and is_manifest:
                die()

        os.replace = replace
    main([str(a) for a in args])
