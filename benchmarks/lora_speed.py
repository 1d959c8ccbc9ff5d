"""LoRA adapters merged with OPCM: the factored state against the dense one and the reference approach.

    python benchmarks/lora_speed.py            # LLaMA-7B shapes, writes its section of docs/benchmarks.md
    python benchmarks/lora_speed.py --quick    # small shapes, prints the report only

A stack of LLaMA-7B-shaped decoder layers (hidden 4096, MLP 11008, vocabulary 32000, base
stored in float16; see speed_models.py) and ``--adapters`` PEFT LoRA adapters of rank
``--rank`` on q_proj and v_proj (random factors, B nonzero, lora_alpha = 2r), written as
PEFT folders. Every measurement is a fresh process: wall time to exit and its own peak RSS.

- *factored*: ``cmerge add STATE ADAPTER`` for every adapter (OPCM keeps the adapted
  weights as factors; the untouched ones cost nothing), the state's size after each step;
- *dense*: the same step with the adapter merged into a full model first (the expert a
  user without LoRA support would pass), through cmerge's dense path;
- *reference*: the reference approach for the same step — the adapter merged into a full
  model (θ0 + s·B·A written as a checkpoint), then the paper's arithmetic on full models
  (``speed_reference.py approach``: three models in memory, full SVDs);
- *exactness*: the factored result after every adapter against cmerge's dense path in
  float64 on a quarter-size stack (the dense float64 path follows the same rule for a
  rank-deficient merged task vector), largest relative difference over tensors.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from speed import DOC, REFERENCE, cmerge_exe, machine, median, run, write_doc  # noqa: E402
from speed_models import ModelSpec, llama_slice, load_model, write_model  # noqa: E402

BEGIN, END = "<!-- lora-speed:begin -->", "<!-- lora-speed:end -->"
TARGETS = ("q_proj", "v_proj")
GOAL_SPEED, GOAL_SIZE, GOAL_EXACT = 20.0, 50.0, 1e-5


def adapter_factors(spec: ModelSpec, t: int, rank: int) -> dict[str, torch.Tensor]:
    """The PEFT tensors of adapter t: lora_A (r × in) and lora_B (out × r) for every targeted weight."""
    g = torch.Generator().manual_seed(7919 * t)
    out = {}
    for name, shape in spec.tensors:
        if name.endswith(tuple(f"{m}.weight" for m in TARGETS)):
            module = name.removesuffix(".weight")
            out[f"base_model.model.{module}.lora_A.weight"] = torch.randn(rank, shape[1], generator=g) / shape[1] ** 0.5
            out[f"base_model.model.{module}.lora_B.weight"] = torch.randn(shape[0], rank, generator=g) * 2e-3
    return out


def write_adapter(spec: ModelSpec, folder: Path, t: int, rank: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(adapter_factors(spec, t, rank), str(folder / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(TARGETS),
              "base_model_name_or_path": None, "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
              "bias": "none"}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def write_full_expert(spec: ModelSpec, base_dir: Path, folder: Path, t: int, rank: int,
                      dtype: torch.dtype = torch.float32) -> Path:
    """The adapter merged into a full model, θ0 + s·B·A on the targeted weights, stored in ``dtype`` (float64
    keeps its task vector exactly low rank, for the exactness check)."""
    factors = adapter_factors(spec, t, rank)
    folder.mkdir(parents=True, exist_ok=True)
    for shard in sorted(base_dir.glob("*.safetensors")):
        tensors = {}
        for name, w in load_file(str(shard)).items():
            w = w.to(dtype)
            module = f"base_model.model.{name.removesuffix('.weight')}"
            if f"{module}.lora_A.weight" in factors:
                w += 2.0 * factors[f"{module}.lora_B.weight"].to(dtype) @ factors[f"{module}.lora_A.weight"].to(dtype)
            tensors[name] = w
        save_file(tensors, str(folder / shard.name), metadata={"format": "pt"})
    shutil.copy2(base_dir / "model.safetensors.index.json", folder / "model.safetensors.index.json")
    return folder


def state_bytes(state: Path) -> int:
    gen = json.loads((state / "manifest.json").read_text())["generation"]
    return (state / gen / "accumulators.safetensors").stat().st_size


def max_rel_diff(a: Path, b: Path) -> float:
    x, y = load_model(a, torch.float64), load_model(b, torch.float64)
    worst = 0.0
    for name in x:
        diff = float((x[name] - y[name]).norm())
        scale = float(y[name].norm())
        worst = max(worst, diff / scale if scale > 0 else diff)
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--exact-hidden", type=int, default=1024, help="hidden size of the exactness stack")
    ap.add_argument("--quick", action="store_true", help="small shapes; print the report, do not write the doc")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/cmerge-lora-bench"))
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    started = time.time()
    env = dict(os.environ, GOMP_SPINCOUNT="10000", HF_HUB_OFFLINE="1")
    work = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    if args.quick:
        spec = llama_slice(1, hidden=256, mlp=688, vocab=1000)
        exact_spec = llama_slice(1, hidden=128, mlp=344, vocab=500, key="e")
    else:
        spec = llama_slice(args.layers)
        h = args.exact_hidden
        exact_spec = llama_slice(args.layers, hidden=h, mlp=int(h * 11008 / 4096), key="e")
    cm = cmerge_exe()
    print(f"writing models under {work}", flush=True)
    base = write_model(spec, work / "base", 0)
    adapters = [write_adapter(spec, work / f"adapter{t}", t, args.rank) for t in range(1, args.adapters + 1)]

    # factored: every adapter
    st = work / "factored"
    run(cm + ["init", st, "--base", base, "-q"], env)
    factored, sizes = [], []
    for t, a in enumerate(adapters, 1):
        r = run(cm + ["add", st, a, "-q"], env)
        factored.append(r)
        sizes.append(state_bytes(st))
        print(f"factored step {t}: {r.wall:.2f} s, {r.rss_mb:.0f} MB, state {sizes[-1] / 1e6:.1f} MB", flush=True)

    # dense and reference: step 2 (the adapters merged into full models first)
    full = [write_full_expert(spec, base, work / f"full{t}", t, args.rank) for t in (1, 2)]
    dense_st = work / "dense"
    run(cm + ["init", dense_st, "--base", base, "-q"], env)
    run(cm + ["add", dense_st, full[0], "-q"], env)
    t0 = time.perf_counter()
    merged_into = write_full_expert(spec, base, work / "full2-again", 2, args.rank)  # the merge-first cost
    merge_first_s = time.perf_counter() - t0
    shutil.rmtree(merged_into)
    dense = run(cm + ["add", dense_st, full[1], "-q"], env)
    dense_size = state_bytes(dense_st)
    print(f"dense step 2: {dense.wall:.1f} s (+ {merge_first_s:.1f} s to merge the adapter into a full model)",
          flush=True)
    projected = [n for n, _ in spec.tensors if n.endswith("_proj.weight")]
    (work / "projected.json").write_text(json.dumps(projected))
    ref = run([sys.executable, str(REFERENCE), "approach", "--base", str(base), "--merged", str(full[0]),
               "--model", str(full[1]), "--projected", str(work / "projected.json"), "--t", "2", "--alpha", "0.5",
               "--lam", "1", "--norm-sum", "0"], env)
    ref_s = ref.wall + merge_first_s
    print(f"reference step 2: {ref.wall:.1f} s + {merge_first_s:.1f} s", flush=True)
    for f in full:
        shutil.rmtree(f)

    # exactness: factored against dense float64 on a smaller stack, every step
    ebase = write_model(exact_spec, work / "ebase", 0)
    fa, de = work / "ex-factored", work / "ex-dense"
    run(cm + ["init", fa, "--base", ebase, "--precision", "float64", "-q"], env)
    run(cm + ["init", de, "--base", ebase, "--precision", "float64", "-q"], env)
    worst = 0.0
    for t in range(1, args.adapters + 1):
        a = write_adapter(exact_spec, work / f"eadapter{t}", t, args.rank)
        f = write_full_expert(exact_spec, ebase, work / f"efull{t}", t, args.rank, torch.float64)
        run(cm + ["add", fa, a, "-q"], env)
        run(cm + ["add", de, f, "-q"], env)
        shutil.rmtree(f)
    for s, out in ((fa, work / "ex-f-out"), (de, work / "ex-d-out")):
        run(cm + ["export", s, out, "--dtype", "float64", "-q"], env)
    worst = max_rel_diff(work / "ex-f-out", work / "ex-d-out")
    print(f"exactness: {worst:.2e}", flush=True)

    steps = [r.wall for r in factored[1:]]
    speedup = ref_s / factored[1].wall
    size_ratio = dense_size / sizes[-1]
    lines = [
        "## LoRA adapters: the factored state (`benchmarks/lora_speed.py`)", "",
        f"Command: `python benchmarks/lora_speed.py{' --quick' if args.quick else ''}` — "
        f"{dt.datetime.now():%Y-%m-%d %H:%M}, {(time.time() - started) / 60:.0f} min in all.  ",
        f"Machine: {machine()}.  ",
        f"Models: {spec.title} in {str(spec.dtype).removeprefix('torch.')}; {args.adapters} PEFT adapters of rank "
        f"{args.rank} on {', '.join(TARGETS)} (lora_alpha = 2r). OPCM, α = 0.5, float32. Every number is one fresh "
        f"process (wall time to exit, its peak RSS).", "",
        "| | step 2 s | steps 2–%d median s | peak RSS MB | state after %d adapters MB |" % (args.adapters,
                                                                                           args.adapters),
        "|---|---|---|---|---|",
        f"| cmerge, adapter in (factored state) | {factored[1].wall:.2f} | {median(steps):.2f} | "
        f"{max(r.rss_mb for r in factored):.0f} | {sizes[-1] / 1e6:.1f} |",
        f"| cmerge, adapter merged into a full model first (dense state) | {dense.wall + merge_first_s:.1f} "
        f"({merge_first_s:.1f} merging) | – | {dense.rss_mb:.0f} | {dense_size / 1e6:.0f} (any step) |",
        f"| reference approach (merge into a full model, then the paper's arithmetic) | {ref_s:.1f} "
        f"({merge_first_s:.1f} merging) | – | {ref.rss_mb:.0f} | – (keeps whole models) |", "",
        "State size after each adapter (MB): " + ", ".join(f"{s / 1e6:.1f}" for s in sizes) + ".", "",
        f"- {'PASS' if speedup >= GOAL_SPEED else 'FAIL'} speed: a factored step is {speedup:.0f}× faster than the "
        f"reference approach's step 2 (target ≥ {GOAL_SPEED:.0f}×); {ref_s / median(steps):.0f}× against the median "
        f"factored step.",
        f"- {'PASS' if size_ratio >= GOAL_SIZE else 'FAIL'} size: the factored state after {args.adapters} adapters is "
        f"{size_ratio:.0f}× smaller than the dense state (target ≥ {GOAL_SIZE:.0f}×).",
        f"- {'PASS' if worst <= GOAL_EXACT else 'FAIL'} exactness: after {args.adapters} adapters the factored "
        f"result differs from the dense float64 path by {worst:.1e} at most, relative per tensor (target ≤ "
        f"{GOAL_EXACT:g}; measured on {exact_spec.title}, both in float64).",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.quick:
        write_doc(text, DOC, BEGIN, END)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
