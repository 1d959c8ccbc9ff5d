"""cmerge's OPCM side by side with FusionBench's own OPCM (the paper authors' code).

    python benchmarks/fusionbench_opcm.py                     # tiny hub-layout CLIP, 4 experts
    python benchmarks/fusionbench_opcm.py --precision float32 --diagonal keep
    python benchmarks/fusionbench_opcm.py --models b --time 2,3   # time FusionBench on ViT-B/32 shapes

FusionBench (PyPI ``fusion-bench``) is never imported by cmerge nor by this process: it
lives in a scratch virtualenv (default ``/work/scratch/fbenv``, override with
``--fb-python`` or ``$FB_PYTHON``) and this same file is run there as a worker
(``--_fb-worker SPEC.json``), which builds FusionBench's ``OPCMForCLIP`` algorithm, hands
it a ``CLIPVisionModelPool`` of the model folders and calls its ``run()``; the merged
model comes back as a safetensors file. ``--fb-pythonpath`` (or ``$FB_PYTHONPATH``;
default ``/work/scratch/fb_tf4`` when it exists) is put in front of that interpreter's
path: there it holds transformers 4.57 (with a hub client and ``datasets`` that fit it),
the transformers major version the hub checkpoints and the reference code were made
with.

Setup of that virtualenv (never part of cmerge's dependencies; torch pinned first):
``python3 -m venv /work/scratch/fbenv``, ``pip install torch==2.13.0``, ``pip install
--no-deps fusion-bench``, then what its OPCM code path imports (packaging, numpy, omegaconf,
hydra-core, tqdm, rich, bidict, datasets, peft, pyyaml, regex, requests, safetensors,
``--no-deps lightning torchmetrics`` and lightning-utilities), and ``pip install --no-deps
--target /work/scratch/fb_tf4 transformers==4.57.6 "huggingface-hub<1.0" "tokenizers<0.23"
datasets==4.0.0`` for the overlay. Offline: nothing is downloaded at run time.

Models (built here, no download):

- ``tiny`` (default): CLIP vision towers in the layout the hub holds for the paper's
  experts (``tanganke/clip-vit-base-patch32_<task>`` are ``CLIPVisionModel``
  checkpoints written by transformers 4.x): keys ``vision_model.*``, one
  ``model.safetensors`` (metadata ``format: pt``, no ``position_ids`` buffer) and a
  4.x ``config.json`` (``architectures: [CLIPVisionModel]``, ``model_type:
  clip_vision_model``, ``torch_dtype``). transformers 5's ``save_pretrained`` writes
  the same model without the ``vision_model.`` prefix and with ``dtype``; a tool that
  matches names by building the transformers-5 architecture must map the two. Shapes:
  hidden 32, MLP 64, 2 layers (12 linear weights), image 32, patch 8.
- ``b``: the ViT-B/32-shaped models of ``speed_models.py`` (same tensors and task
  vectors, sharded), with a 4.x ``config.json`` for ``CLIPVisionModelWithProjection``
  (its ``visual_projection`` is one more linear weight: 73 in all).

Model 0 is the base θ0, models 1..N are θ0 + τ_t with speed_models' task vectors (a
rank-4 part plus noise for 2-D tensors, noise elsewhere). By default the experts keep
the base's ``class_embedding`` (``--class-embedding frozen``): FusionBench only visits
parameters of leaf modules, so it never adds τ_t to that tensor (it keeps τ_1, rescaled)
and its λ_t then differs from Eq. 10 for every tensor; cmerge merges it like any tensor.
``--class-embedding perturbed`` shows that difference (reported, not checked). Models
are reused from the work folder when already built the same way.

cmerge runs are ``cmerge merge --base M0 M1 .. MN --method opcm -o OUT`` (same order,
α, diagonal variant and precision as FusionBench's run):

- ``default``: default flags (layer classification from ``config.json``);
- ``project``: with ``--project`` regexes that name the linear weights.

Diagonal variants (``--diagonal``): ``zero`` is what the installed FusionBench does (it
zeroes the diagonal of UᵀXV in place) and cmerge's default; ``keep`` is the Jan-2025
reference code (whose diagonal fill acted on a copy): cmerge ``--keep-diagonal``, and on
FusionBench's side the same ``run()`` with the diagonal view handed out as a copy while
its linear-weight merge runs, which reproduces that copy without touching its code.

Precision: ``float64`` runs both sides on float64 copies of the models (the same values:
cmerge exports in the base's storage dtype), loaded in float64 (``torch_dtype``) so that
FusionBench does all its arithmetic (full SVD, cumulative-mass threshold, Eq. 10) in
float64; cmerge gets ``--precision float64``. ``float32`` is FusionBench as run in
practice, on the float32 files.

Difference measure, per tensor: ‖θ_cmerge − θ_fb‖_F / ‖θ_fb − θ0‖_F (relative to the
merged task vector); the table gives the largest per tensor kind, and "all" the global
‖Δ‖ / ‖θ_fb − θ0‖ over every tensor. Thresholds (``--tol32``, ``--tol64``): a float32
run of the reference is itself ~1e-4 (relative) from exact arithmetic (float32 SVD of
the merged task vector), so float32 comparisons pass below 1e-3; float64 ones below 1e-9.
In float32 the largest difference is
the layer norms' (~7e-5): values near 1 moving by ~1e-3 are rounded to float32 on both
sides. ``--cmerge-src DIR`` runs another cmerge source tree (e.g. ``git archive REV src |
tar -x -C DIR``) with the repository's virtualenv, to compare revisions.
Every cmerge variant is expected to agree; the exit status is 1 if one does not (nothing
is checked with ``--class-embedding perturbed``), 2 on a usage or environment error.

Timing (``--time 2,3,...``, float32 models): FusionBench keeps no state between runs, so
the t-th arrival means a fresh ``run()`` over the base and the first t experts; each t is
its own worker process, timed as a whole process and from modelpool creation to the end
of ``run()`` (import excluded), with FusionBench's own profiler split into loading and
merging. Beside it, `cmerge add` of expert t to a state holding 1..t − 1 (one step, a
whole process) for each of ``--kernels``; after the last t the two merged models are
compared as above (cmerge's export in the models' float32). A fit c + (t − 1)·step of
FusionBench's times extrapolates to t = 8 when fewer arrivals were timed. ``--doc`` writes
the table into docs/benchmarks.md (between ``<!-- fusionbench-arrivals:begin -->`` and
``<!-- fusionbench-arrivals:end -->``) with the command, the machine and the date.

Drift (``--drift``, after a timing run and a ``--precision float64 --keep`` comparison over
the same models and number of experts in the same ``--workdir``): how far each float32
result — FusionBench's last timed arrival, cmerge's states of both kernels — and cmerge's
float64 merge lie from FusionBench's float64 merge, the same algorithm in exact-enough
arithmetic. Nothing is merged again; ``--doc`` writes the table (between ``<!--
fusionbench-drift:begin -->`` and ``<!-- fusionbench-drift:end -->``).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from speed import DOC, machine, write_doc  # noqa: E402
from speed_models import base_tensor, task_vector, vit_b32, write_model  # noqa: E402

BEGIN, END = "<!-- fusionbench-arrivals:begin -->", "<!-- fusionbench-arrivals:end -->"
DRIFT_BEGIN, DRIFT_END = "<!-- fusionbench-drift:begin -->", "<!-- fusionbench-drift:end -->"

DEFAULT_FB_PYTHON = "/work/scratch/fbenv/bin/python"
DEFAULT_FB_PYTHONPATH = "/work/scratch/fb_tf4"
LINEAR_RX = r"\.(q_proj|k_proj|v_proj|out_proj|fc1|fc2)\.weight$"
PROJECTION_RX = r"^visual_projection\.weight$"
TOL32, TOL64 = 1e-3, 1e-9

# A transformers 4.x CLIPVisionConfig as its save_pretrained wrote it (4.40-era key set;
# 4.56+ writes "dtype" instead of "torch_dtype").
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            image_size=32, patch_size=8, projection_dim=16)
B32 = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
           image_size=224, patch_size=32, projection_dim=512)


def hub_config(arch: str, dims: dict) -> dict:
    cfg = {
        "_name_or_path": "openai/clip-vit-base-patch32",
        "architectures": [arch],
        "attention_dropout": 0.0,
        "dropout": 0.0,
        "hidden_act": "quick_gelu",
        **dims,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "layer_norm_eps": 1e-05,
        "model_type": "clip_vision_model",
        "num_channels": 3,
        "torch_dtype": "float32",
        "transformers_version": "4.40.1",
    }
    return dict(sorted(cfg.items()))


# ---------------------------------------------------------------- models


def tiny_spec():
    spec = vit_b32(hidden=TINY["hidden_size"], mlp=TINY["intermediate_size"], layers=TINY["num_hidden_layers"],
                   patch=TINY["patch_size"], image=TINY["image_size"], proj=TINY["projection_dim"], key="tiny")
    # CLIPVisionModel has no visual_projection (that is CLIPVisionModelWithProjection).
    return [(n, s) for n, s in spec.tensors if n.startswith("vision_model.")]


def build_models(kind: str, n: int, folder: Path, class_embedding: str) -> list[Path]:
    """Base (m0) and n experts in hub layout under ``folder``; reused when already there."""
    folders = []
    stamp = {"kind": kind, "class_embedding": class_embedding}
    for t in range(n + 1):
        f = folder / f"m{t}"
        ok = (f / "config.json").exists() and (f / "built.json").exists() \
            and json.loads((f / "built.json").read_text()) == stamp
        if not ok:
            shutil.rmtree(f, ignore_errors=True)
            f.mkdir(parents=True)
            if kind == "tiny":
                tensors = {}
                for name, shape in tiny_spec():
                    w = base_tensor(name, shape)
                    if t and not (class_embedding == "frozen" and name.endswith("class_embedding")):
                        w += task_vector(name, shape, t)
                    tensors[name] = w.contiguous()
                save_file(tensors, str(f / "model.safetensors"), metadata={"format": "pt"})
                cfg = hub_config("CLIPVisionModel", TINY)
            else:
                write_model(vit_b32(), f, t)
                if t and class_embedding == "frozen":  # put the base's class_embedding back
                    _freeze_class_embedding(f)
                cfg = hub_config("CLIPVisionModelWithProjection", B32)
            (f / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
            (f / "built.json").write_text(json.dumps(stamp) + "\n")
        folders.append(f)
    return folders


def float64_copies(folders: list[Path], dest: Path) -> list[Path]:
    """The same models stored in float64 (exact copies of the float32 values).

    cmerge exports in the base's storage dtype, so a float64 comparison needs float64 files:
    a float32 export would round θ0 + Δ (e.g. a layer norm near 1 moving by 1e-3) by ~6e-5 of Δ.
    """
    out = []
    for f in folders:
        g = dest / f.name
        stamp = (f / "built.json").read_text()
        if not ((g / "built.json").exists() and (g / "built.json").read_text() == stamp):
            shutil.rmtree(g, ignore_errors=True)
            g.mkdir(parents=True)
            for file in sorted(f.glob("*.safetensors")):
                with safe_open(str(file), framework="pt") as h:
                    tensors = {k: h.get_tensor(k).to(torch.float64) for k in h.keys()}
                save_file(tensors, str(g / file.name), metadata={"format": "pt"})
            for extra in f.glob("*.json"):
                text = extra.read_text()
                if extra.name == "model.safetensors.index.json":
                    index = json.loads(text)
                    index["metadata"]["total_size"] *= 2
                    text = json.dumps(index, indent=1) + "\n"
                elif extra.name == "config.json":
                    text = text.replace('"torch_dtype": "float32"', '"torch_dtype": "float64"')
                if extra.name != "built.json":
                    (g / extra.name).write_text(text)
            (g / "built.json").write_text(stamp)
        out.append(g)
    return out


def _freeze_class_embedding(folder: Path) -> None:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    for name, shard in index["weight_map"].items():
        if name.endswith("class_embedding"):
            path = folder / shard
            with safe_open(str(path), framework="pt") as h:
                tensors = {k: h.get_tensor(k) for k in h.keys()}
            tensors[name] = base_tensor(name, tuple(tensors[name].shape)).to(tensors[name].dtype)
            save_file(tensors, str(path), metadata={"format": "pt"})


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    out = {}
    for file in files:
        with safe_open(str(file), framework="pt") as h:
            for k in h.keys():
                out[k] = h.get_tensor(k).to(torch.float64)
    return out


def tensor_kind(name: str, shape: tuple[int, ...]) -> str:
    if name.endswith("class_embedding"):
        return "class_embedding"
    if re.search(LINEAR_RX, name) or re.search(PROJECTION_RX, name):
        return "linear weight"
    if "norm" in name:
        return "layer norm"
    if name.endswith(".bias"):
        return "linear bias"
    return "embedding/conv"


# ---------------------------------------------------------------- FusionBench worker


@contextlib.contextmanager
def diagonal_as_copy():
    """``Tensor.diagonal()`` returns a copy: an in-place fill of it changes nothing (Jan-2025 code)."""
    original = torch.Tensor.diagonal

    def copied(self, *a, **k):
        return original(self, *a, **k).clone()

    torch.Tensor.diagonal = copied
    try:
        yield
    finally:
        torch.Tensor.diagonal = original


def fb_worker(spec_path: str) -> None:
    """Runs in FusionBench's virtualenv: FusionBench's OPCMForCLIP.run() on the given folders."""
    spec = json.loads(Path(spec_path).read_text())
    os.environ.setdefault("TQDM_DISABLE", "1")
    import lightning as L
    import transformers
    from omegaconf import DictConfig
    from types import SimpleNamespace

    import fusion_bench
    from fusion_bench.method.opcm.opcm import OPCMForCLIP
    from fusion_bench.modelpool import CLIPVisionModelPool

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    class Algo(OPCMForCLIP):
        def merge_linear_weights(self, *a, **k):
            if spec["diagonal"] == "keep":
                with diagonal_as_copy():
                    return super().merge_linear_weights(*a, **k)
            return super().merge_linear_weights(*a, **k)

    target = f"transformers.{spec['arch']}.from_pretrained"
    models = {"_pretrained_": spec["base"], **{f"m{i + 1}": p for i, p in enumerate(spec["models"])}}
    models = {k: {"_target_": target, "pretrained_model_name_or_path": v, "torch_dtype": spec["dtype"]}
              for k, v in models.items()}
    t0 = time.perf_counter()
    pool = CLIPVisionModelPool(DictConfig(models))
    algo = Algo(alpha=spec["alpha"], shuffle_order=False, save_on_every_step=False, evaluate_on_every_step=False)
    algo.fabric = L.Fabric(accelerator="cpu", devices=1)
    algo._program = SimpleNamespace(taskpool=SimpleNamespace(_test_datasets={}))  # run() reads it
    with contextlib.redirect_stdout(sys.stderr):  # its profile summary
        merged = algo.run(pool)
    wall = time.perf_counter() - t0
    durations = {a: sum(d) for a, d in algo.profiler.recorded_durations.items()}
    sd = {k: v.detach().contiguous() for k, v in merged.state_dict().items()}
    if spec.get("out"):
        save_file(sd, spec["out"], metadata={"format": "pt"})
    dtypes = sorted({str(v.dtype) for v in sd.values()})
    print(json.dumps({
        "fusion_bench": getattr(fusion_bench, "__version__", None) or _dist_version("fusion-bench"),
        "transformers": transformers.__version__, "torch": torch.__version__, "dtypes": dtypes,
        "order": pool.model_names, "lambda_t": float(algo.previous_lambda_t), "wall_s": wall,
        "profile_s": durations, "tensors": len(sd),
    }))


def _dist_version(name: str):
    from importlib.metadata import version

    return version(name)


def run_fb(a: argparse.Namespace, spec: dict, work: Path, tag: str) -> dict:
    spec_file = work / f"fb-{tag}.json"
    spec_file.write_text(json.dumps(spec))
    env = dict(os.environ, TQDM_DISABLE="1", PYTHONWARNINGS="ignore", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("MKL_NUM_THREADS", env["OMP_NUM_THREADS"])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [a.fb_pythonpath, str(HERE)]))
    cmd = [a.fb_python, str(Path(__file__).resolve()), "--_fb-worker", str(spec_file)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    (work / f"fb-{tag}.log").write_text(p.stderr)
    if p.returncode != 0:
        sys.stderr.write(p.stderr[-4000:])
        raise SystemExit(f"FusionBench worker failed (exit {p.returncode}); log in {work / f'fb-{tag}.log'}")
    return json.loads(p.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- cmerge side


CMERGE_SRC: str | None = None  # --cmerge-src


def cmerge_exe() -> list[str]:
    if CMERGE_SRC:
        py = ROOT / ".venv" / "bin" / "python"
        return [str(py if py.exists() else sys.executable), "-c",
                "import sys; from cmerge.cli import main; sys.exit(main())"]
    exe = ROOT / ".venv" / "bin" / "cmerge"
    return [str(exe)] if exe.exists() else [sys.executable, "-c",
                                             "import sys; from cmerge.cli import main; sys.exit(main())"]


def run_cmerge(args: list[str], check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("MKL_NUM_THREADS", env["OMP_NUM_THREADS"])
    if CMERGE_SRC:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [CMERGE_SRC, env.get("PYTHONPATH")]))
    p = subprocess.run([*cmerge_exe(), *args], env=env, capture_output=True, text=True)
    if p.returncode != 0 and check:
        sys.stderr.write(p.stdout[-2000:] + p.stderr[-4000:])
        raise SystemExit(f"cmerge failed (exit {p.returncode}): {' '.join(args)}")
    return p


def projected_count(base: Path, extra: list[str]) -> str:
    """What `cmerge merge --dry-run` says about the classification (its summary lines)."""
    p = run_cmerge(["merge", "--base", str(base), str(base), "-o", os.devnull, "--dry-run", *extra], check=False)
    if p.returncode != 0:
        return "(this cmerge has no `merge --dry-run`)"
    lines = [ln.strip() for ln in (p.stdout + p.stderr).splitlines() if ln.strip().startswith("tensors:")]
    return " | ".join(lines) or "(no summary line)"


# ---------------------------------------------------------------- comparison


def compare(base: dict, ref: dict, got: dict) -> tuple[dict[str, float], float, float]:
    """Largest per-tensor relative difference by kind, the global one, and class_embedding's."""
    if set(ref) != set(got):
        missing = sorted(set(ref) ^ set(got))[:5]
        raise SystemExit(f"the two merged models hold different tensors, e.g. {missing}")
    by_kind: dict[str, float] = {}
    num = den = 0.0
    for name, r in ref.items():
        d = float(torch.linalg.vector_norm(got[name] - r))
        tv = float(torch.linalg.vector_norm(r - base[name]))
        rel = d / tv if tv > 0 else (0.0 if d == 0 else float("inf"))
        kind = tensor_kind(name, tuple(r.shape))
        by_kind[kind] = max(by_kind.get(kind, 0.0), rel)
        if kind != "class_embedding":
            num += d * d
            den += tv * tv
    return by_kind, (num / den) ** 0.5 if den else 0.0, by_kind.get("class_embedding", 0.0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--_fb-worker", dest="fb_worker", help=argparse.SUPPRESS)
    ap.add_argument("--models", choices=("tiny", "b"), default="tiny",
                    help="tiny hub-layout CLIPVisionModel (default) or speed_models' ViT-B/32 shapes")
    ap.add_argument("--experts", "-n", type=int, default=4, help="number of experts N (default 4)")
    ap.add_argument("--alpha", type=float, default=0.5, help="OPCM's α (default 0.5)")
    ap.add_argument("--diagonal", choices=("zero", "keep"), default="zero",
                    help="zero: the installed FusionBench and cmerge's default; keep: the Jan-2025 code "
                         "(cmerge --keep-diagonal)")
    ap.add_argument("--precision", choices=("float64", "float32", "both"), default="both",
                    help="precision of both sides (default both, float64 first)")
    ap.add_argument("--variants", default="default,project",
                    help="cmerge runs: default (default flags) and/or project (--project the linear weights)")
    ap.add_argument("--class-embedding", choices=("frozen", "perturbed"), default="frozen",
                    help="experts keep the base's class_embedding (default) or perturb it like every "
                         "other tensor (then FusionBench's non-leaf quirk makes every tensor differ: reported, "
                         "not checked)")
    ap.add_argument("--time", default=None, metavar="T,T,...",
                    help="timing mode: time FusionBench's run() for these arrivals t (e.g. 2,3 or 2-8), "
                         "float32, and skip the comparison")
    ap.add_argument("--kernels", default="float64,float32",
                    help="timing mode: cmerge's OPCM kernels timed beside FusionBench (default float64,float32)")
    ap.add_argument("--workdir", default=None, help="where models and outputs go (default: a temporary "
                    "folder for tiny, .cache/fusionbench for b)")
    ap.add_argument("--keep", action="store_true", help="keep the models and merged outputs")
    ap.add_argument("--doc", action="store_true", help=f"timing and drift modes: write the table into {DOC.name}")
    ap.add_argument("--drift", action="store_true",
                    help="compare the kept results of a timing run and a float64 comparison with FusionBench's "
                         "float64 merge (see above)")
    ap.add_argument("--tol32", type=float, default=TOL32, help=f"float32 threshold (default {TOL32:g})")
    ap.add_argument("--tol64", type=float, default=TOL64, help=f"float64 threshold (default {TOL64:g})")
    ap.add_argument("--fb-python", default=os.environ.get("FB_PYTHON", DEFAULT_FB_PYTHON),
                    help="python of the virtualenv that holds fusion-bench")
    ap.add_argument("--fb-pythonpath", default=os.environ.get(
        "FB_PYTHONPATH", DEFAULT_FB_PYTHONPATH if Path(DEFAULT_FB_PYTHONPATH).is_dir() else ""),
        help="prepended to that python's path (a transformers 4.x overlay)")
    ap.add_argument("--cmerge-src", default=None, metavar="DIR",
                    help="run cmerge from this source folder (e.g. a `git archive` snapshot's src/) with the "
                         "repository's virtualenv, instead of the installed one")
    a = ap.parse_args()
    global CMERGE_SRC
    CMERGE_SRC = a.cmerge_src
    if a.fb_worker:
        fb_worker(a.fb_worker)
        return 0
    if not Path(a.fb_python).exists():
        print(f"no FusionBench python at {a.fb_python} (see --fb-python)", file=sys.stderr)
        return 2
    if a.experts < 1:
        print("--experts must be at least 1", file=sys.stderr)
        return 2
    variants = [v for v in a.variants.split(",") if v]
    if not set(variants) <= {"default", "project"}:
        print(f"--variants: unknown {set(variants) - {'default', 'project'}}", file=sys.stderr)
        return 2

    if a.workdir:
        work = Path(a.workdir)
    elif a.models == "b":
        work = ROOT / ".cache" / "fusionbench"
    else:
        work = Path(tempfile.mkdtemp(prefix="fb-opcm-"))
    work.mkdir(parents=True, exist_ok=True)
    temp = not a.workdir and a.models == "tiny" and not a.keep
    try:
        if a.drift:
            return drift(a, work)
        return (timing if a.time else comparison)(a, work, variants)
    finally:
        if temp:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"files kept in {work}")


