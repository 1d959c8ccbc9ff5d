"""Speed and memory of `cmerge add` / `cmerge export`: both OPCM kernels against the reference approach and
against this machine's floor (issues #5 and #21).

    python benchmarks/speed.py            # full run, rewrites the speed section of docs/benchmarks.md
    python benchmarks/speed.py --quick    # tiny shapes, a few minutes, prints the report only

Models (random weights, realistic task vectors, see speed_models.py), written as sharded
safetensors under .cache/speed: (a) MiniLM-shaped, (b) ViT-B/32-shaped, (c2) a
LLaMA-7B-shaped slice with 2 decoder layers stored in float16 (c8, 8 layers, for the
flat-memory check with ``--c8``).

Every measurement is a fresh process: wall time from start to exit, peak RSS of that
process (through GNU time). For each model, two OPCM states are advanced side by side, one
per kernel (``--kernel float64``, the default, and ``--kernel float32``), and `cmerge add`
of each is timed on its own copy of the state before the step, in rounds with the
reference approach (speed_reference.py ``approach``: three models in memory, full float32
SVD, full-matrix products), so the three numbers of a round share the machine's load.
Exactness: each state's stored P(τ_t) = S_t − S_{t−1} against a float64 thin-SVD
computation from the same S_{t−1}, beside the reference approach's own float32 arithmetic
on that S_{t−1} and τ_t.

The floor (the roofline): the rates that bound a step are measured on this machine in a
fresh process (speed_reference.py ``rates``): read and write bandwidth, and for every weight
shape and precision one r·m·n product, the thin SVD and the ``eigh`` of the r × r Gram
matrix. A step's floor is the bytes it reads and writes over those bandwidths plus, per
projected weight, the cheapest route at those rates: an SVD and two products, or the Gram
``eigh`` and four products. Kernel candidates (speed_reference.py ``candidates``) are timed
and checked on one pair per weight shape. Start-up: whole-process times of `cmerge --help`,
`cmerge info` and an `add` of a one-tensor model, this tree against the last commit's.
The data-free methods (``--step-methods``, default OPCM, DOP's exact solver, NUFILT and the
isotropic merge): `cmerge add` of step 2 of each method with its defaults, on a copy of its
state after step 1, in rounds (every method once per round) on (b) and (c2), each against
OPCM's step of the same round (``--methods-only`` measures only these, into their own
section of the doc; with ``--device cuda`` every such `cmerge add` computes on the GPU, into a
section of its own).

Every measured process runs with ``--threads`` OpenMP threads (default 1: on a 2-core machine
shared with other jobs, two-thread LAPACK calls were up to 8× slower than one-thread ones
while this was written) and with GOMP_SPINCOUNT=10000 (see the notes in the report).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from speed_models import ModelSpec, llama_slice, minilm, vit_b32, write_model  # noqa: E402

REFERENCE = HERE / "speed_reference.py"
DOC = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- speed:begin -->", "<!-- speed:end -->"
STARTUP_BEGIN, STARTUP_END = "<!-- startup:begin -->", "<!-- startup:end -->"
PROJECTED_KINDS = ("linear", "linear_t")
KERNELS = ("float64", "float32")
EXACT_TOL = 1e-6       # the float64 kernel against float64
SPEEDUP_TARGET = 3.0   # the float32 kernel against the reference approach, start-up and I/O included
FLOOR_TARGET = 1.3     # cmerge's step against the machine's floor, each kernel in its precision
STEP_METHODS = "opcm,dop:solver=exact,nufilt,iso,iso:accumulate=opcm"  # timed beside OPCM's step
DOP_TARGET = 2.0       # DOP's exact solver's step against OPCM's (issue #14)
METHODS_MARKS = ("<!-- methods-speed:begin -->", "<!-- methods-speed:end -->")
METHODS_GPU_MARKS = ("<!-- methods-speed-gpu:begin -->", "<!-- methods-speed-gpu:end -->")  # --device cuda


# ---------------------------------------------------------------- processes


@dataclass
class Run:
    wall: float
    rss_mb: float
    out: str
    load: float


LOADS: list[float] = []  # 1-minute load average before each process this script starts
GNU_TIME = Path("/usr/bin/time")


def loadavg() -> float:
    return float(open("/proc/loadavg").read().split()[0])


def run(cmd: list[str], env: dict[str, str], check: bool = True) -> Run:
    """Run ``cmd`` as a fresh process: wall time and that process's own peak RSS.

    Linux starts a forked child's peak RSS at its parent's (and keeps it across exec), so a
    child of this script would report at least this script's own peak. The command is
    therefore started by GNU time (a small process), which reports its child's peak.
    """
    load = loadavg()
    LOADS.append(load)
    rss_file = None
    if GNU_TIME.exists():
        rss_file = Path(tempfile.gettempdir()) / f"cmerge-rss-{os.getpid()}-{len(LOADS)}"
        cmd = [str(GNU_TIME), "-f", "%M", "-o", str(rss_file), *map(str, cmd)]
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    out = p.stdout.read().decode(errors="replace")
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    p.stdout.close()
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({p.returncode}):\n{out[-3000:]}")
    rss_kb = usage.ru_maxrss
    if rss_file is not None and rss_file.exists():
        rss_kb = int(rss_file.read_text().strip().splitlines()[-1])
        rss_file.unlink()
    return Run(wall, rss_kb / 1024, out, load)


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def cmerge_exe(src: Path | None = None) -> list[str]:
    """The `cmerge` command: the virtualenv's entry point, or the CLI of the source folder ``src``."""
    if src is None:
        script = Path(sys.executable).parent / "cmerge"
        if script.exists():
            return [sys.executable, str(script)]
    return [sys.executable, "-c", "import sys; from cmerge.cli import main; sys.exit(main())"]


def clone_state(src: Path, dst: Path) -> Path:
    """Copy a state folder; accumulator files are hard links (a step never rewrites them)."""
    shutil.rmtree(dst, ignore_errors=True)

    def copy(s: str, d: str) -> None:
        if os.path.getsize(s) > (1 << 20):
            os.link(s, d)
        else:
            shutil.copy2(s, d)

    shutil.copytree(src, dst, copy_function=copy)
    return dst


def manifest(state: Path) -> dict:
    return json.loads((state / "manifest.json").read_text())


def acc_file(state: Path) -> Path:
    return state / manifest(state)["generation"] / "accumulators.safetensors"


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def fmt_s(x: float) -> str:
    return f"{x:.2f}" if x < 10 else f"{x:.1f}" if x < 100 else f"{x:.0f}"


def fmt_loads(xs: list[float]) -> str:
    return f"{min(xs):.1f}" if min(xs) == max(xs) else f"{min(xs):.1f}-{max(xs):.1f}"


# ---------------------------------------------------------------- where the time goes (in the profiled process)


GEMM_OPS = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "aten::baddbmm_", "aten::dot",
            "aten::vdot", "aten::mv", "aten::addmv_")


