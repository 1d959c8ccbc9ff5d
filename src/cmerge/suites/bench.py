"""The text-suite benchmark: experts → continual merging over shuffled orders → results and report.

One run: load the suite's tasks (8 or 14), fine-tune or reuse the cached experts (only when
the reference rows, a sweep or a merging row needs them: a run that only adds continual
fine-tuning to a folder holding its reference rows trains none), score the reference rows
(pre-trained zero-shot, each expert on its own task), run every requested method over the
same shuffled task orders with :mod:`cmerge.evaluation.runner`, optionally add the continual
fine-tuning baseline, and write ``results.json`` plus the evaluation package's report
(tables, CSVs, figures).

``results.json`` is rewritten after every order of every row, and a run pointed at a folder
that already holds results over the same tasks, orders and recipe keeps every order each row
finished, so an interrupted run continues where it stopped (at the order it was running). A
run over more orders than the folder's extends it: each row runs only the orders it lacks. A
folder holding another benchmark's results is refused, never overwritten.

Several runs may work on the same folder at once: each sweep and each order of each row is
claimed with a lock (``.locks/``), a run skips what another holds and comes back to it at
the end, and every update of ``results.json`` re-reads it under a file lock and adds only
its own orders. Starting the same command twice therefore splits the work between two
processes, even a single row's orders (an order that finishes before an earlier one of its
row waits in ``.orders/`` until it can be appended: :mod:`row_orders`).
A run first takes the free sweeps and the rows no sweep decides, and only then waits for
the sweeps another run holds, so neither run idles while the other finishes a sweep.

A row is named on the command line as ``NAME`` or ``NAME:key=value:key=value``
(``opcm:alpha=0.8``): the keys are the method's registry parameters (parsed with the
declared types) plus two suite keys, ``experts=standard|linear`` (the linearised
experts, fine-tuned in tangent space, holistic CMM "pre-merging") and
``align=off|ridge|adam`` (post-merge representation alignment, :mod:`align`).

Sweeps (``method:param`` with an optional ``=v1/v2/...`` grid; the papers' grids by
default) run on the first ``sweep_orders`` orders and are scored on the tasks'
**validation** split, only the entries ACC and BWT need; a row that does not set the
swept parameter then takes the sweep's best value (the paper's way of choosing λ). Rows
are scored on the **test** split, and every entry of ``results.json`` says which split it
was scored on. Without a sweep, task arithmetic and TIES take the paper's λ for the suite
size (0.3 for 8 tasks, 0.1 for more; OPCM paper Appendix C.1.1).

At the end every row is compared with a reference row (``paired_reference``, OPCM by
default) order by order: ``results["paired"]`` (evaluation/results.py) and the report.

Continual fine-tuning (``continual_ft_orders``) caches each order, and inside an order
each finished task, so it resumes where it stopped and several runs split its orders
(continual_ft.py); asking for more orders than a folder's row has recomputes the row
from the cache.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

from cmerge.engine import device_fields, resolve_device
from cmerge.errors import CmergeError
from cmerge.evaluation.orders import shuffled_orders
from cmerge.evaluation.report import write_report
from cmerge.evaluation.results import (
    add_method, add_sweep, extend_entry, load_results, new_results, refresh_summaries, save_results,
)
from cmerge.evaluation.runner import materialize, run_method, score
from cmerge.evaluation.sweep import check_param, run_sweep
from cmerge.fsutil import atomic_write_json
from cmerge.methods import REGISTRY, get_method_class
from cmerge.suites.align import MODES as ALIGN_MODES, FinalNormAligner
from cmerge.suites.claims import claim_each
from cmerge.suites.backbone import base_fingerprint, load_backbone
from cmerge.suites.continual_ft import METHOD_NAME as CONTINUAL_FT, continual_finetuning_entry
from cmerge.suites.experts import build_experts, expert_folders, task_fingerprint
from cmerge.suites.finetune import FinetuneRecipe
from cmerge.suites.row_orders import claim_orders, record_order
from cmerge.suites.sources import packages
from cmerge.suites.text import TextSuiteEvaluator
from cmerge.suites.text_data import (
    DATA_RECIPE_VERSION, SETUP_HINT, SPLITS, TASKS_8, TASKS_14, TextTask, cache_root, load_task, missing_sources,
    task_cache_path,
)

log = logging.getLogger(__name__)

SUITES = {8: TASKS_8, 14: TASKS_14}
RESULTS_FILE = "results.json"
PAPER_LAMBDA = {8: 0.3, 14: 0.1}  # continual task arithmetic / TIES, OPCM paper C.1.1
EXPERT_SETS = ("standard", "linear")
GRID_01 = tuple(round(0.1 * i, 1) for i in range(1, 11))
DEFAULT_GRIDS = {("task_arithmetic", "lam"): GRID_01, ("ties", "lam"): GRID_01, ("opcm", "alpha"): GRID_01,
                 ("iso", "scale"): (1.0, 1.4, 1.8, 2.2, 2.6)}
SWEEP_ROWS = "diagonal+final"
ROW_SPLIT, SWEEP_SPLIT = "test", "validation"


@dataclass(frozen=True)
class MethodSpec:
    """One row of the benchmark: a registry method, its parameters, which experts, which alignment."""

    label: str
    method: str
    params: dict[str, Any] = field(default_factory=dict)
    experts: str = "standard"
    align: str = "off"


@dataclass(frozen=True)
class SweepSpec:
    """A grid over one registry parameter of one method, or of one row (``row``: its label, with the row's
    other parameters ``fixed``); a row takes its own sweep's best value before its method's."""

    method: str
    param: str
    values: tuple[Any, ...]
    row: str = ""
    fixed: tuple[tuple[str, Any], ...] = ()

    @property
    def name(self) -> str:
        return f"{self.row or self.method}.{self.param}"

    def decides(self, spec: MethodSpec) -> bool:
        """Whether this sweep chooses one of ``spec``'s parameters."""
        return self.param not in spec.params and (self.row == spec.label if self.row else self.method == spec.method)