def arch_of(a: argparse.Namespace) -> str:
    return "CLIPVisionModel" if a.models == "tiny" else "CLIPVisionModelWithProjection"


def timing(a: argparse.Namespace, work: Path, variants: list[str]) -> int:
    """FusionBench's cost of the t-th arrival (a fresh run() over experts 1..t) beside `cmerge add`'s (one step),
    both float32 data on the same models, one thread each; then the two merged models after the last t compared."""
    steps: list[int] = []
    for part in a.time.split(","):
        lo, _, hi = part.partition("-")
        steps += list(range(int(lo), int(hi or lo) + 1))
    if not steps or min(steps) < 2:
        print("--time: arrivals t ≥ 2", file=sys.stderr)
        return 2
    kernels = [k for k in a.kernels.split(",") if k]
    t0 = time.perf_counter()
    folders = build_models(a.models, max(steps), work / f"{a.models}-models", a.class_embedding)
    print(f"models: {a.models} ({arch_of(a)}), built/checked in {time.perf_counter() - t0:.1f} s, under {work}")
    print(f"α = {a.alpha}, diagonal {a.diagonal}, float32 models, OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', '1 (set here)')} on both sides. FusionBench OPCMForCLIP.run(): each t "
          f"is a fresh process over the base and experts 1..t (no state is kept between runs); cmerge: one `cmerge "
          f"add` of expert t to the state after t − 1 (a fresh process; kernels {', '.join(kernels)})")
    cm, cm_loads = cmerge_chains(a, folders, max(steps), kernels, work)
    last = max(steps)
    head = f"{'t':>3} {'load':>5} {'FB process s':>13} {'run() s':>9} {'loading s':>10} {'merging s':>10} {'s / step':>9}"
    print(head + "".join(f" {'cmerge add ' + k + ' s':>22}" for k in kernels), flush=True)
    fb: dict[int, float] = {}
    rows: list[str] = []
    for t in steps:
        load = float(open("/proc/loadavg").read().split()[0])
        spec = dict(base=str(folders[0]), models=[str(f) for f in folders[1:t + 1]], alpha=a.alpha,
                    diagonal=a.diagonal, dtype="float32", arch=arch_of(a),
                    out=str(work / "fb-time-merged.safetensors") if t == last else None)
        t1 = time.perf_counter()
        r = run_fb(a, spec, work, f"time-t{t}")
        fb[t] = time.perf_counter() - t1
        prof = r["profile_s"]
        merging = prof.get("merging model", float("nan"))
        print(f"{t:>3} {load:>5.1f} {fb[t]:>13.1f} {r['wall_s']:>9.1f} {prof.get('loading model', float('nan')):>10.2f} "
              f"{merging:>10.1f} {merging / (t - 1):>9.1f}" + "".join(f" {cm[k][t]:>22.2f}" for k in kernels),
              flush=True)
        rows.append(f"| {t} | {load:.1f} | {fb[t]:.1f} | {merging:.1f} | {merging / (t - 1):.1f} | "
                    + " | ".join(f"{cm[k][t]:.2f} (load {cm_loads[k][t]:.1f}) | {fb[t] / cm[k][t]:.1f}×"
                                 for k in kernels) + " |")
    print(f"(fusion-bench {r['fusion_bench']}, transformers {r['transformers']}, torch {r['torch']})")
    notes = [f"fusion-bench {r['fusion_bench']}, transformers {r['transformers']}, torch {r['torch']}"]
    if len(fb) >= 2:  # the t-th arrival merges t − 1 steps again: cost ≈ c + (t − 1)·step
        ts = sorted(fb)
        step = (fb[ts[-1]] - fb[ts[0]]) / (ts[-1] - ts[0])
        c = fb[ts[0]] - (ts[0] - 1) * step
        fit = (f"FusionBench fit over t = {ts[0]}..{ts[-1]}: ≈ {c:.0f} s + (t − 1) × {step:.0f} s per arrival"
               + "".join(f"; t = {t}: ≈ {c + (t - 1) * step:.0f} s" for t in range(ts[-1] + 1, 9)))
        print(fit)
        notes.append(fit)
    ref = load_tensors(work / "fb-time-merged.safetensors")
    base = load_tensors(folders[0])
    for k in kernels:
        out = work / f"cmerge-time-{k}-export"
        shutil.rmtree(out, ignore_errors=True)
        run_cmerge(["export", str(work / f"cmerge-time-{k}"), str(out), "-q"])
        by_kind, overall, _ = compare(base, ref, load_tensors(out))
        worst = max([overall, *by_kind.values()])
        kinds = ", ".join(f"{kind} {x:.2e}" for kind, x in sorted(by_kind.items()))
        verdict = (f"merged after t = {last}, cmerge kernel {k} vs FusionBench (float32): {kinds}; overall "
                   f"{overall:.2e}; worst {worst:.2e} vs tol {a.tol32:g}: {'AGREES' if worst <= a.tol32 else 'DIFFERS'}")
        print(verdict)
        notes.append(verdict)
        shutil.rmtree(out, ignore_errors=True)
    if a.doc:
        write_doc(arrivals_section(a, kernels, rows, notes), DOC, BEGIN, END)
        print(f"wrote the table into {DOC}")
    return 0