def profile_add(argv: list[str], out_json: str) -> None:
    """`cmerge add ARGS` in this process under torch.profiler: seconds before, in and after the step, and the
    step's main-thread operator time by kind (eigh, SVD, products, the rest)."""
    t_begin = time.perf_counter()
    from torch.profiler import ProfilerActivity, profile

    import cmerge.state
    from cmerge.cli import main

    marks: dict[str, float] = {}
    inner = cmerge.state.run_step

    def timed_step(*a, **k):
        marks["step_start"] = time.perf_counter()
        try:
            return inner(*a, **k)
        finally:
            marks["step_end"] = time.perf_counter()

    cmerge.state.run_step = timed_step
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        torch.ones(1).add_(1)  # a marker: the profiler numbers threads itself, and this one is the main thread
        try:
            main(["add", *argv], standalone_mode=False)
        except SystemExit:
            pass
    t_end = time.perf_counter()
    cats = {"eigh": 0.0, "SVD": 0.0, "products": 0.0, "other operators": 0.0}
    reader = 0.0
    events = list(prof.events())
    main_tid = next(ev.thread for ev in events if ev.name == "aten::add_")
    for ev in events:
        if ev.cpu_parent is not None or not ev.name.startswith("aten::"):
            continue  # top-level operators only (their children are inside their time)
        sec = ev.cpu_time_total / 1e6
        if ev.thread != main_tid:
            reader += sec
            continue
        if "eigh" in ev.name:
            cats["eigh"] += sec
        elif "svd" in ev.name:
            cats["SVD"] += sec
        elif ev.name in GEMM_OPS or ev.name in ("aten::matmul", "aten::linalg_vecdot"):
            cats["products"] += sec
        else:
            cats["other operators"] += sec
    step = marks["step_end"] - marks["step_start"]
    result = {"before step": marks["step_start"] - t_begin, "step": step, "after step": t_end - marks["step_end"],
              **cats, "step, not in operators": step - sum(cats.values()), "reading thread operators": reader}
    Path(out_json).write_text(json.dumps(result))


# ---------------------------------------------------------------- the suite


