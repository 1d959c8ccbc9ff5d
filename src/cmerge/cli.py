"""The ``cmerge`` command. Method flags are derived from the registry's declared parameters."""
from __future__ import annotations

import json
import logging
import random
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import click

from . import __version__
from .errors import CmergeError
from .methods import REGISTRY
from .state import DEFAULT_SHARD_SIZE, MANIFEST, classify_model, init_state, open_state


def _method_params() -> dict[str, tuple[Any, list[str]]]:
    """Every declared parameter name → (a Param, the methods that declare it)."""
    out: dict[str, tuple[Any, list[str]]] = {}
    for mname, cls in REGISTRY.items():
        for p in cls.params:
            if p.name in out:
                prev = out[p.name][0]
                if prev.type is not p.type:
                    raise RuntimeError(f"parameter {p.name} is declared with two types")
                out[p.name][1].append(mname)
            else:
                out[p.name] = (p, [mname])
    return out


def method_options(f: Callable) -> Callable:
    """Add one ``--param-name`` option per declared method parameter (default: the method's own)."""
    for name, (p, owners) in sorted(_method_params().items(), reverse=True):
        decls = {o: next(q for q in REGISTRY[o].params if q.name == name) for o in owners}
        if len({d.help for d in decls.values()}) == 1:
            help_text = f"[{', '.join(owners)}] {p.help} (default {', '.join(f'{o}: {d.default}' for o, d in decls.items())})"
        else:
            help_text = " | ".join(f"[{o}] {d.help} (default {d.default})" for o, d in decls.items())
        if p.type is bool:
            f = click.option(f"{p.flag}/--no-{p.flag[2:]}", name, default=None, help=help_text)(f)
        else:
            ptype = click.Choice(p.choices) if p.choices else p.type
            f = click.option(p.flag, name, type=ptype, default=None, help=help_text)(f)
    return f


def _collect_params(method: str, given: dict[str, Any]) -> dict[str, Any]:
    if method not in REGISTRY:
        raise CmergeError(f"unknown method {method!r}; choose one of {', '.join(sorted(REGISTRY))}.")
    own = {p.name for p in REGISTRY[method].params}
    params = {}
    for name, value in given.items():
        if value is None:
            continue
        if name not in own:
            raise CmergeError(f"--{name.replace('_', '-')} is not a parameter of method {method!r}"
                              f" (it takes: {', '.join('--' + n.replace('_', '-') for n in sorted(own)) or 'none'}).")
        params[name] = value
    return params


def _split_params(kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    names = set(_method_params())
    return {k: v for k, v in kwargs.items() if k in names}, {k: v for k, v in kwargs.items() if k not in names}


method_choice = click.option("--method", type=click.Choice(sorted(REGISTRY)), default="opcm", show_default=True,
                             help="continual merging method (see `cmerge methods`).")
device_opt = click.option("--device", default="cpu", show_default=True, help="where to compute: cpu, cuda or auto.")
quiet_opt = click.option("--quiet", "-q", is_flag=True, help="no progress bar.")
precision_opt = click.option("--precision", type=click.Choice(["float32", "float64"]), default="float32",
                             show_default=True, help="compute and accumulator precision.")
project_opt = click.option("--project", "project", multiple=True, metavar="REGEX",
                           help="also project tensors whose name matches; each match must be 2-D (repeatable).")
no_project_opt = click.option("--no-project", "no_project", multiple=True, metavar="REGEX",
                              help="never project tensors whose name matches (repeatable).")
dtype_opt = click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default=None,
                         help="dtype of the exported weights (default: the base's).")
shard_opt = click.option("--shard-size", default=DEFAULT_SHARD_SIZE, show_default=True,
                         help="largest safetensors shard, e.g. 5GB or 500MB.")


strict_layers_opt = click.option("--strict-layers", is_flag=True,
                                 help="refuse, instead of falling back to the name rule, when the architecture in "
                                      "config.json cannot be built or does not place all its linear weights.")


class _StderrNotes(logging.Handler):
    """cmerge's warnings (e.g. a classification fallback), one line each on the current stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        click.echo(f"warning: {record.getMessage()}", err=True)


def _show_notes() -> None:
    logger = logging.getLogger("cmerge")
    if not any(isinstance(h, _StderrNotes) for h in logger.handlers):
        logger.addHandler(_StderrNotes(logging.WARNING))
        logger.propagate = False


class CmergeGroup(click.Group):
    """Turns CmergeError into one sentence on stderr and exit status 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except CmergeError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted; the merge state is unchanged.", err=True)
            sys.exit(130)