def _parse_value(method: str, name: str, text: str) -> Any:
    """One ``name=text`` of a row or sweep, parsed by the method's own declaration."""
    return get_method_class(method).parse_params({name: text})[name]


def parse_method_specs(text: str) -> list[MethodSpec]:
    """``"opcm,average,task_arithmetic:lam=0.2"`` → method specs, checked against the registry."""
    specs = []
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        method, *assignments = item.split(":")
        get_method_class(method)
        params, suite_keys = {}, {"experts": "standard", "align": "off"}
        for a in assignments:
            name, eq, value = a.partition("=")
            if not eq:
                raise CmergeError(f"--methods entry {item!r}: write parameters as name=value, got {a!r}.")
            if name in suite_keys:
                allowed = EXPERT_SETS if name == "experts" else ALIGN_MODES
                if value not in allowed:
                    raise CmergeError(f"--methods entry {item!r}: {name} must be one of {', '.join(allowed)}.")
                suite_keys[name] = value
            else:
                params[name] = _parse_value(method, name, value)
        specs.append(MethodSpec(item, method, params, **suite_keys))
    labels = [s.label for s in specs]
    if not specs or len(set(labels)) < len(labels):
        raise CmergeError("--methods must name at least one method, each at most once.")
    return specs


def parse_sweep_specs(items: Sequence[str]) -> list[SweepSpec]:
    """``["task_arithmetic:lam", "opcm:alpha=0.3/0.5/0.7", "iso:accumulate=opcm:scale"]`` → sweeps (default grids
    from the papers). The last ``:`` item is the swept parameter; what comes before it is a method, or a row
    with parameters of its own (the sweep then runs with them and decides only that row)."""
    specs = []
    for item in items:
        row, colon, last = item.rpartition(":")
        param, eq, grid = last.partition("=")
        if not colon or not row or not param:
            raise CmergeError(f"--sweep {item!r}: write METHOD:PARAM, METHOD:PARAM=v1/v2/... or "
                              f"METHOD:key=value:PARAM=v1/v2/...")
        spec = parse_method_specs(row)[0]
        method = spec.method
        if (spec.experts, spec.align) != ("standard", "off"):
            raise CmergeError(f"--sweep {item!r}: a sweep runs on the standard experts without alignment; "
                              f"name only method parameters before the swept one.")
        if param in spec.params:
            raise CmergeError(f"--sweep {item!r}: {param} is both fixed and swept.")
        check_param(method, param)
        if eq:
            values = tuple(_parse_value(method, param, v) for v in grid.split("/") if v)
        elif (method, param) in DEFAULT_GRIDS:
            values = DEFAULT_GRIDS[method, param]
        else:
            raise CmergeError(f"--sweep {item!r}: there is no default grid for {method}.{param}; give one "
                              f"as {method}:{param}=v1/v2/...")
        if not values:
            raise CmergeError(f"--sweep {item!r}: the grid is empty.")
        specs.append(SweepSpec(method, param, values, row if spec.params else "", tuple(spec.params.items())))
    if len({s.name for s in specs}) < len(specs):
        raise CmergeError("--sweep names the same method parameter twice.")
    return specs