@dataclass
class Result:
    spec: ModelSpec
    runs: int
    note: str = ""
    steps: dict[int, dict] = field(default_factory=dict)  # t -> measurements
    export: dict = field(default_factory=dict)
    io_adds: dict[str, dict] = field(default_factory=dict)
    profile: dict[str, dict] = field(default_factory=dict)  # kernel -> categories
    flat: dict = field(default_factory=dict)
    shapes: dict[tuple[int, int], int] = field(default_factory=dict)  # projected (m, n) -> count
    bytes_read: int = 0
    bytes_written: int = 0


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.work = Path(args.workdir).resolve()
        self.work.mkdir(parents=True, exist_ok=True)
        threads = str(args.threads)
        self.env = dict(os.environ, GOMP_SPINCOUNT="10000", PYTHONUNBUFFERED="1", OMP_NUM_THREADS=threads,
                        MKL_NUM_THREADS=threads)
        self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), str(HERE),
                                                               self.env.get("PYTHONPATH")]))
        self.cm = cmerge_exe()
        self.t_start = time.time()

    def log(self, msg: str) -> None:
        print(f"[{time.time() - self.t_start:7.1f}s] {msg}", flush=True)

    # -- helpers
    def models(self, spec: ModelSpec, upto: int) -> list[Path]:
        folders = []
        for t in range(upto + 1):
            f = self.work / f"{spec.key}-models" / f"m{t}"
            if not (f / "model.safetensors.index.json").exists():
                shutil.rmtree(f, ignore_errors=True)
                write_model(spec, f, t)
            folders.append(f)
        return folders

    def cmerge(self, *args: object) -> Run:
        return run([*self.cm, *[str(a) for a in args]], self.env)

    def ref(self, *args: object) -> tuple[Run, dict]:
        r = run([sys.executable, str(REFERENCE), *map(str, args)], self.env)
        return r, last_json(r.out)

    def init(self, state: Path, base: Path, method: str, no_project: str | None, **params: object) -> None:
        shutil.rmtree(state, ignore_errors=True)
        extra: list[object] = ["--no-project", no_project] if no_project else []
        for k, v in params.items():
            extra += [f"--{k.replace('_', '-')}", v]
        self.cmerge("init", state, "--base", base, "--method", method, "-q", *extra)

    def projected(self, state: Path, path: Path) -> Path:
        kinds = manifest(state)["base"]["tensors"]
        path.write_text(json.dumps([n for n, v in kinds.items() if v["kind"] in PROJECTED_KINDS]))
        return path

    def profiled_add(self, state: Path, model: Path, out: Path) -> dict:
        r = run([sys.executable, str(Path(__file__).resolve()), "--_profile-add", str(out), str(state), str(model),
                 "-q"], self.env)
        prof = json.loads(out.read_text())
        prof["wall"] = r.wall
        prof["load"] = r.load
        return prof

    # -- OPCM add with both kernels, the reference approach, exactness
    def opcm(self, spec: ModelSpec, runs: int, steps: tuple[int, ...], no_project: str | None = None,
             exact_projected: list[str] | None = None, note: str = "", profile: bool = False) -> Result:
        """OPCM adds of the models in ``steps``, each kernel against the reference approach and float64.

        ``exact_projected``: check only these projected tensors against float64 (and every
        tensor that is not projected); None checks them all.
        """
        res = Result(spec, runs, note)
        t0 = time.time()
        m = self.models(spec, max(steps))
        self.log(f"{spec.key}: {spec.title}, {spec.params / 1e6:.1f} M parameters, models written in "
                 f"{time.time() - t0:.0f}s")
        d = self.work / spec.key
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir()
        snaps: dict[str, dict[int, Path]] = {}
        for k in KERNELS:
            chain = d / f"chain-{k}"
            self.init(chain, m[0], "opcm", no_project, alpha=self.args.alpha, kernel=k)
            self.cmerge("add", chain, m[1], "-q")
            snaps[k] = {1: clone_state(chain, d / f"{k}-s1")}
            shutil.rmtree(chain)
        projected = self.projected(snaps["float64"][1], d / "projected.json")
        kinds = manifest(snaps["float64"][1])["base"]["tensors"]
        shapes = dict(spec.tensors)
        for n in json.loads(projected.read_text()):
            res.shapes[tuple(shapes[n])] = res.shapes.get(tuple(shapes[n]), 0) + 1
        merged = [n for n, v in kinds.items() if v["kind"] != "passthrough"]
        acc_bytes = sum(int(torch.tensor(shapes[n]).prod()) * 4 for n in merged)
        res.bytes_read = 2 * spec.nbytes + acc_bytes  # base, incoming, S_{t−1} (float32)
        res.bytes_written = acc_bytes
        names_file = None
        if exact_projected is not None:
            skip = set(json.loads(projected.read_text())) - set(exact_projected)
            names_file = d / "exact_names.json"
            names_file.write_text(json.dumps([n for n, _ in spec.tensors if n not in skip]))
        for t in range(2, max(steps) + 1):
            if t not in steps:
                for k in KERNELS:
                    snaps[k][t] = clone_state(snaps[k][t - 1], d / f"{k}-s{t}")
                    r = self.cmerge("add", snaps[k][t], m[t], "-q")
                    self.log(f"{spec.key}: {k} add #{t} (not measured) {r.wall:.1f}s")
                continue
            # the reference's input θ_{t−1}: model 1, or the float64 state's float32 export
            merged_in = m[1] if t == 2 else d / f"export{t - 1}"
            if t > 2:
                shutil.rmtree(merged_in, ignore_errors=True)
                self.cmerge("export", snaps["float64"][t - 1], merged_in, "--dtype", "float32", "-q")
            prev_scalars = manifest(snaps["float64"][t - 1])["scalars"]
            meas: dict = {"ref_wall": [], "ref_rss": [], "ref_load": [], "ref_compute": [], "loads": [],
                          **{f"{k}_{x}": [] for k in KERNELS for x in ("wall", "rss")}}
            for i in range(runs):  # one round: each kernel's add and the reference, one after the other
                for k in KERNELS:
                    tmp = clone_state(snaps[k][t - 1], d / f"{k}-s{t}" if i == 0 else d / "tmp")
                    r = self.cmerge("add", tmp, m[t], "-q")
                    meas[f"{k}_wall"].append(r.wall)
                    meas[f"{k}_rss"].append(r.rss_mb)
                    meas["loads"].append(r.load)
                    self.log(f"{spec.key}: add #{t} kernel {k} run {i + 1}: {r.wall:.1f}s, peak RSS {r.rss_mb:.0f} MB "
                             f"(load {r.load:.1f})")
                    if i == 0:
                        snaps[k][t] = tmp
                    else:
                        shutil.rmtree(tmp)
                compare = []
                if i == 0:
                    ex_t = d / f"export{t}"
                    shutil.rmtree(ex_t, ignore_errors=True)
                    self.cmerge("export", snaps["float64"][t], ex_t, "--dtype", "float32", "-q")
                    compare = ["--compare", ex_t]
                r, out = self.ref("approach", "--base", m[0], "--merged", merged_in, "--model", m[t], "--t", t,
                                  "--lam", prev_scalars["lambda"], "--norm-sum", prev_scalars["norm_sum"],
                                  "--alpha", self.args.alpha, "--projected", projected, *compare)
                meas["ref_wall"].append(r.wall)
                meas["ref_rss"].append(r.rss_mb)
                meas["ref_load"].append(out["load_s"])
                meas["ref_compute"].append(out["compute_s"])
                meas["loads"].append(r.load)
                if i == 0:
                    meas["vs_ref"] = out["max_rel_diff"]
                    shutil.rmtree(ex_t, ignore_errors=True)
                self.log(f"{spec.key}: reference step {t} run {i + 1}: {r.wall:.1f}s (load {out['load_s']:.1f}s, "
                         f"compute {out['compute_s']:.1f}s), peak RSS {r.rss_mb:.0f} MB (load {r.load:.1f})")
            if t > 2:
                shutil.rmtree(merged_in, ignore_errors=True)
            meas["exact"] = self.exact(d, m, t, snaps, projected, names_file)
            if profile and t == steps[0]:
                meas["profile"] = {}
                for k in KERNELS:
                    tmp = clone_state(snaps[k][t - 1], d / "tmp")
                    meas["profile"][k] = self.profiled_add(tmp, m[t], d / "profile.json")
                    shutil.rmtree(tmp)
                    self.log(f"{spec.key}: profiled add #{t} kernel {k}: {meas['profile'][k]}")
            res.steps[t] = meas
            for k in KERNELS:
                for old in [s for s in snaps[k] if s < t - 1]:
                    shutil.rmtree(snaps[k].pop(old), ignore_errors=True)
        self.export_and_floor(res, d, snaps["float64"][max(steps)], m, runs)
        for k in KERNELS:
            for s in snaps[k].values():
                shutil.rmtree(s, ignore_errors=True)
        return res

    def exact(self, d: Path, m: list[Path], t: int, snaps: dict[str, dict[int, Path]], projected: Path,
              names_file: Path | None) -> dict:
        """Each kernel's P(τ_t) and λ_t against float64, with the reference approach on the same S_{t−1}."""
        prev = {k: manifest(snaps[k][t - 1])["scalars"] for k in KERNELS}
        # at t = 2 both states start from S_1 = τ_1 (the same bits): one float64 computation serves both
        shared = t == 2 and (acc_file(snaps["float64"][1]).read_bytes() == acc_file(snaps["float32"][1]).read_bytes())
        groups = [list(KERNELS)] if shared else [[k] for k in KERNELS]
        out: dict = {}
        for group in groups:
            accs = d / "accs.json"
            accs.write_text(json.dumps([{"label": k, "path": str(acc_file(snaps[k][t])),
                                         "lambda": manifest(snaps[k][t])["scalars"]["lambda"]} for k in group]))
            r, res = self.ref("exact", "--base", m[0], "--model", m[t], "--prev-acc", acc_file(snaps[group[0]][t - 1]),
                              "--accs", accs, "--t", t, "--norm-sum", prev[group[0]]["norm_sum"], "--alpha",
                              self.args.alpha, "--projected", projected, "--with-reference",
                              *(["--names", names_file] if names_file else []))
            for k in group:
                out[k] = res["states"][k]
                out[f"reference ({k} state)"] = res["reference"]
                self.log(f"{m[0].parent.name}: step {t} kernel {k} vs float64: max rel ΔP {out[k]['max_rel_p']:.1e} "
                         f"({out[k]['max_rel_p_tensor']}), λ rel {out[k]['lambda_rel']:.1e}; reference approach on the "
                         f"same S_(t-1): {res['reference']['max_rel_p']:.1e}")
        return out

    # -- I/O-bound: export, add without SVD, and the floors
    def export_and_floor(self, res: Result, d: Path, state: Path, m: list[Path], runs: int) -> None:
        walls, floors, fsyncs = [], [], []
        for i in range(runs):
            out = d / "export"
            shutil.rmtree(out, ignore_errors=True)
            walls.append(self.cmerge("export", state, out, "-q").wall)
            shutil.rmtree(out, ignore_errors=True)
            r, o = self.ref("floor", "--read", m[0], acc_file(state), "--write-from", m[0],
                            "--out", d / "floor.safetensors")
            floors.append(r.wall - o["fsync_s"])
            fsyncs.append(o["fsync_s"])
            (d / "floor.safetensors").unlink()
        res.export = {"wall": walls, "floor": floors, "fsync": fsyncs}
        self.log(f"{res.spec.key}: export {median(walls):.1f}s, floor {median(floors):.1f}s")

    def io_add(self, res: Result, method: str, runs: int, no_project: str | None, **params: object) -> None:
        m = self.models(res.spec, 2)
        d = self.work / f"{res.spec.key}-{method}"
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir()
        state = d / "state"
        self.init(state, m[0], method, no_project, **params)
        self.cmerge("add", state, m[1], "-q")
        walls, floors, fsyncs = [], [], []
        for i in range(runs):
            tmp = clone_state(state, d / "tmp")
            walls.append(self.cmerge("add", tmp, m[2], "-q").wall)
            shutil.rmtree(tmp)
            r, o = self.ref("floor", "--read", m[0], acc_file(state), m[2], "--write-from", acc_file(state),
                            "--out", d / "floor.safetensors")
            floors.append(r.wall - o["fsync_s"])
            fsyncs.append(o["fsync_s"])
            (d / "floor.safetensors").unlink()
        res.io_adds[method] = {"wall": walls, "floor": floors, "fsync": fsyncs}
        self.log(f"{res.spec.key}: {method} add {median(walls):.1f}s, floor {median(floors):.1f}s")
        shutil.rmtree(d, ignore_errors=True)

    def method_steps(self, spec: ModelSpec, rows: list[str], runs: int, step: int, no_project: str | None,
                     note: str = "") -> dict:
        """`cmerge add` of model ``step`` for each row (``METHOD[:key=value...]``, its other parameters the
        defaults), each on a copy of its state after step − 1, in rounds: every round times each row once, so the
        rows of a round share the machine's load. Wall time and peak RSS per run."""
        m = self.models(spec, step)
        d = self.work / f"{spec.key}-methods"
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir()
        states = {}
        on = ["--device", self.args.device] if self.args.device != "cpu" else []
        for i, row in enumerate(rows):
            method, params = parse_row(row)
            states[row] = d / f"state{i}"
            self.init(states[row], m[0], method, no_project, **params)
            for t in range(1, step):
                self.cmerge("add", states[row], m[t], "-q", *on)
            self.log(f"{spec.key}: {row} state after step {step - 1} ready")
        out: dict = {"model": f"{spec.key}: {spec.title}{note}", "key": spec.key, "step": step, "runs": runs,
                     "rows": {row: {"wall": [], "rss": [], "load": []} for row in rows}}
        for rnd in range(runs):
            for row, state in states.items():
                tmp = clone_state(state, d / "tmp")
                r = self.cmerge("add", tmp, m[step], "-q", *on)
                shutil.rmtree(tmp)
                self.log(f"{spec.key}: {row} add #{step}, round {rnd + 1}: {r.wall:.1f}s (load {r.load:.1f})")
                for k, v in (("wall", r.wall), ("rss", r.rss_mb), ("load", r.load)):
                    out["rows"][row][k].append(v)
        for row, v in out["rows"].items():
            self.log(f"{spec.key}: {row} add #{step} {median(v['wall']):.1f}s, peak RSS {max(v['rss']):.0f} MB")
        shutil.rmtree(d, ignore_errors=True)
        return out

    def flatness(self, res: Result, big: ModelSpec, no_project: str | None) -> None:
        """Peak RSS of `cmerge add` (OPCM, step 2, float64 kernel) on the 8-layer slice."""
        m = self.models(big, 2)
        d = self.work / big.key
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir()
        state = d / "state"
        self.init(state, m[0], "opcm", no_project, alpha=self.args.alpha)
        self.cmerge("add", state, m[1], "-q")
        r = self.cmerge("add", state, m[2], "-q")
        self.log(f"{big.key}: cmerge add #2 {r.wall:.1f}s, peak RSS {r.rss_mb:.0f} MB")
        res.flat = {"spec": big, "wall": r.wall, "rss": r.rss_mb}
        shutil.rmtree(d, ignore_errors=True)

    # -- the machine's rates and the kernel candidates
    def rates(self, shapes: list[tuple[int, int]]) -> dict:
        """One process: bandwidths and, per unordered weight shape, product / SVD / eigh times in both precisions.
        The thin SVD is timed for shapes up to 16 M elements (float64 only up to 4 M); larger ones take the
        Gram route in the floor (an SVD of them is slower on every shape measured)."""
        spec = []
        for m, n in sorted({(min(s), max(s)) for s in shapes}):
            spec.append([m, n, ["float32", "float64"] if m * n <= (1 << 22) else
                         (["float32"] if m * n <= (1 << 24) else [])])
        r, out = self.ref("rates", "--shapes", json.dumps(spec), "--scratch", self.work / "rates.bin",
                          "--io-mb", 64 if self.args.quick else 512)
        out["load"] = r.load
        out["wall"] = r.wall
        self.log(f"rates: read {out['read_gbs']:.2f} GB/s, write {out['write_gbs']:.2f} GB/s, {len(spec)} shapes in "
                 f"{r.wall:.0f}s (load {r.load:.1f})")
        return out

    def candidates(self, shapes: list[tuple[int, int]]) -> dict:
        r, out = self.ref("candidates", "--shapes", json.dumps(sorted(set(shapes))), "--alpha", self.args.alpha)
        out["load"] = r.load
        self.log(f"kernel candidates: {len(out['rows'])} rows in {r.wall:.0f}s (load {r.load:.1f})")
        return out

    # -- start-up
    def startup(self, runs: int, rev: str = "HEAD") -> dict:
        """Whole-process times of `cmerge --help`, `cmerge info STATE` and an `add` of a one-tensor model, for
        this tree and revision ``rev``'s (git archive), interleaved; and which heavy modules each imports."""
        d = self.work / "startup"
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir()
        before = d / "head"
        before.mkdir()
        try:
            archive = subprocess.run(["git", "archive", rev, "src/cmerge"], cwd=ROOT, capture_output=True,
                                     check=True).stdout
            subprocess.run(["tar", "-x", "-C", str(before)], input=archive, check=True)
            trees = {f"before ({rev})": before / "src", "after (this tree)": ROOT / "src"}
        except (OSError, subprocess.CalledProcessError):
            trees = {"after (this tree)": ROOT / "src"}
        from safetensors.torch import save_file

        for i in range(3):
            save_file({"w": torch.randn(8, 8, generator=torch.Generator().manual_seed(i))}, str(d / f"one{i}.safetensors"))
        probe = ("import sys, json, atexit\n"
                 "atexit.register(lambda: print('MODULES ' + json.dumps({m: m in sys.modules for m in "
                 "('torch', 'transformers', 'yaml', 'numpy', 'torch._dynamo')}), file=sys.stderr))\n"
                 "from cmerge.cli import main\nsys.exit(main())")
        out: dict = {"runs": runs, "rows": {}, "modules": {}, "rev": rev}
        commands = {"python -c 'import torch'": None, "cmerge --help": ["--help"],
                    "cmerge info STATE": ["info", "{state}"], "cmerge add (1-tensor model)": ["add", "{tmp}",
                                                                                            str(d / "one2.safetensors"),
                                                                                            "-q"]}
        states = {}
        for label, src in trees.items():
            env = dict(self.env, PYTHONPATH=os.pathsep.join([str(src), str(HERE)]))
            st = d / f"state-{len(states)}"
            run([sys.executable, "-c", "import sys; from cmerge.cli import main; sys.exit(main())", "init", str(st),
                 "--base", str(d / "one0.safetensors"), "-q"], env)
            run([sys.executable, "-c", "import sys; from cmerge.cli import main; sys.exit(main())", "add", str(st),
                 str(d / "one1.safetensors"), "-q"], env)
            states[label] = (env, st)
        for i in range(runs):
            for cmd_label, args in commands.items():
                for label, (env, st) in states.items():
                    if args is None:
                        if label != next(iter(states)):
                            continue
                        cmd = [sys.executable, "-c", "import torch"]
                    else:
                        tmp = clone_state(st, d / "tmp")
                        argv = [a.format(state=st, tmp=tmp) for a in args]
                        cmd = [sys.executable, "-c", "import sys; from cmerge.cli import main; sys.exit(main())",
                               *argv]
                    r = run(cmd, env)
                    key = cmd_label if args is None else f"{cmd_label} — {label}"
                    out["rows"].setdefault(key, {"wall": [], "load": []})
                    out["rows"][key]["wall"].append(r.wall)
                    out["rows"][key]["load"].append(r.load)
                    if args is not None and i == 0:
                        tmp = clone_state(st, d / "tmp")
                        argv = [a.format(state=st, tmp=tmp) for a in args]
                        p = subprocess.run([sys.executable, "-c", probe, *argv], env=env, capture_output=True,
                                           text=True)
                        line = [x for x in p.stderr.splitlines() if x.startswith("MODULES ")]
                        out["modules"][key] = json.loads(line[-1][8:]) if line else {}
        shutil.rmtree(d, ignore_errors=True)
        for key, v in out["rows"].items():
            self.log(f"start-up {key}: median {median(v['wall']):.2f}s (loads {fmt_loads(v['load'])})")
        return out