@click.group(cls=CmergeGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="cmerge")
def main() -> None:
    """Continual model merging: fold fine-tuned models into one merged model as they arrive."""
    _show_notes()


@main.command()
@click.argument("state", type=click.Path(path_type=Path))
@click.option("--base", required=True, type=click.Path(path_type=Path), help="the pre-trained model θ0.")
@method_choice
@precision_opt
@project_opt
@no_project_opt
@strict_layers_opt
@quiet_opt
@method_options
def init(state: Path, base: Path, method: str, precision: str, project, no_project, strict_layers: bool, quiet: bool,
         **kwargs) -> None:
    """Create a merge STATE folder for BASE and a method (nothing merged yet)."""
    params = _collect_params(method, kwargs)
    st = init_state(state, base, method, precision=precision, project=project, no_project=no_project,
                    strict_layers=strict_layers, progress=not quiet, **params)
    info = st.info()
    click.echo(f"initialised {state}: method {info['method']} {json.dumps(info['params'])}, base {info['base']['path']}")
    click.echo(_describe_tensors(info))


@main.command()
@click.argument("state", type=click.Path(path_type=Path))
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--name", default=None, help="a name for this model in the step log (default: file or folder name).")
@click.option("--force", is_flag=True, help="add the model even if its content hash is already in the log.")
@click.option("--fisher", default=None, type=click.Path(path_type=Path),
              help="per-tensor second moments of MODEL (for methods that need them).")
@device_opt
@quiet_opt
def add(state: Path, model: Path, name: str | None, force: bool, fisher: Path | None, device: str, quiet: bool) -> None:
    """Fold MODEL into the merge STATE (one atomic step)."""
    st = open_state(state)
    extras = {"fisher": fisher} if fisher is not None else None
    entry = st.add(model, name=name, force=force, device=device, progress=not quiet, extras=extras)
    click.echo(_describe_entry(entry))
    click.echo(_describe_tensors(st.info()))


def _describe_tensors(info: dict[str, Any]) -> str:
    return f"tensors: {info['summary']} (classified by {info['base']['classified_by']})"


def _describe_entry(e: dict[str, Any]) -> str:
    lam = f", λ_t = {e['lambda']:.4f}" if e.get("lambda") is not None else ""
    return f"step {e['t']}: merged {e['name']} (‖τ‖ = {e['norm']:.4f}{lam}) in {e['seconds']:.1f} s"