def arrivals_section(a: argparse.Namespace, kernels: list[str], rows: list[str], notes: list[str]) -> str:
    """The markdown section of the arrival costs: command, machine, date, the table and the notes."""
    command = "python benchmarks/fusionbench_opcm.py " + " ".join(sys.argv[1:])
    return "\n".join([
        "### FusionBench's OPCM: the cost of the t-th arrival", "",
        f"`{command}` — {time.strftime('%Y-%m-%d')}, machine: {machine()}. Models ({a.models}): {arch_of(a)}, "
        f"float32, α = {a.alpha}, diagonal {a.diagonal}, one thread on each side. FusionBench keeps no state "
        "between runs, so the t-th arrival is a fresh `OPCMForCLIP.run()` over the base and experts 1..t (one "
        "process; *merging* is FusionBench's own profiler entry, *per step* that over t − 1); `cmerge add` folds "
        "expert t into the state after t − 1 (one whole process, start-up included); all of cmerge's adds run "
        "first, then FusionBench's arrivals. *load*: the 1-minute load average when each started (other jobs "
        "shared the machine).", "",
        "| t | load | FusionBench process s | merging s | per step s | "
        + " | ".join(f"cmerge add ({k}) s | FusionBench ÷ cmerge" for k in kernels) + " |",
        "|---|---|---|---|---|" + "---|---|" * len(kernels),
        *rows, "", *(f"- {n}" for n in notes)])