# ---------------------------------------------------------------- the floor


def shape_rates(rates: dict, m: int, n: int) -> dict:
    key = [min(m, n), max(m, n)]
    for row in rates["shapes"]:
        if row["shape"] == key:
            return row
    raise KeyError(key)


def svd_time(rates: dict, m: int, n: int, prec: str) -> float | None:
    """The thin SVD's time for this shape, or for its r × r square where it was not timed (a QR first would
    bring it there: a lower estimate); None if neither was timed."""
    row = shape_rates(rates, m, n)
    if f"svd_{prec}" in row:
        return row[f"svd_{prec}"]
    r = min(m, n)
    for sq in rates["shapes"]:
        if sq["shape"] == [r, r] and f"svd_{prec}" in sq:
            return sq[f"svd_{prec}"]
    return None


def weight_floor(rates: dict, m: int, n: int, route: str) -> float:
    """Seconds of one projected weight at the measured rates.

    ``float64``: the cheapest float64 route, the Gram ``eigh`` and four products or an SVD
    and two; ``float32``: the same in float32 (the float32 class's floor); ``float32 kernel``:
    the route the float32 kernel takes (a float64 Gram and ``eigh``, three float32 products)
    or a float32 SVD and two products, whichever is cheaper (the routes that meet the
    float32 kernel's error bound, docs/methods.md).
    """
    row = shape_rates(rates, m, n)
    if route in ("float64", "float32"):
        options = [row[f"eigh_{route}"] + 4 * row[f"gemm_{route}"]]
        svd = svd_time(rates, m, n, route)
        if svd is not None:
            options.append(svd + 2 * row[f"gemm_{route}"])
        return min(options)
    options = [row["eigh_float64"] + row["gemm_float64"] + 3 * row["gemm_float32"]]
    svd = svd_time(rates, m, n, "float32")
    if svd is not None:
        options.append(svd + 2 * row["gemm_float32"])
    return min(options)