@main.command()
@click.argument("state", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@dtype_opt
@shard_opt
@device_opt
@quiet_opt
def export(state: Path, out: Path, dtype: str | None, shard_size: str, device: str, quiet: bool) -> None:
    """Write the merged model of STATE to the folder OUT (safetensors, config, tokenizer, model card)."""
    st = open_state(state)
    st.export(out, dtype=dtype, shard_size=shard_size, device=device, progress=not quiet)
    click.echo(f"exported {len(st.steps)} merged models to {out}")


@main.command()
@click.argument("state", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="print everything as JSON.")
@click.option("--tensors", is_flag=True, help="list every tensor with its classification.")
@project_opt
@no_project_opt
def info(state: Path, as_json: bool, tensors: bool, project, no_project) -> None:
    """Show a merge STATE (method, parameters, base, steps with λ_t, norms and hashes, tensor classification),
    or, given a MODEL instead, how its tensors would be classified (--project/--no-project as for init)."""
    if not (state / MANIFEST).exists() and state.exists():
        _model_info(state, as_json, tensors, project, no_project)
        return
    if project or no_project:
        raise CmergeError("--project and --no-project apply to a model, not to a merge state (whose classification "
                          "was fixed by `cmerge init`).")
    data = open_state(state).info()
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    click.echo(f"state   {data['state']}\nmethod  {data['method']} {json.dumps(data['params'])}"
               f"\nbase    {data['base']['path']}\n        sha256 {data['base']['sha256']}")
    click.echo(_describe_tensors(data))
    if tensors:
        _list_tensors(data["classification"], data["routes"])
    if not data["steps"]:
        click.echo("steps   none yet")
    for e in data["steps"]:
        ranks = e.get("protected_rank") or {}
        kmean = f", mean protected rank {sum(v[0] for v in ranks.values()) / len(ranks):.1f}" if ranks else ""
        click.echo(f"  {_describe_entry(e)}{kmean}\n      sha256 {e['sha256']}  {e['time']}")


def _list_tensors(kinds: dict[str, str], routes: dict[str, str]) -> None:
    for n, k in kinds.items():
        click.echo(f"  {k:<11} {routes[n]:<12} {n}")


def _model_info(model: Path, as_json: bool, tensors: bool, project, no_project) -> None:
    """The classification a merge of MODEL as its base would use."""
    cls = classify_model(model, project, no_project)
    if as_json:
        click.echo(json.dumps({"model": str(model), "classified_by": cls.how, "architecture": cls.architecture,
                               "summary": cls.summary(), "projected": cls.projected(),
                               "classification": cls.kinds, "routes": cls.routes}, indent=2))
        return
    click.echo(f"model   {model}\ntensors: {cls.summary()} (classified by {cls.how})")
    if tensors:
        _list_tensors(cls.kinds, cls.routes)


@main.command()
def methods() -> None:
    """List the registered methods and their parameters."""
    for name, cls in REGISTRY.items():
        click.echo(f"{name}: {cls.summary}")
        for p in cls.params:
            choices = f" {{{'|'.join(p.choices)}}}" if p.choices else ""
            click.echo(f"    {p.flag}{choices} (default {p.default}): {p.help}")


@main.command()
@click.argument("models", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--base", required=True, type=click.Path(path_type=Path), help="the pre-trained model θ0.")
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="output model folder.")
@method_choice
@click.option("--shuffle", is_flag=True, help="merge in a random order (see --seed).")
@click.option("--seed", type=int, default=0, show_default=True, help="seed of --shuffle.")
@click.option("--state", "state_dir", type=click.Path(path_type=Path), default=None,
              help="keep the merge state here (default: a temporary folder, removed at the end).")
@precision_opt
@project_opt
@no_project_opt
@strict_layers_opt
@click.option("--dry-run", is_flag=True, help="only show how BASE's tensors would be classified (and with --tensors, "
                                               "each of them), then stop.")
@click.option("--tensors", "list_tensors", is_flag=True, help="with --dry-run: list every tensor's classification.")
@dtype_opt
@shard_opt
@device_opt
@quiet_opt
@method_options
def merge(models, base, out, method, shuffle, seed, state_dir, precision, project, no_project, strict_layers, dry_run,
          list_tensors, dtype, shard_size, device, quiet, **kwargs) -> None:
    """Merge MODELS into BASE one at a time (init + add each + export)."""
    params = _collect_params(method, kwargs)
    order = list(models)
    if shuffle:
        random.Random(seed).shuffle(order)
    if dry_run:
        cls = classify_model(base, project, no_project, strict=strict_layers)
        click.echo(f"would merge {len(order)} models into {base} with {method} {json.dumps(params)}")
        click.echo(f"tensors: {cls.summary()} (classified by {cls.how})")
        if list_tensors:
            _list_tensors(cls.kinds, cls.routes)
        return
    tmp = None
    if state_dir is None:
        tmp = Path(tempfile.mkdtemp(prefix="cmerge-state-"))
        state_dir = tmp / "state"
    try:
        st = init_state(state_dir, base, method, precision=precision, project=project, no_project=no_project,
                        strict_layers=strict_layers, progress=not quiet, **params)
        click.echo(_describe_tensors(st.info()))
        for m in order:
            click.echo(_describe_entry(st.add(m, device=device, progress=not quiet)))
        st.export(out, dtype=dtype, shard_size=shard_size, device=device, progress=not quiet)
        click.echo(f"exported {len(order)} merged models to {out}")
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _register_optional_commands() -> None:
    """Commands from the evaluation and suites packages, when present."""
    import importlib

    for module, attrs in (("cmerge.evaluation.commands", ("report_command", "similarity_command")),
                          ("cmerge.suites.commands", ("bench_command",))):
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        for attr in attrs:
            cmd = getattr(mod, attr, None)
            if cmd is not None:
                main.add_command(cmd)


_register_optional_commands()

if __name__ == "__main__":  # pragma: no cover
    main()