def resolve_params(spec: MethodSpec, sweeps: Mapping[str, dict], n_tasks: int) -> tuple[dict[str, Any], dict[str, str]]:
    """A row's parameters: as given, else a sweep's best value, else the paper's λ; and where each came from."""
    params, chosen = dict(spec.params), {}
    for p in REGISTRY[spec.method].params:
        if p.name in params:
            continue
        key = next((k for k in (f"{spec.label}.{p.name}", f"{spec.method}.{p.name}") if k in sweeps), None)
        if key is not None:
            sweep = sweeps[key]
            params[p.name] = sweep["best"]["value"]
            split = sweep.get("split")
            chosen[p.name] = f"best of sweep {key}" + (f" on the {split} split" if split else "")
        elif p.name == "lam":
            params["lam"] = PAPER_LAMBDA[8] if n_tasks <= 8 else PAPER_LAMBDA[14]
            chosen["lam"] = "the paper's value for the suite size"
    return params, chosen


def row_params(spec: MethodSpec, sweeps: Mapping[str, dict], n_tasks: int,
               recorded: dict | None = None) -> tuple[dict[str, Any], dict[str, str]]:
    """:func:`resolve_params`, except that a row already run on some orders (``recorded``) goes on with the
    values it ran with: a sweep added or rerun since then decides only new rows, so one row is one setting."""
    params, chosen = resolve_params(spec, sweeps, n_tasks)
    if recorded is None:
        return params, chosen
    kept = dict(recorded.get("chosen") or {})
    old = {name: recorded["params"][name] for name in kept}
    now = {name: params.pop(name) for name in chosen}
    if now != old:
        log.warning("%s: extended with %s, the values of its recorded orders (the sweeps now give %s)",
                    spec.label, old or "the defaults", now or "the defaults")
    return {**params, **old}, kept