def step_floor(res: Result, rates: dict, route: str) -> tuple[float, float]:
    """(I/O seconds, compute seconds) of one step of ``res``'s model at the measured rates."""
    io = res.bytes_read / (rates["read_gbs"] * 1e9) + res.bytes_written / (rates["write_gbs"] * 1e9)
    compute = sum(c * weight_floor(rates, m, n, route) for (m, n), c in res.shapes.items())
    return io, compute


# ---------------------------------------------------------------- report


def machine(device: str = "cpu") -> str:
    model = platform.processor() or "?"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    gpu = f", {torch.cuda.get_device_name()}" if device != "cpu" and torch.cuda.is_available() else ""
    return f"{model}, {os.cpu_count()} cores, {mem:.0f} GiB RAM{gpu}, torch {torch.__version__}"


def check(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def first_step(res: Result) -> tuple[int, dict]:
    t = min(res.steps)
    return t, res.steps[t]


def report(results: list[Result], rates: dict | None, cands: dict | None, args: argparse.Namespace, started: float,
           duration: float, left_out: list[str], cmd: str) -> str:
    lines = [
        "## Speed and memory (`benchmarks/speed.py`)",
        "",
        f"Command: `{cmd}` — {dt.datetime.fromtimestamp(started).strftime('%Y-%m-%d %H:%M')}, "
        f"{duration / 60:.0f} min in all.  ",
        f"Machine: {machine()}; every measured process ran with {args.threads} OpenMP thread"
        f"{'s' if args.threads != 1 else ''} and `GOMP_SPINCOUNT=10000`.  ",
        f"Load: the 1-minute load average before each of the {len(LOADS)} processes it started ranged "
        f"{min(LOADS, default=0):.1f}-{max(LOADS, default=0):.1f} (median {median(LOADS or [0]):.1f}) on "
        f"{os.cpu_count()} cores; this benchmark alone accounts for about 1. The machine was shared with other "
        "jobs, so absolute seconds are slower than on an idle machine; every ratio below compares numbers measured "
        "in the same run, in rounds (each kernel's add and the reference one after the other), and each row gives "
        "the load range of its own rounds.",
    ]
    if left_out:
        lines += ["", "Left out of this run: " + "; ".join(left_out) + "."]
    lines += [
        "",
        "Each number is the median over the runs shown; every run is a fresh process (wall time to exit, its own "
        "peak RSS). *float64*, *float32*: `cmerge add STATE MODEL -q` on a copy of the state before that step, "
        "the state made with `--kernel float64` (the default) or `--kernel float32` (OPCM, α = 0.5, state "
        "precision float32). *Reference*: the same step with the paper's code's arithmetic "
        "(`benchmarks/speed_reference.py approach`: base, merged and new model in memory in float32, "
        "`torch.linalg.svd(full_matrices=True)` per linear weight, C = UᵀXV and UC'Vᵀ with the full matrices, "
        "Eq. 10), loading included.",
        "",
        "| model | step | runs | loads | float64 s | float32 s | reference s | speed-up float64 | speed-up float32 "
        "| float64 RSS MB | float32 RSS MB | reference RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for res in results:
        for t, s in res.steps.items():
            c64, c32, rf = median(s["float64_wall"]), median(s["float32_wall"]), median(s["ref_wall"])
            lines.append(
                f"| {res.spec.key}: {res.spec.title}, {res.spec.params / 1e6:.0f} M{res.note} | {t} | {res.runs} "
                f"| {fmt_loads(s['loads'])} | {fmt_s(c64)} | {fmt_s(c32)} | {fmt_s(rf)} (load "
                f"{fmt_s(median(s['ref_load']))}) | {rf / c64:.2f}× | {rf / c32:.2f}× | {median(s['float64_rss']):.0f} "
                f"| {median(s['float32_rss']):.0f} | {median(s['ref_rss']):.0f} |")
    lines += ["", "Exactness, side by side on the same inputs: each state's stored P(τ_t) = S_t − S_{t−1} against a "
              "float64 thin-SVD computation of Eq. 9 from that state's S_{t−1} (largest relative Frobenius error over "
              "the checked tensors), and the reference approach's float32 arithmetic (full SVD) on the same S_{t−1} "
              "and τ_t. *vs reference*: the largest relative difference between the float64 state's merged task "
              "vector θ_t − θ0 and the reference approach's.", "",
              "| model | step | tensors checked | float64 kernel | float32 kernel | reference approach | λ_t float64 "
              "| λ_t float32 | vs reference |", "|---|---|---|---|---|---|---|---|---|"]
    for res in results:
        for t, s in res.steps.items():
            ex = s["exact"]
            refs = max(ex[f"reference ({k} state)"]["max_rel_p"] for k in KERNELS)
            lines.append(f"| {res.spec.key} | {t} | {ex['float64']['checked']} | {ex['float64']['max_rel_p']:.1e} "
                         f"| {ex['float32']['max_rel_p']:.1e} | {refs:.1e} | {ex['float64']['lambda_rel']:.1e} "
                         f"| {ex['float32']['lambda_rel']:.1e} | {s['vs_ref']:.1e} |")
    if cands:
        lines += ["", "Kernel candidates (`speed_reference.py candidates`, one process, "
                  f"load {cands['load']:.1f}): one pair per weight shape, D = τ_1 + … + τ_4 and X = τ_5 of "
                  "speed_models (a step-5-like pair); median seconds of the projection (inputs in memory) and relative "
                  "error against the float64 thin-SVD computation.", "",
                  "| shape | candidate | seconds | error vs float64 | error / reference's |", "|---|---|---|---|---|"]
        by_shape: dict[tuple, dict] = {}
        for row in cands["rows"]:
            by_shape.setdefault(tuple(row["shape"]), {})[row["candidate"]] = row
        for shape, rows in by_shape.items():
            ref_err = rows["reference approach (full float32 SVD)"]["rel_error"]
            for name, row in rows.items():
                lines.append(f"| {shape[0]} × {shape[1]} | {name} | {fmt_s(row['seconds'])} | {row['rel_error']:.1e} "
                             f"| {row['rel_error'] / ref_err:.2f} |")
    if rates:
        lines += roofline(results, rates)
    io_rows = [(res, what, v) for res in results
               for what, v in [("export", res.export)] + [(f"add ({k})", v) for k, v in res.io_adds.items()] if v]
    if io_rows:
        lines += ["", "I/O-bound operations against the I/O floor: a fresh process that reads the same files in full "
                  "with `safetensors.torch.load` and writes the same bytes with `save_file`; cmerge also fsyncs what it "
                  "writes, so the floor plus an fsync of the written file is shown too:", "",
                  "| model | operation | runs | cmerge s | floor s | ratio | floor + fsync s | ratio |",
                  "|---|---|---|---|---|---|---|---|"]
        for res, what, v in io_rows:
            cm, fl = median(v["wall"]), median(v["floor"])
            dur = median([a + b for a, b in zip(v["floor"], v["fsync"])])
            lines.append(f"| {res.spec.key} | {what} | {len(v['wall'])} | {fmt_s(cm)} | {fmt_s(fl)} | {cm / fl:.2f}× "
                         f"| {fmt_s(dur)} | {cm / dur:.2f}× |")
    flat = [r for r in results if r.flat]
    if flat:
        lines += ["", "Peak RSS of `cmerge add` (OPCM, step 2, float64 kernel) against model size:", "",
                  "| model | parameters | cmerge add s | peak RSS MB |", "|---|---|---|---|"]
        for r in flat:
            _, s2 = first_step(r)
            lines.append(f"| {r.spec.title}{r.note} | {r.spec.params / 1e6:.0f} M | {fmt_s(median(s2['float64_wall']))} "
                         f"| {median(s2['float64_rss']):.0f} |")
            lines.append(f"| {r.flat['spec'].title}{r.note} | {r.flat['spec'].params / 1e6:.0f} M "
                         f"| {fmt_s(r.flat['wall'])} | {r.flat['rss']:.0f} |")
    prof = [(res, t, s["profile"]) for res in results for t, s in res.steps.items() if s.get("profile")]
    if prof:
        cats = [k for k in next(iter(prof[0][2].values())) if k not in ("wall", "load")]
        lines += ["", "### Where the time goes", "",
                  "One more `cmerge add` of the first measured step per kernel, in a process that runs the CLI under "
                  "`torch.profiler` (the profiler adds its own overhead): seconds before the step (interpreter, "
                  "imports, opening the state and the model, the duplicate and base checks), in the step and after "
                  "it (renames, manifest); the step's main-thread operators by kind (*products*: every matrix "
                  "product, including those written with `@`); what the step spent outside operators (Python, "
                  "waiting for reads and hashing, handing tensors to the writer); operators of the reading thread. "
                  "Process wall minus these three parts is interpreter start and exit.", "",
                  "| model | kernel | wall s | load | " + " | ".join(cats) + " |",
                  "|---|---|---|---|" + "---|" * len(cats)]
        for res, t, p in prof:
            for k, row in p.items():
                lines.append(f"| {res.spec.key} step {t} | {k} | {fmt_s(row['wall'])} | {row['load']:.1f} | "
                             + " | ".join(fmt_s(row[c]) for c in cats) + " |")
    lines += ["", "### Targets", ""]
    lines += targets(results, rates)
    lines += ["", "Start-up: its own section below (`--startup-only` measures it alone).", "", NOTES]
    return "\n".join(lines)


def roofline(results: list[Result], rates: dict) -> list[str]:
    lines = ["", "### The floor (roofline)", "",
             f"Rates measured on this machine in one process with {rates['threads']} thread"
             f"{'s' if rates['threads'] != 1 else ''} (load {rates['load']:.1f}): read "
             f"{rates['read_gbs']:.2f} GB/s (a file just written, from the page cache, as a step reads its inputs), "
             f"write {rates['write_gbs']:.2f} GB/s (with fsync, as cmerge writes). Per weight shape (m × n, r = "
             "min(m, n)): one r·m·n product, the thin SVD and the `eigh` of the r × r Gram matrix, in seconds:", "",
             "| shape | product float32 | product float64 | SVD float32 | SVD float64 | eigh float32 | eigh float64 |",
             "|---|---|---|---|---|---|---|"]
    for row in rates["shapes"]:
        m, n = row["shape"]
        cell = lambda k: fmt_s(row[k]) if k in row else "–"  # noqa: E731
        lines.append(f"| {m} × {n} | {cell('gemm_float32')} | {cell('gemm_float64')} | {cell('svd_float32')} "
                     f"| {cell('svd_float64')} | {cell('eigh_float32')} | {cell('eigh_float64')} |")
    lines += ["", "A step's floor: its bytes (base, incoming, S_{t−1} read; S_t written) over those bandwidths plus, "
              "per projected weight, the cheapest route at those rates: the Gram `eigh` and four products (Gram, "
              "Dᵀ U, UᵀX, the result) or an SVD and two products (UᵀX, the result); an SVD not timed for a shape "
              "counts as that of its r × r square (a lower estimate). Start-up is not part of the floor (see the "
              "start-up table). *float64*: the float64 kernel against float64 rates; *float32 class*: the float32 "
              "kernel against float32 rates, whose cheapest route (a float32 `eigh` of the Gram matrix) is many times "
              "further from float64 than the reference approach (kernel candidates above: the ratio per shape), so no kernel bound by the "
              "reference's error can take it; *float32 admissible*: against the routes that meet that bound (the "
              "kernel's own: a float64 Gram and `eigh` and three float32 products; or a float32 SVD and two "
              "products). *without start-up*: cmerge's time less the median `cmerge add` of a 1-tensor model.", "",
              "| model | step | kernel | floor | floor I/O s | floor compute s | floor s | cmerge s | × floor "
              "| without start-up |", "|---|---|---|---|---|---|---|---|---|---|"]
    for res in results:
        for t, s in res.steps.items():
            for k, route, label in (("float64", "float64", "float64"), ("float32", "float32", "float32 class"),
                                    ("float32", "float32 kernel", "float32 admissible")):
                io, comp = step_floor(res, rates, route)
                cm = median(s[f"{k}_wall"])
                base = STARTUP_ADD.get("wall")
                wo = f"{(cm - base) / (io + comp):.2f}×" if base is not None else "–"
                lines.append(f"| {res.spec.key} | {t} | {k} | {label} | {fmt_s(io)} | {fmt_s(comp)} "
                             f"| {fmt_s(io + comp)} | {fmt_s(cm)} | {cm / (io + comp):.2f}× | {wo} |")
    return lines


STARTUP_ADD: dict = {}


def startup_section(startup: dict, command: str, started: float) -> str:
    """The start-up section: command, machine, date, the table and the start-up targets."""
    rev = startup.get("rev", "HEAD")
    lines = ["### Start-up (`benchmarks/speed.py`)", "",
             f"Command: `{command}` — {dt.datetime.fromtimestamp(started).strftime('%Y-%m-%d %H:%M')}; machine: "
             f"{machine()}.", "",
             f"Whole-process wall time (median of {startup['runs']}, interleaved) of a Python that only imports torch, "
             f"and of three commands with the source of `{rev}` (`git archive`) and with this tree; *imports*: "
             "which of torch, transformers and PyYAML the command had loaded when it exited.", "",
             "| command | loads | wall s | imports |", "|---|---|---|---|"]
    for key, v in startup["rows"].items():
        mods = startup["modules"].get(key)
        imp = ", ".join(m for m in ("torch", "transformers", "yaml") if mods and mods.get(m)) if mods else "–"
        lines.append(f"| {key} | {fmt_loads(v['load'])} | {fmt_s(median(v['wall']))} | {imp or 'none of them'} |")
    lines += ["", "Targets:", ""]
    for key, mods in startup["modules"].items():
        if "after" not in key:
            continue
        if "add" in key:
            lines.append(f"- {check(not mods.get('transformers'))} start-up, {key}: transformers "
                         f"{'imported' if mods.get('transformers') else 'not imported'} (a safetensors model does "
                         "not need it)")
        else:
            ok = not mods.get("transformers") and not mods.get("torch")
            lines.append(f"- {check(ok)} start-up, {key}: transformers "
                         f"{'imported' if mods.get('transformers') else 'not imported'}, torch "
                         f"{'imported' if mods.get('torch') else 'not imported'}"
                         + (" — a module imported at start-up loads it (cli.py imports the registry's classes, "
                            "the state and the export only when a command needs them); `python -X importtime -c "
                            "'import cmerge.cli'` shows which" if mods.get("torch") else ""))
    return "\n".join(lines)


def parse_row(row: str) -> tuple[str, dict[str, str]]:
    """``METHOD:key=value:...`` (the bench's row syntax) → the method and its `cmerge init` options."""
    method, *pairs = row.split(":")
    params = dict(p.split("=", 1) for p in pairs)
    return method, params


def per_round_ratios(walls: list[float], reference: list[float]) -> list[float]:
    """Each round's wall time over the reference row's in the same round (the two shared its load)."""
    return [w / r for w, r in zip(walls, reference)]


def methods_section(parts: list[dict], command: str, started: float, reference: str = "opcm",
                    device: str = "cpu") -> str:
    """The data-free methods' step beside OPCM's: the table and the DOP target."""
    on = "" if device == "cpu" else f" on the GPU (`--device {device}`)"
    lines = [f"### The data-free methods' step beside OPCM's{on} (`benchmarks/speed.py`)", "",
             f"Command: `{command}` — {dt.datetime.fromtimestamp(started).strftime('%Y-%m-%d %H:%M')}; machine: "
             f"{machine(device)}.", "",
             f"`cmerge add STATE MODEL -q{' --device ' + device if on else ''}` of the step shown, each method with "
             "its defaults (OPCM: the float64 "
             "kernel), on a copy of its state after the step before; wall time of the whole process (start-up and "
             "I/O included), median over the runs; *× OPCM*: the median over rounds of the method's time over "
             "OPCM's in the same round (each round runs every method once, so the two share the machine's load); "
             "peak RSS of the process.", "",
             "| model | step | runs | loads | method | wall s | × OPCM | peak RSS MB |", "|---|---|---|---|---|---|---|---|"]
    checks = []
    for part in parts:
        ref = part["rows"].get(reference)
        for row, v in part["rows"].items():
            ratio = median(per_round_ratios(v["wall"], ref["wall"])) if ref else None
            lines.append(f"| {part['model']} | {part['step']} | {part['runs']} | {fmt_loads(v['load'])} | `{row}` | "
                         f"{fmt_s(median(v['wall']))} | {'—' if ratio is None else f'{ratio:.2f}×'} | "
                         f"{max(v['rss']):.0f} |")
            if row.startswith("dop") and "solver=exact" in row and ratio is not None:
                checks.append(f"- {check(ratio <= DOP_TARGET)} DOP exact, {part['key']} step {part['step']}: "
                              f"{ratio:.2f}× OPCM's step (target ≤ {DOP_TARGET:g}×)")
    return "\n".join(lines + ["", "Targets:", "", *(checks or ["- n/a DOP exact was not among the methods timed"])])


def targets(results: list[Result], rates: dict | None) -> list[str]:
    out = []
    for res in results:
        key = res.spec.key
        for t, s in res.steps.items():
            ex = s["exact"]
            e64 = ex["float64"]
            ok = e64["max_rel_p"] <= EXACT_TOL and e64["lambda_rel"] <= EXACT_TOL
            out.append(f"- {check(ok)} exact float64 kernel, {key} step {t}: max relative error {e64['max_rel_p']:.1e} "
                       f"(λ_t {e64['lambda_rel']:.1e}) ≤ {EXACT_TOL:.0e} on {e64['checked']} tensors")
            e32, eref = ex["float32"]["max_rel_p"], ex["reference (float32 state)"]["max_rel_p"]
            out.append(f"- {check(e32 <= eref)} float32 kernel error, {key} step {t}: {e32:.1e} against float64, the "
                       f"reference approach's on the same inputs {eref:.1e} (target: no larger)")
            if key.startswith(("b", "c")):
                speed = median(s["ref_wall"]) / median(s["float32_wall"])
                why = "" if speed >= SPEEDUP_TARGET else (
                    " — the float32 kernel keeps the float64 `eigh` of the Gram matrix (the fast float32 routes are "
                    "many times less exact than the bound allows, see the candidates), and on square weights that `eigh` "
                    "alone costs about what the reference's float32 SVD costs; see the floor")
                out.append(f"- {check(speed >= SPEEDUP_TARGET)} speed float32 kernel, {key} step {t}: {speed:.2f}× "
                           f"faster than the reference approach, start-up and I/O included (target ≥ "
                           f"{SPEEDUP_TARGET:g}×){why}")
                if rates:
                    for k, route in (("float64", "float64"), ("float32", "float32"), ("float32", "float32 kernel")):
                        io, comp = step_floor(res, rates, route)
                        ratio = median(s[f"{k}_wall"]) / (io + comp)
                        name = {"float64": "float64", "float32": "float32 class", "float32 kernel":
                                "float32 admissible"}[route]
                        out.append(f"- {check(ratio <= FLOOR_TARGET)} floor, {key} step {t}, {k} kernel against the "
                                   f"{name} floor: {ratio:.2f}× (target ≤ {FLOOR_TARGET:g}×)")
        if key.startswith("c") and res.steps:
            _, s = first_step(res)
            ratio = median(s["float64_rss"]) / median(s["ref_rss"])
            out.append(f"- {check(ratio <= 0.25)} memory, {key}: cmerge add peak RSS (float64 kernel) is {ratio:.0%} of "
                       "the reference approach's (target ≤ 25 %)")
            if res.flat:
                growth = res.flat["rss"] / median(s["float64_rss"]) - 1
                out.append(f"- {check(growth < 0.10)} flat memory: 2 → {res.flat['spec'].key} decoder layers grows "
                           f"peak RSS by {growth:+.1%} (target < 10 %)")
        for what, v in [("export", res.export)] + [(f"add ({k})", v) for k, v in res.io_adds.items()]:
            if v:
                r = median(v["wall"]) / median(v["floor"])
                out.append(f"- {check(r <= 1.5)} I/O, {key} {what}: {r:.2f}× the I/O floor (target ≤ 1.5×)")
    out.append("- n/a GPU: no GPU was lent to this task (CI has none either); the batched path was checked on the CPU "
               "for equality with the per-tensor path (tests/test_kernels.py), nothing was timed on a GPU.")
    return out


NOTES = """Notes.

- OpenMP: torch's MKL runs on GNU OpenMP, whose threads spin for a long while before sleeping; with
  other CPU-bound processes on these 2 cores that made two-thread LAPACK calls up to 20× slower, so
  every measured process runs with `GOMP_SPINCOUNT=10000`. Even so, while this run was prepared (load
  5-8) a 768² float64 `eigh` took 3.0 s with two threads and 0.37 s with one, so the processes run
  with one thread (`--threads` changes it).
- The two kernels (docs/methods.md, "Kernels"): the float64 kernel takes the SVD of D from a float64
  `eigh` of the smaller Gram matrix, recomputes singular values below 1e-3 s_1 with a small SVD of
  their own block and streams X through four float64 products; the float32 kernel keeps the float64
  Gram matrix, its `eigh`, the tail and the rank rule, and does Dᵀ U, UᵀX and the result in float32.
- Why 3× against the reference is out of reach for a kernel bound by the reference's error: the
  float32 routes that are faster than the float64 `eigh` (a float32 `eigh` of the Gram matrix, with
  or without a float64 Gram matrix) are many times further from float64 than the reference itself
  (the candidates table gives the ratio per shape), and a float32 SVD is no faster than the float64 `eigh` of
  the same r. On a square weight the reference does one float32 SVD and two float32 products with
  its full matrices, which is the floor of that weight within a few tens of per cent; cmerge gains
  on rectangular weights, whose full SVD builds and multiplies the large V (3072² for ViT's MLP,
  11008² for LLaMA's).
- Memory: a step holds the largest single rule, not the model (docs/architecture.md). The float32
  kernel's projection holds float32 copies of U and V besides the float64 Gram factors, which it
  drops once converted.
- (c2) is measured once per number with the linear weights of decoder layer 0 projected only (the
  other layers' weights take the identity rule in both approaches), as before.
"""


def write_doc(text: str, doc: Path, begin: str = BEGIN, end: str = END) -> None:
    """Replace the section between ``begin`` and ``end`` of ``doc`` (or append it)."""
    body = doc.read_text() if doc.exists() else "# Benchmarks\n\n"
    block = f"{begin}\n{text}\n{end}"
    if begin in body and end in body:
        body = re.sub(re.escape(begin) + r".*?" + re.escape(end), lambda _: block, body, flags=re.S)
    else:
        body = body.rstrip("\n") + "\n\n" + block + "\n"
    doc.write_text(body)


# ---------------------------------------------------------------- main


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--_profile-add":  # a measured child process, see Bench.profiled_add
        profile_add(sys.argv[3:], sys.argv[2])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="tiny shapes, one run, models a and c (a few minutes); prints the report, writes no doc")
    ap.add_argument("--models", default="abc", help="which of a, b, c to run (default abc)")
    ap.add_argument("--runs", type=int, default=3, help="runs per measurement on (a) and (b) (default 3)")
    ap.add_argument("--c-runs", type=int, default=1, help="runs per measurement on (c) (default 1)")
    ap.add_argument("--c-project", choices=("layer0", "all"), default="layer0",
                    help="on (c), project the linear weights of decoder layer 0 only (default) or of all layers")
    ap.add_argument("--c-steps", default="2", help="measured steps on (c), e.g. 2,5 (default 2)")
    ap.add_argument("--c8", action="store_true", help="also the flat-memory check on the 8-layer slice (writes three "
                                                      "3.5 GB models)")
    ap.add_argument("--threads", type=int, default=1, help="OpenMP threads of every measured process (default 1)")
    ap.add_argument("--startup-runs", type=int, default=5)
    ap.add_argument("--startup-only", action="store_true",
                    help="only the start-up rows (a few seconds each), into their own section of the doc")
    ap.add_argument("--before", default="HEAD", help="the revision the start-up rows compare this tree with")
    ap.add_argument("--step-methods", default=STEP_METHODS,
                    help=f"the methods whose step is timed beside OPCM's on (b) and (c) (default {STEP_METHODS})")
    ap.add_argument("--device", default="cpu",
                    help="where the data-free methods' `cmerge add` computes (cpu, cuda); with --methods-only, a "
                         "GPU run writes its own section of the doc")
    ap.add_argument("--methods-only", action="store_true",
                    help="only the methods' steps on the models of --models among b and c, into their own section")
    ap.add_argument("--no-candidates", action="store_true", help="skip the kernel candidates")
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--workdir", default=str(ROOT / ".cache" / "speed"))
    ap.add_argument("--doc", default=None, help=f"write the report into this file's speed section "
                                                f"(default: {DOC.relative_to(ROOT)} unless --quick)")
    ap.add_argument("--keep", action="store_true", help="keep the generated models")
    args = ap.parse_args()

    if args.quick:  # every code path once, on tiny shapes
        args.runs, args.c_runs, args.startup_runs = 1, 1, 1
        if args.models == "abc":
            args.models = "ac"
    bench = Bench(args)
    started = time.time()
    doc = Path(args.doc) if args.doc else (None if args.quick else DOC)
    command = "python benchmarks/speed.py " + " ".join(sys.argv[1:])
    if args.startup_only:
        text = startup_section(bench.startup(args.startup_runs, args.before), command.strip(), started)
        print("\n" + text)
        if doc is not None:
            write_doc(text, doc, STARTUP_BEGIN, STARTUP_END)
            print(f"\nwrote {doc}")
        shutil.rmtree(bench.work, ignore_errors=True)
        return
    if args.quick:
        specs = {"a": minilm(64, 256, 2, 1000), "b": vit_b32(96, 384, 2, 32, 64, 64),
                 "c": llama_slice(2, 128, 344, 1000, key="c2"), "c8": llama_slice(8, 128, 344, 1000, key="c8")}
    else:
        specs = {"a": minilm(), "b": vit_b32(), "c": llama_slice(2, key="c2"), "c8": llama_slice(8, key="c8")}
    no_project = r"layers\.(?!0\.)\d+\." if args.c_project == "layer0" else None
    methods_marks = METHODS_MARKS if args.device == "cpu" else METHODS_GPU_MARKS  # a GPU run: its own section

    def method_steps() -> str:
        rows = [r for r in args.step_methods.split(",") if r]
        parts = [bench.method_steps(specs[k], rows, args.runs if k == "b" else args.c_runs, 2,
                                    no_project if k == "c" else None,
                                    ", layer 0 projected" if k == "c" and no_project else "")
                 for k in "bc" if k in args.models]
        return methods_section(parts, command.strip(), started, device=args.device)

    if args.methods_only:
        text = method_steps()
        print("\n" + text)
        if doc is not None:
            write_doc(text, doc, *methods_marks)
            print(f"\nwrote {doc}")
        if not args.keep:
            shutil.rmtree(bench.work, ignore_errors=True)
        return
    left_out = ["the float64 reference approach for scale (earlier tables have it: 2.8× slower than the float32 "
                "reference)", "`average` in the I/O-bound rows (it reads and writes what task arithmetic does)"]
    if not args.c8 and "c" in args.models:
        left_out.append("the flat-memory check on c8 (`--c8`: three 3.5 GB models to write)")
    startup = bench.startup(args.startup_runs, args.before)
    add_key = next((k for k in startup["rows"] if k.startswith("cmerge add") and "after" in k), None)
    if add_key:
        STARTUP_ADD["wall"] = median(startup["rows"][add_key]["wall"])
    shapes = []
    for key in "abc":
        if key in args.models:
            spec = specs[key]
            for name, shape in spec.tensors:
                if len(shape) == 2 and name.endswith("weight") and "embed" not in name and not (
                        key == "c" and no_project and re.search(no_project, name)):
                    shapes.append(shape)
    rates = bench.rates(shapes)
    cands = None
    if not args.no_candidates:
        cand_shapes = sorted({s for s in shapes if s[0] * s[1] <= (1 << 22)})
        cands = bench.candidates(cand_shapes)
        if any(s[0] * s[1] > (1 << 22) for s in shapes):
            left_out.append("the kernel candidates on c2's shapes (each candidate is minutes there; c2's errors are "
                            "in the exactness table)")
    results: list[Result] = []
    for key in "ab":
        if key in args.models:
            res = bench.opcm(specs[key], args.runs, (2, 5), profile=True)
            for method in ("task_arithmetic",):
                bench.io_add(res, method, args.runs, None)
            results.append(res)
    if "c" in args.models:
        note = ", layer 0 projected" if no_project else ""
        exact = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight"]
        steps = tuple(int(s) for s in args.c_steps.split(","))
        res = bench.opcm(specs["c"], args.c_runs, steps, no_project, exact_projected=None if args.quick else exact,
                         note=note, profile=args.quick)
        bench.io_add(res, "task_arithmetic", args.c_runs, no_project)
        if args.c8:
            bench.flatness(res, specs["c8"], no_project)
        results.append(res)
    methods_text = method_steps()
    duration = time.time() - started
    raw = [{"key": r.spec.key, "title": r.spec.title, "params": r.spec.params, "runs": r.runs, "note": r.note,
            "steps": r.steps, "export": r.export, "io_adds": r.io_adds,
            "shapes": [[list(k), v] for k, v in r.shapes.items()], "bytes_read": r.bytes_read,
            "bytes_written": r.bytes_written,
            "flat": {k: (v.title if k == "spec" else v) for k, v in r.flat.items()}} for r in results]
    raw_path = bench.work.parent / ("speed-results-quick.json" if args.quick else "speed-results.json")
    raw_path.write_text(json.dumps({"results": raw, "rates": rates, "candidates": cands, "startup": startup,
                                    "loads": LOADS}, indent=1, default=str) + "\n")
    text = report(results, rates, cands, args, started, duration, left_out, command.strip())
    startup_text = startup_section(startup, command.strip(), started)
    print("\n" + text + "\n\n" + startup_text + "\n\n" + methods_text)
    if doc is not None:
        write_doc(text, doc)
        write_doc(startup_text, doc, STARTUP_BEGIN, STARTUP_END)
        write_doc(methods_text, doc, *methods_marks)
        print(f"\nwrote {doc}")
    if not args.keep:
        shutil.rmtree(bench.work, ignore_errors=True)


if __name__ == "__main__":
    main()