def drift(a: argparse.Namespace, work: Path) -> int:
    """Each kept result's distance to FusionBench's float64 merge of the same models (nothing is merged again)."""
    def spec(name: str) -> dict:
        path = work / f"fb-{name}.json"
        if not path.is_file():
            raise SystemExit(f"--drift needs {path}: run the timing mode and `--precision float64 --keep` first")
        return json.loads(path.read_text())

    exact = spec("float64")
    last = len(exact["models"])
    timed = spec(f"time-t{last}")
    same = [Path(p).name for p in [timed["base"], *timed["models"]]] == \
        [Path(p).name for p in [exact["base"], *exact["models"]]]
    if not same or timed["alpha"] != exact["alpha"] or timed["diagonal"] != exact["diagonal"]:
        raise SystemExit(f"the float64 comparison and the timing run of t = {last} merged different inputs")
    base, ref = load_tensors(Path(exact["base"])), load_tensors(Path(exact["out"]))
    rows = [("FusionBench, float32 (its last timed arrival)", Path(timed["out"]))]
    exports = []
    for k in a.kernels.split(","):
        state = work / f"cmerge-time-{k}"
        if state.is_dir():
            out = work / f"cmerge-drift-{k}-export"
            shutil.rmtree(out, ignore_errors=True)
            run_cmerge(["export", str(state), str(out), "-q"])
            exports.append(out)
            rows.append((f"cmerge, float32 state, {k} kernel (`cmerge add` one at a time)", out))
    if (work / "cmerge-default-float64").is_dir():
        rows.append(("cmerge, float64 (`cmerge merge --precision float64`)", work / "cmerge-default-float64"))
    lines = ["### FusionBench's OPCM in float32 drifts from its own float64 result", "",
             f"`python benchmarks/fusionbench_opcm.py {' '.join(sys.argv[1:])}` — {time.strftime('%Y-%m-%d')}, "
             f"machine: {machine()}. Models ({a.models}): base and {last} experts, α = {exact['alpha']}, diagonal "
             f"{exact['diagonal']}. Each merged model after all {last} experts against FusionBench's own float64 "
             "merge of the same models (the float64 copies of the same values): ‖Δ‖ / ‖θ_ref − θ0‖ over every "
             "tensor but class_embedding (*overall*) and the largest per tensor (*worst tensor*).", "",
             "| merged model | overall | worst tensor |", "|---|---|---|"]
    for label, path in rows:
        by_kind, overall, _ = compare(base, ref, load_tensors(path))
        worst = max(by_kind.values())
        print(f"{label}: overall {overall:.2e}, worst tensor {worst:.2e}")
        lines.append(f"| {label} | {overall:.1e} | {worst:.1e} |")
    for out in exports:
        shutil.rmtree(out, ignore_errors=True)
    if a.doc:
        write_doc("\n".join(lines), DOC, DRIFT_BEGIN, DRIFT_END)
        print(f"wrote the table into {DOC}")
    return 0