@contextmanager
def results_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on the results document ``path`` (released when the block ends)."""
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@contextmanager
def locked_results(path: Path) -> Iterator[dict]:
    """The results document on disk, re-read under the lock and written back atomically on exit."""
    with results_lock(path):
        results = load_results(path)
        yield results
        save_results(results, path)


def resumable(path: Path, tasks: Sequence[str], orders: list[list[str]], suite: dict) -> dict | None:
    """The finished part of an earlier run in the same folder, or None where the folder holds no results.

    An earlier run of the same benchmark over fewer orders (the first of ``orders``; the
    orders are drawn one after another, so they are) is taken over: the document now names
    every order, and :func:`pending_orders` tells each row the orders it has still to run.
    Results of another benchmark (other tasks, recipe or orders, or more orders than asked
    for) are never overwritten: a CmergeError says so and the folder is left as it is.
    Called under :func:`results_lock`.
    """
    if not path.is_file():
        return None
    try:
        old = load_results(path)
    except (CmergeError, ValueError, OSError) as err:
        raise CmergeError(f"{path} cannot be read ({err}); move it away to start a new run in {path.parent}.") from err
    done = old.get("orders") or []
    if old.get("tasks") != list(tasks) or old.get("suite") != suite or done != orders[:len(done)]:
        what = ("more orders than asked for" if orders == done[:len(orders)] and old.get("tasks") == list(tasks)
                and old.get("suite") == suite else "another benchmark (other tasks, recipe or orders)")
        raise CmergeError(f"{path.parent} holds the results of {what}; use another output folder, or move "
                          f"{path.name} away to start again.")
    if len(done) < len(orders):
        log.info("%s: extending a run over %d order(s) to %d", path, len(done), len(orders))
        old["orders"] = [list(o) for o in orders]
        save_results(old, path)
    return old


def pending_orders(entry: dict | None, orders: Sequence[Sequence[str]]) -> list[list[str]]:
    """The orders a row has still to run: all of them, or those after the ones its entry holds."""
    done = [] if entry is None else entry["orders"]
    if done != [list(o) for o in orders[:len(done)]]:
        raise CmergeError("a row of this folder ran other task orders than the folder names; move results.json away "
                          "to start again.")
    return [list(o) for o in orders[len(done):]]


def first_pending(results: dict, label: str) -> int:
    """The index of the first order row ``label`` lacks (a CmergeError where its orders are not the folder's)."""
    return len(results["orders"]) - len(pending_orders(results["methods"].get(label), results["orders"]))


def record_row_order(path: Path, label: str, index: int, entry: dict) -> dict:
    """:func:`row_orders.record_order` under the results lock; the waiting orders it recorded are deleted
    once the document is saved. Returns the document as written."""
    with locked_results(path) as results:
        used = record_order(results, path.parent, label, index, entry)
    for waiting in used:
        waiting.unlink(missing_ok=True)
    return results


def load_suite(n_tasks: int) -> dict[str, TextTask]:
    """The 8- or 14-task text suite, by name, or a CmergeError naming the packages to install.
    A task already in the cache needs no package."""
    if n_tasks not in SUITES:
        raise CmergeError(f"the text suite has {' or '.join(map(str, SUITES))} tasks, not {n_tasks}.")
    missing = missing_sources([name for name in SUITES[n_tasks] if not task_cache_path(name).is_file()])
    if missing:
        raise CmergeError(f"the {n_tasks}-task text suite lacks the Debian package(s) {', '.join(missing)}; run "
                          f"{SETUP_HINT} as root, which installs every package the suite reads "
                          f"({', '.join(packages.ALL)}).")
    return {name: load_task(name) for name in SUITES[n_tasks]}


def run_text_bench(
    out_dir: str | Path, tasks: Mapping[str, TextTask], *, methods: str | None = None, n_orders: int = 10,
    seed: int = 0, recipe: FinetuneRecipe | None = None, continual_ft_orders: int = 0,
    sweeps: Sequence[str] = (), sweep_orders: int = 1, align_samples: int = 128,
    backbone_folder: Path | None = None, cache_dir: Path | None = None, progress: bool = True,
    workers: int = 1, paired_reference: str | None = None, rows: str = "all", device: str = "cpu",
) -> dict:
    """Run the benchmark over ``tasks`` into ``out_dir`` and return the results document.

    ``methods`` defaults to every registered method with its defaults (``"none"``: no
    merging rows, e.g. for a run that only adds continual fine-tuning); ``sweeps`` and
    row syntax are described in the module docstring; ``backbone_folder`` defaults to
    the packaged all-MiniLM-L6-v2; ``cache_dir`` is the cache root of the experts, the
    reference scores and the continual fine-tuning matrices; ``workers`` is how many
    tasks an evaluation scores side by side (text.TextSuiteEvaluator; same results);
    ``paired_reference`` the row every other one is compared with (default ``opcm``);
    ``rows="diagonal+final"`` scores, in every merging row, only what ACC and BWT need
    (runner.run_order; the same ACC and BWT, no accuracy curves), as ``--demo`` does.
    ``device`` (cpu, cuda or auto) is where fine-tuning and scoring run; the merges stay on
    the CPU. A row computed elsewhere records it (``entry["device"]``).
    """
    if not 0 <= continual_ft_orders <= n_orders:
        raise CmergeError(f"--continual-ft-orders must be between 0 and --orders ({n_orders}), got {continual_ft_orders}.")
    if not 1 <= sweep_orders <= n_orders:
        raise CmergeError(f"--sweep-orders must be between 1 and --orders ({n_orders}), got {sweep_orders}.")
    task_names = list(tasks)
    specs = [] if methods == "none" else parse_method_specs(methods or ",".join(REGISTRY))
    sweep_specs = parse_sweep_specs(sweeps)
    recipe = recipe or FinetuneRecipe()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results_path = out_dir / RESULTS_FILE

    torch_device = resolve_device(device)
    where = device_fields(torch_device)
    backbone, tokenizer, base_folder = load_backbone(backbone_folder)
    recipes = {"standard": recipe, "linear": replace(recipe, linearized=True)}
    expert_sets: dict[str, dict[str, Path]] = {}

    def experts_of(kind: str) -> dict[str, Path]:  # trained or loaded on first use: a run that only
        if kind not in expert_sets:                # adds continual fine-tuning to a folder needs none
            expert_sets[kind] = build_experts(backbone, tokenizer, base_folder, tasks.values(), recipes[kind],
                                              cache_dir=cache_dir, progress=progress, device=torch_device)
        return expert_sets[kind]

    evaluators: dict[str, TextSuiteEvaluator] = {}

    def evaluator(split: str) -> TextSuiteEvaluator:  # built on first use: tokenising a split takes a while
        if split not in evaluators:
            evaluators[split] = TextSuiteEvaluator(backbone, tokenizer, tasks, split=split, max_len=recipe.max_len,
                                                   logit_scale=recipe.logit_scale, workers=workers,
                                                   device=torch_device)
        return evaluators[split]

    orders = shuffled_orders(task_names, n_orders, seed)
    suite = {"name": "text", "data_recipe_version": DATA_RECIPE_VERSION, "backbone": base_fingerprint(base_folder),
             "recipe": recipe.to_dict(), "experts": {name: path.name for name, path in
                         expert_folders(base_folder, tasks.values(), recipe, cache_dir=cache_dir).items()},
             "splits": {name: {split: len(task.split(split)) for split in SPLITS} for name, task in tasks.items()},
             "rows_scored": rows}

    with results_lock(results_path):  # one process scores the references
        results = resumable(results_path, task_names, orders, suite)
        if results is None:
            reference = reference_scores(base_folder, experts_of("standard"), tasks, evaluator(ROW_SPLIT), cache_dir)
            results = new_results(task_names, reference, seed=seed, suite=suite, orders=orders,
                                  reference_split=ROW_SPLIT)
            save_results(results, results_path)
    if any(spec.experts == "linear" for spec in specs) and "finetuned_linear" not in results["reference"]:
        linear = reference_scores(base_folder, experts_of("linear"), tasks, evaluator(ROW_SPLIT), cache_dir,
                                  pretrained=False)["finetuned"]
        results = _update(results_path, lambda r: r["reference"].setdefault("finetuned_linear", linear))

    by_name = {sweep.name: sweep for sweep in sweep_specs}
    by_label = {spec.label: spec for spec in specs}
    post_steps: dict[str, FinalNormAligner] = {}
    independent = [label for label, spec in by_label.items() if not _needs_sweep(spec, sweep_specs)]
    # First what no other run holds: the free sweeps, then the rows no sweep decides; then,
    # waiting, the sweeps other runs hold, and every row left.
    for wait in (False, True):
        for name in claim_in(out_dir, "sweep", list(by_name), wait=wait):
            if name in load_results(results_path).get("sweeps", {}):
                log.info("sweep %s: done already (an earlier or concurrent run)", name)
                continue
            sweep = by_name[name]
            entry = run_sweep(sweep.method, sweep.param, list(sweep.values), base_folder, experts_of("standard"),
                              evaluator(SWEEP_SPLIT), dict(sweep.fixed), orders=orders[:sweep_orders],
                              progress=progress, rows=SWEEP_ROWS)
            entry["split"] = SWEEP_SPLIT
            for value_entry in entry["entries"]:
                value_entry["split"] = SWEEP_SPLIT
            log.info("sweep %s: best %s (ACC %.1f on %s)", name, entry["best"]["value"], entry["best"]["acc_mean"],
                     SWEEP_SPLIT)
            results = record(results_path, "sweeps", name, entry)
        labels = independent if not wait else list(by_label)
        for label, index in claim_orders(out_dir, results_path, labels, first_pending, wait=wait):
            results = load_results(results_path)
            spec = by_label[label]
            params, chosen = row_params(spec, results.get("sweeps", {}), len(task_names), results["methods"].get(label))
            if label not in post_steps and spec.align != "off":
                post_steps[label] = FinalNormAligner(backbone, tokenizer, tasks, mode=spec.align,
                                                     samples=align_samples, max_len=recipe.max_len)
            post_step = post_steps.get(label)
            entry = run_method(spec.method, params, base_folder, experts_of(spec.experts), evaluator(ROW_SPLIT),
                               [orders[index]], progress=progress, post_step=post_step, rows=rows,
                               desc=f"{label} ({index + 1}/{len(orders)})")
            entry["experts"] = spec.experts
            entry["split"] = ROW_SPLIT
            entry.update(where)
            if post_step is not None:
                entry["alignment"] = post_step.params
            if chosen:
                entry["chosen"] = chosen
            results = record_row_order(results_path, label, index, entry)

    if continual_ft_orders:
        existing = load_results(results_path)["methods"].get(CONTINUAL_FT)
        if existing is None or len(existing["orders"]) < continual_ft_orders:
            entry = continual_finetuning_entry(backbone, tokenizer, base_folder, tasks, orders[:continual_ft_orders],
                                               recipe, evaluator(ROW_SPLIT), cache_dir=cache_dir, progress=progress,
                                               device=torch_device)
            entry["split"] = ROW_SPLIT
            entry.update(where)
            results = record(results_path, "methods", CONTINUAL_FT, entry, replace_fewer_orders=True)
    spent = [e for e in evaluators.values() if e.task_evaluations]
    if spent:
        results = _update(results_path, lambda r: add_timing(r, sum(e.task_evaluations for e in spent),
                                                              sum(e.seconds for e in spent)))
    results = _update(results_path, lambda r: _refresh_paired(r, paired_reference))
    write_report(results, out_dir, title=f"Continual merging on the {len(task_names)}-task text suite")
    return results


def reference_scores(
    base_folder: Path, experts: Mapping[str, Path], tasks: Mapping[str, TextTask], evaluator: TextSuiteEvaluator,
    cache_dir: Path | None = None, *, pretrained: bool = True,
) -> dict[str, dict[str, float]]:
    """The reference rows (``runner.evaluate_reference``'s numbers): the pre-trained model on every
    task, each expert on its own task, in percent.

    Each score is a pure function of the weights, the task's split and the evaluator's
    settings, so it is cached on disk (``<cache>/text-scores/``), keyed by the backbone's
    fingerprint or the expert's folder name (which holds the expert's key), the task's
    fingerprint, the split, the settings and the torch version. Every run into a new
    folder (``make demo`` among them) then skips these 2 × T evaluations.
    """
    folder = (Path(cache_dir) if cache_dir is not None else cache_root()) / "text-scores"
    settings = [evaluator.split, evaluator.max_len, evaluator.batch_size, evaluator.logit_scale, torch.__version__]

    def path(model_id: str, task: str) -> Path:
        payload = json.dumps([model_id, task_fingerprint(tasks[task]), *settings])
        return folder / f"{task}-{hashlib.sha256(payload.encode()).hexdigest()[:16]}.json"

    def scored(model_id: str, load: Callable[[], Mapping], names: Sequence[str]) -> dict[str, float]:
        cached = {t: _read_score(path(model_id, t)) for t in names}
        todo = [t for t in names if cached[t] is None]
        if todo:
            accs, _ = score(evaluator, load(), todo)
            for t, acc in zip(todo, accs):
                cached[t] = acc
                _write_score(path(model_id, t), acc)
        return {t: cached[t] for t in names}

    out: dict[str, dict[str, float]] = {}
    if pretrained:
        out["pretrained"] = scored(base_fingerprint(base_folder), lambda: materialize(base_folder, "the base model"),
                                   list(experts))
    out["finetuned"] = {t: scored(Path(p).name, lambda p=p, t=t: materialize(p, f"expert {t!r}"), [t])[t]
                        for t, p in experts.items()}
    return out


def _read_score(path: Path) -> float | None:
    try:
        return float(json.loads(path.read_text())["accuracy_percent"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_score(path: Path, accuracy_percent: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, {"accuracy_percent": accuracy_percent})


def record(path: Path, kind: str, name: str, entry: dict, *, replace_fewer_orders: bool = False) -> dict:
    """Add a row (``kind="methods"``) or a sweep (``"sweeps"``) to the results on disk, under the lock.

    A row the document holds over fewer orders, whose orders ``entry``'s continue (as
    :func:`pending_orders` gave them), is extended by ``entry``
    (:func:`~cmerge.evaluation.results.extend_entry`). Otherwise a name another run into
    the same folder finished first is kept, unless ``replace_fewer_orders`` and the kept row
    ran on fewer orders than ``entry``. Returns the document as written.
    """
    if kind not in ("methods", "sweeps"):
        raise ValueError(f"kind must be 'methods' or 'sweeps', got {kind!r}")

    def add(results: dict) -> None:
        old = results.get(kind, {}).get(name)
        if old is not None and replace_fewer_orders and len(old["orders"]) < len(entry["orders"]):
            del results[kind][name]
            old = None
        n = len(old["orders"]) if kind == "methods" and old is not None else 0
        if n and results.get("orders", [])[n:n + len(entry["orders"])] == entry["orders"]:
            results[kind][name] = extend_entry(old, entry)
        elif old is not None:
            log.info("%s: another run into this folder finished it first; keeping that one", name)
        elif kind == "methods":
            add_method(results, name, entry)
        else:
            add_sweep(results, entry, name)

    return _update(path, add)


def _refresh_paired(results: dict, reference: str | None) -> None:
    """The paired comparisons of the rows so far; a named reference that is not (yet) a row is kept for later."""
    if reference is not None and reference not in results["methods"]:
        results["paired"] = {"reference": reference, "rows": {}}
        return
    refresh_summaries(results, reference)


def _needs_sweep(spec: MethodSpec, sweeps: Sequence[SweepSpec]) -> bool:
    """Whether a sweep chooses one of the row's parameters (the row must wait for it)."""
    return any(s.decides(spec) for s in sweeps)


def claim_in(out_dir: Path, kind: str, names: Sequence[str], wait: bool = True) -> Iterator[str]:
    """:func:`claims.claim_each` over rows or sweeps, with their locks in ``out_dir/.locks``."""
    folder = out_dir / ".locks"
    folder.mkdir(exist_ok=True)
    return claim_each(names, lambda name: folder / f"{kind}-{hashlib.sha256(name.encode()).hexdigest()[:16]}.lock",
                      wait=wait)


def add_timing(results: dict, evaluations: int, seconds: float) -> None:
    """Add one run's evaluation count and time to the folder's totals."""
    t = results.get("timing") or {}
    n = int(t.get("task_evaluations", 0))
    total = n * float(t.get("seconds_per_task_evaluation", 0.0)) + seconds
    results["timing"] = {"task_evaluations": n + evaluations,
                         "seconds_per_task_evaluation": total / max(1, n + evaluations)}


def _update(path: Path, change: Callable[[dict], Any]) -> dict:
    """Apply ``change`` to the results on disk under the lock (concurrent runs see each other's rows)."""
    with locked_results(path) as results:
        change(results)
    return results