def cmerge_chains(a: argparse.Namespace, folders: list[Path], last: int, kernels: list[str],
                  work: Path) -> tuple[dict[str, dict[int, float]], dict[str, dict[int, float]]]:
    """Per kernel, a state with experts 1..last added one `cmerge add` at a time; the wall time of each add and
    the 1-minute load average when it started."""
    out: dict[str, dict[int, float]] = {}
    loads: dict[str, dict[int, float]] = {}
    for k in kernels:
        state = work / f"cmerge-time-{k}"
        shutil.rmtree(state, ignore_errors=True)
        flags = ["--alpha", repr(a.alpha), "--kernel", k] + (["--keep-diagonal"] if a.diagonal == "keep" else [])
        run_cmerge(["init", str(state), "--base", str(folders[0]), "--method", "opcm", "-q", *flags])
        out[k], loads[k] = {}, {}
        for t in range(1, last + 1):
            loads[k][t] = float(open("/proc/loadavg").read().split()[0])
            t1 = time.perf_counter()
            run_cmerge(["add", str(state), str(folders[t]), "-q"])
            out[k][t] = time.perf_counter() - t1
    return out, loads


def comparison(a: argparse.Namespace, work: Path, variants: list[str]) -> int:
    folders = build_models(a.models, a.experts, work / f"{a.models}-models", a.class_embedding)
    base_path, experts = folders[0], folders[1:]
    precisions = ["float64", "float32"] if a.precision == "both" else [a.precision]
    project = ["--project", LINEAR_RX] + (["--project", PROJECTION_RX] if a.models == "b" else [])
    n_linear = 6 * (TINY if a.models == "tiny" else B32)["num_hidden_layers"] + (a.models == "b")
    print(f"models: {a.models} ({arch_of(a)}, hub layout `vision_model.*`, 4.x config.json), base + "
          f"{a.experts} experts, {n_linear} linear weights, class_embedding {a.class_embedding}; α = {a.alpha}, "
          f"diagonal {a.diagonal} (cmerge {'--keep-diagonal' if a.diagonal == 'keep' else 'default'})")
    for v in variants:
        print(f"cmerge classification, {v}: " + projected_count(base_path, project if v == "project" else []))
    failed = []
    for prec in precisions:
        if prec == "float64":
            base_path, *experts = float64_copies(folders, work / f"{a.models}-models-f64")
        else:
            base_path, experts = folders[0], folders[1:]
        spec = dict(base=str(base_path), models=[str(f) for f in experts], alpha=a.alpha, diagonal=a.diagonal,
                    dtype=prec, arch=arch_of(a), out=str(work / f"fb-{prec}.safetensors"))
        t0 = time.perf_counter()
        info = run_fb(a, spec, work, prec)
        print(f"\n[{prec}] FusionBench {info['fusion_bench']} OPCMForCLIP (transformers {info['transformers']}, "
              f"torch {info['torch']}): order {info['order']}, tensors {info['dtypes']}, "
              f"λ_T = {info['lambda_t']:.6g}, {time.perf_counter() - t0:.1f} s")
        ref = load_tensors(work / f"fb-{prec}.safetensors")
        base = load_tensors(base_path)
        tol = a.tol64 if prec == "float64" else a.tol32
        for v in variants:
            out = work / f"cmerge-{v}-{prec}"
            shutil.rmtree(out, ignore_errors=True)
            args = ["merge", "--base", str(base_path), *map(str, experts), "--method", "opcm", "-o", str(out),
                    "--alpha", repr(a.alpha), "--precision", prec, "-q"]
            if a.diagonal == "keep":
                args.append("--keep-diagonal")
            if v == "project":
                args += project
            run_cmerge(args)
            by_kind, overall, ce = compare(base, ref, load_tensors(out))
            worst = max([overall, *by_kind.values()])
            ok = worst <= tol
            kinds = ", ".join(f"{k} {x:.2e}" for k, x in sorted(by_kind.items()))
            print(f"  cmerge {v:<8} max rel. diff by kind: {kinds}")
            verdict = "AGREES" if ok else "DIFFERS"
            if a.class_embedding == "perturbed":
                verdict += " (not checked: class_embedding perturbed)"
            elif not ok:
                failed.append(f"{v}/{prec}")
            print(f"  cmerge {v:<8} overall (all tensors but class_embedding) {overall:.2e}; worst "
                  f"{worst:.2e} vs tol {tol:g}: {verdict}")
    if a.class_embedding == "perturbed":
        print("\nclass_embedding perturbed: FusionBench never adds τ_t to it (a non-leaf module's parameter; "
              "it keeps τ_1, rescaled) and its norm enters λ_t as that, so every tensor differs; cmerge "
              "merges it like any other tensor. Nothing was checked.")
    if failed:
        print(f"\nFAIL: cmerge differs from FusionBench's OPCM in {', '.join(failed)}")
        return 1
    print("\nOK: every cmerge run agrees with FusionBench's OPCM")
    return 0


if __name__ == "__main__":
    sys.exit(main())
