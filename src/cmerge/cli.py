"""The ``cmerge`` command.

Method flags (``--alpha``, ``--lam``, …) and extra-input flags (``--fisher``) are derived
from the registry's declarations, and every value is parsed by the chosen method's
``Method.parse_params``; a merge may also be described by a YAML file (``--config``,
config.py), whose values the flags override. Bad input ends in one sentence on stderr
(``error: ...``) and exit status 2.

Start-up: torch loads with the methods, the state and the export, so none of them is
imported until a command needs it. The options that come from the registry (``--method``,
the method flags, the extra inputs) or from the writer (``--shard-size``) are built the
first time click asks for a command's parameters (:class:`LazyOptionsCommand`), and the
commands of the evaluation and suites packages are imported only when named
(:class:`CmergeGroup`); ``cmerge --help`` therefore imports neither torch nor transformers.
"""
from __future__ import annotations

import importlib
import json
import logging
import random
import shutil
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import click

from . import __version__
from .errors import CmergeError


# ---------------------------------------------------------------- options derived from the registry

def _declared_params() -> dict[str, dict[str, Any]]:
    """Every declared parameter name → {method: its Param}."""
    from .methods import REGISTRY

    out: dict[str, dict[str, Any]] = {}
    for mname, cls in REGISTRY.items():
        for p in cls.params:
            out.setdefault(p.name, {})[mname] = p
    return out


def _extra_inputs() -> dict[str, list[str]]:
    """Every declared extra input (e.g. ``fisher``) → the methods that take it."""
    from .methods import REGISTRY

    out: dict[str, list[str]] = {}
    for mname, cls in REGISTRY.items():
        for key in cls.extra_inputs:
            out.setdefault(key, []).append(mname)
    return out


def method_options(f: Callable) -> Callable:
    """One ``--param-name`` option per declared method parameter; its value is parsed by the chosen method."""
    for name, decls in sorted(_declared_params().items(), reverse=True):
        p = next(iter(decls.values()))
        help_text = " | ".join(f"[{o}] {d.help} (default {d.default}" + (f"; {d.range_text()}" if d.minimum is not None
                               or d.maximum is not None else "") + ")" for o, d in decls.items())
        if all(d.type is bool for d in decls.values()):
            f = click.option(f"{p.flag}/--no-{p.flag[2:]}", name, default=None, help=help_text)(f)
        else:
            choices = {c for d in decls.values() for c in (d.choices or ())}
            metavar = "|".join(sorted(choices)) if choices else "/".join(sorted({d.type.__name__.upper()
                                                                                   for d in decls.values()}))
            f = click.option(p.flag, name, type=str, default=None, metavar=metavar, help=help_text)(f)
    return f


def extra_input_options(multiple: bool) -> Callable[[Callable], Callable]:
    """One ``--<input> FILE`` option per declared extra input (repeatable, one per model, for ``merge``)."""
    def add(f: Callable) -> Callable:
        for key, owners in sorted(_extra_inputs().items(), reverse=True):
            help_text = (f"[{', '.join(owners)}] the {key} file of " + ("each model, in the order of MODELS "
                         "(repeat once per model)" if multiple else "MODEL") + " (default: looked for beside it).")
            f = click.option(f"--{key.replace('_', '-')}", f"extra_{key}", multiple=multiple, default=None,
                             type=click.Path(path_type=Path), help=help_text)(f)
        return f
    return add


def _method_flags(method: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The method parameter flags that were given; a flag the method does not declare is refused."""
    from .methods import get_method_class

    own = {p.name for p in get_method_class(method).params}
    params = {}
    for name in _declared_params():
        value = kwargs.pop(name, None)
        if value is None:
            continue
        if name not in own:
            takes = ", ".join("--" + n.replace("_", "-") for n in sorted(own)) or "none"
            raise CmergeError(f"--{name.replace('_', '-')} is not a parameter of method {method!r} (it takes: {takes}).")
        params[name] = value
    return params


def _extra_flags(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {key: kwargs.pop(f"extra_{key}", None) for key in _extra_inputs()}


def _config(path: Path | None) -> Any:
    from .config import MergeConfig, load_config

    return load_config(path) if path is not None else MergeConfig()


def _resolve(config_path: Path | None, method: str | None, kwargs: dict[str, Any], **flags: Any) -> Any:
    """The merge config (config.MergeConfig): the file's (if any), then every flag given on top; parameters
    checked by the method."""
    config = _config(config_path)
    method = method or config.method
    if method != config.method:  # the file's parameters belong to its own method
        config = replace(config, method=method, params={})
    config = config.with_flags(params=_method_flags(method, kwargs), **flags)
    config.method_params()
    return config


config_opt = click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
                          help="a YAML file describing the merge (method, params, base, models, dtype, ...); "
                               "flags override its values.")


def method_opt(f: Callable) -> Callable:
    """``--method``, one of the registered names."""
    from .methods import REGISTRY

    return click.option("--method", type=click.Choice(sorted(REGISTRY)), default=None,
                        help="continual merging method (see `cmerge methods`; default opcm).")(f)


device_opt = click.option("--device", default=None, help="where to compute: cpu, cuda or auto (default cpu).")
quiet_opt = click.option("--quiet", "-q", is_flag=True, help="no progress bar.")
precision_opt = click.option("--precision", type=click.Choice(["float32", "float64"]), default=None,
                             help="compute and accumulator precision (default float32).")
project_opt = click.option("--project", "project", multiple=True, metavar="REGEX",
                           help="also project tensors whose name matches; each match must be 2-D (repeatable).")
no_project_opt = click.option("--no-project", "no_project", multiple=True, metavar="REGEX",
                              help="never project tensors whose name matches (repeatable).")
strict_layers_opt = click.option("--strict-layers", is_flag=True, default=None,
                                 help="refuse, instead of falling back to the name rule, when the architecture in "
                                      "config.json cannot be built or does not place all its linear weights.")
vocab_opt = click.option("--vocab", type=click.Choice(["base", "union"]), default=None,
                         help="an expert whose vocabulary grew (resize_token_embeddings): refused (base, the "
                              "default), or its new rows kept as they are, each from the first expert that has it "
                              "(union; docs/methods.md).")
allow_empty_opt = click.option("--allow-empty", is_flag=True, default=None,
                               help="merge a model even if its task vector is zero (identical to the base).")
dtype_opt = click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16", "float64"]), default=None,
                         help="dtype of the exported weights (default: the base's).")


def shard_opt(f: Callable) -> Callable:
    """``--shard-size``, with the writer's default."""
    from .io import DEFAULT_SHARD_SIZE

    return click.option("--shard-size", default=None,
                        help=f"largest safetensors shard, e.g. 5GB or 500MB (default {DEFAULT_SHARD_SIZE}).")(f)


def options(*decorators: Callable[[Callable], Callable]) -> Callable[[], list[click.Parameter]]:
    """The click parameters ``decorators`` declare, in the order written, built when called."""
    def build() -> list[click.Parameter]:
        def holder() -> None: ...
        for decorate in reversed(decorators):
            holder = decorate(holder)
        return list(reversed(holder.__click_params__))
    return build


class LazyOptionsCommand(click.Command):
    """A command whose ``lazy_options`` (a callable returning click parameters) are built the first
    time click asks for its parameters: to parse its arguments, to show its help or to complete."""

    def __init__(self, *args: Any, lazy_options: Callable[[], list[click.Parameter]], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._lazy_options: Callable[[], list[click.Parameter]] | None = lazy_options

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        if self._lazy_options is not None:
            self.params.extend(self._lazy_options())
            self._lazy_options = None
        return super().get_params(ctx)


# ---------------------------------------------------------------- the group

class _StderrNotes(logging.Handler):
    """cmerge's warnings (e.g. a classification fallback), one line each on the current stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        click.echo(f"warning: {record.getMessage()}", err=True)


def _show_notes() -> None:
    logger = logging.getLogger("cmerge")
    if not any(isinstance(h, _StderrNotes) for h in logger.handlers):
        logger.addHandler(_StderrNotes(logging.WARNING))
        logger.propagate = False


LAZY_COMMANDS = {  # name -> (module:attribute, its help line, shown by `cmerge --help` without importing it)
    "bench": ("cmerge.suites.commands:bench_command", "Benchmark continual merging methods on a task suite."),
    "report": ("cmerge.evaluation.commands:report_command", "Render tables, CSVs and figures from a results JSON."),
    "similarity": ("cmerge.evaluation.commands:similarity_command",
                   "Cosine similarity of the task vectors M_i − BASE."),
}


class CmergeGroup(click.Group):
    """Turns CmergeError into one sentence on stderr and exit status 2; imports the commands of
    :data:`LAZY_COMMANDS` only when one is named (their help line is listed without it)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*self.commands, *LAZY_COMMANDS})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in self.commands and name in LAZY_COMMANDS:
            module, attr = LAZY_COMMANDS[name][0].split(":")
            self.add_command(getattr(importlib.import_module(module), attr), name)
        return self.commands.get(name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        limit = formatter.width - 6 - max(len(name) for name in self.list_commands(ctx))
        rows = [(name, self.commands[name].get_short_help_str(limit) if name in self.commands
                 else click.utils.make_default_short_help(LAZY_COMMANDS[name][1], limit))
                for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)

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


# ---------------------------------------------------------------- commands

@main.command(cls=LazyOptionsCommand, lazy_options=options(method_opt, method_options))
@click.argument("state", type=click.Path(path_type=Path))
@click.option("--base", type=click.Path(path_type=Path), default=None, help="the pre-trained model θ0.")
@precision_opt
@project_opt
@no_project_opt
@strict_layers_opt
@vocab_opt
@config_opt
@quiet_opt
def init(state: Path, base: Path | None, method: str | None, precision: str | None, project, no_project,
         strict_layers: bool | None, vocab: str | None, config_path: Path | None, quiet: bool, **kwargs) -> None:
    """Create a merge STATE folder for BASE and a method (nothing merged yet)."""
    from .state import init_state

    cfg = _resolve(config_path, method, kwargs, base=str(base) if base else None, precision=precision,
                   project=tuple(project), no_project=tuple(no_project), strict_layers=strict_layers, vocab=vocab)
    if cfg.base is None:
        raise CmergeError("give the base model with --base (or `base:` in the --config file).")
    st = init_state(state, cfg.base, cfg.method, precision=cfg.precision, project=cfg.project,
                    no_project=cfg.no_project, strict_layers=cfg.strict_layers, progress=not quiet,
                    vocab=cfg.vocab, **cfg.method_params())
    info = st.info()
    click.echo(f"initialised {state}: method {info['method']} {json.dumps(info['params'])}, base {info['base']['path']}")
    click.echo(_describe_tensors(info))


@main.command(cls=LazyOptionsCommand, lazy_options=options(extra_input_options(multiple=False)))
@click.argument("state", type=click.Path(path_type=Path))
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--name", default=None, help="a name for this model in the step log (default: file or folder name).")
@click.option("--force", is_flag=True, help="add the model even if its content hash is already in the log.")
@allow_empty_opt
@device_opt
@quiet_opt
def add(state: Path, model: Path, name: str | None, force: bool, allow_empty: bool | None, device: str | None,
        quiet: bool, **kwargs) -> None:
    """Fold MODEL into the merge STATE (one atomic step)."""
    from .state import open_state

    st = open_state(state)
    entry = st.add(model, name=name, force=force, allow_empty=bool(allow_empty), device=device or "cpu",
                   progress=not quiet, extras=_extra_flags(kwargs))
    click.echo(_describe_entry(entry))
    click.echo(_describe_tensors(st.info()))


def _describe_tensors(info: dict[str, Any]) -> str:
    return f"tensors: {info['summary']} (classified by {info['base']['classified_by']})"


def _describe_entry(e: Any) -> str:
    lam = f", λ_t = {e['lambda']:.4f}" if e.get("lambda") is not None else ""
    return f"step {e['t']}: merged {e['name']} (‖τ‖ = {e['norm']:.4f}{lam}) in {e['seconds']:.1f} s"


def _exported(n: int, out: Path) -> str:
    return f"exported the merge of {n} model{'s' if n != 1 else ''} to {out}"


def _lora_rank(value: str | None) -> int | None:
    if value in (None, "exact"):
        return None
    try:
        rank = int(value)
    except ValueError:
        raise CmergeError(f"--as-lora takes a rank (a positive integer) or nothing, got {value!r}.") from None
    if rank < 1:
        raise CmergeError(f"--as-lora takes a positive rank, got {rank}.")
    return rank


@main.command(cls=LazyOptionsCommand, lazy_options=options(shard_opt))
@click.argument("state", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@dtype_opt
@click.option("--as-lora", "as_lora", is_flag=False, flag_value="exact", default=None, metavar="[RANK]",
              help="write a PEFT LoRA adapter for the same base instead of a full model: exact without RANK, else "
                   "each module's best rank-RANK approximation (errors in its README.md).")
@device_opt
@quiet_opt
def export(state: Path, out: Path, dtype: str | None, shard_size: str | None, as_lora: str | None,
           device: str | None, quiet: bool) -> None:
    """Write the merged model of STATE to the folder OUT (safetensors, config, tokenizer, model card)."""
    from .io import DEFAULT_SHARD_SIZE
    from .state import open_state

    st = open_state(state)
    if as_lora is not None:
        click.echo(st.export_lora(out, rank=_lora_rank(as_lora), dtype=dtype).summary())
        return
    st.export(out, dtype=dtype, shard_size=shard_size or DEFAULT_SHARD_SIZE, device=device or "cpu",
              progress=not quiet)
    click.echo(_exported(len(st.steps), out))


@main.command()
@click.argument("state", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="print everything as JSON.")
@click.option("--tensors", is_flag=True, help="list every tensor with its classification.")
@project_opt
@no_project_opt
def info(state: Path, as_json: bool, tensors: bool, project, no_project) -> None:
    """Show a merge STATE (method, parameters, base, steps with λ_t, norms and hashes, tensor classification),
    or, given a MODEL instead, how its tensors would be classified (--project/--no-project as for init)."""
    from .manifest import MANIFEST, Manifest

    if not (state / MANIFEST).exists() and state.exists():
        _model_info(state, as_json, tensors, project, no_project)
        return
    if project or no_project:
        raise CmergeError("--project and --no-project apply to a model, not to a merge state (whose classification "
                          "was fixed by `cmerge init`).")
    data = Manifest.load(state).info(state)
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    click.echo(f"state   {data['state']}\nmethod  {data['method']} {json.dumps(data['params'])}"
               f"\nbase    {data['base']['path']}\n        sha256 {data['base']['sha256']}")
    click.echo(_describe_tensors(data))
    factored = {n: w for n, w in data["factored"].items() if w}
    if data["factored"]:
        top = max(factored.values(), default=0)
        click.echo(f"factored {len(data['factored'])} tensors kept as low-rank factors ({len(factored)} nonzero, "
                   f"rank up to {top}; the others are zero)")
    if tensors:
        _list_tensors(data["classification"], data["routes"], data["factored"])
    if not data["steps"]:
        click.echo("steps   none yet")
    for e in data["steps"]:
        ranks = e.get("protected_rank") or {}
        kmean = f", mean protected rank {sum(v[0] for v in ranks.values()) / len(ranks):.1f}" if ranks else ""
        click.echo(f"  {_describe_entry(e)}{kmean}\n      sha256 {e['sha256']}  {e['time']}")


def _list_tensors(kinds: dict[str, str], routes: dict[str, str], factored: dict[str, int] | None = None) -> None:
    for n, k in kinds.items():
        rank = f"  (factored, rank ≤ {factored[n]})" if factored and n in factored else ""
        click.echo(f"  {k:<11} {routes[n]:<12} {n}{rank}")


def _model_info(model: Path, as_json: bool, tensors: bool, project, no_project) -> None:
    """The classification a merge of MODEL as its base would use."""
    from .state import classify_model

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
    from .methods import REGISTRY

    for name, cls in REGISTRY.items():
        click.echo(f"{name}: {cls.summary}")
        for p in cls.params:
            choices = f" {{{'|'.join(p.choices)}}}" if p.choices else ""
            bounds = f", {p.range_text()}" if p.minimum is not None or p.maximum is not None else ""
            click.echo(f"    {p.flag}{choices} (default {p.default}{bounds}): {p.help}")
        for key, filename in cls.extra_inputs.items():
            click.echo(f"    --{key.replace('_', '-')} FILE (default: {filename} beside the model): per-tensor input")


@main.command(cls=LazyOptionsCommand,
              lazy_options=options(method_opt, shard_opt, extra_input_options(multiple=True), method_options))
@click.argument("models", nargs=-1, type=click.Path(path_type=Path))
@click.option("--base", type=click.Path(path_type=Path), default=None, help="the pre-trained model θ0.")
@click.option("-o", "--output", "out", type=click.Path(path_type=Path), default=None, help="output model folder.")
@click.option("--shuffle", is_flag=True, help="merge in a random order (see --seed).")
@click.option("--seed", type=int, default=0, show_default=True, help="seed of --shuffle.")
@click.option("--state", "state_dir", type=click.Path(path_type=Path), default=None,
              help="keep the merge state here (default: a temporary folder, removed at the end).")
@precision_opt
@project_opt
@no_project_opt
@strict_layers_opt
@vocab_opt
@allow_empty_opt
@click.option("--dry-run", is_flag=True, help="only show how BASE's tensors would be classified (and with --tensors, "
                                               "each of them), then stop.")
@click.option("--tensors", "list_tensors", is_flag=True, help="with --dry-run: list every tensor's classification.")
@dtype_opt
@device_opt
@config_opt
@quiet_opt
def merge(models, base, out, method, shuffle, seed, state_dir, precision, project, no_project, strict_layers,
          vocab, allow_empty, dry_run, list_tensors, dtype, shard_size, device, config_path, quiet, **kwargs) -> None:
    """Merge MODELS into BASE one at a time (init + add each + export); or the merge a --config file describes."""
    from .config import ModelEntry, check_extras
    from .export import provenance
    from .state import classify_model, init_state

    extras = _extra_flags(kwargs)
    entries = tuple(ModelEntry(str(m)) for m in models)
    given = {k: list(v) for k, v in extras.items() if v}
    if given:
        n_models = len(entries) or len(_config(config_path).models)
        for key, files in given.items():
            if len(files) != n_models:
                raise CmergeError(f"--{key} was given {len(files)} times for {n_models} models; give it once per "
                                  f"model, in order.")
    cfg = _resolve(config_path, method, kwargs, base=str(base) if base else None, models=entries or None,
                   output=str(out) if out else None, precision=precision, project=tuple(project),
                   no_project=tuple(no_project), strict_layers=strict_layers, allow_empty=allow_empty, dtype=dtype,
                   shard_size=shard_size, device=device, vocab=vocab)
    if given:
        cfg = replace(cfg, models=tuple(
            ModelEntry(m.path, m.name, {**m.extras, **{k: str(files[i]) for k, files in given.items()}})
            for i, m in enumerate(cfg.models)))
    check_extras(cfg)
    if cfg.base is None:
        raise CmergeError("give the base model with --base (or `base:` in the --config file).")
    order = list(cfg.models)
    if shuffle:
        random.Random(seed).shuffle(order)
    if dry_run:
        cls = classify_model(cfg.base, cfg.project, cfg.no_project, strict=cfg.strict_layers)
        click.echo(f"would merge {len(order)} models into {cfg.base} with {cfg.method} {json.dumps(cfg.params)}")
        click.echo(f"tensors: {cls.summary()} (classified by {cls.how})")
        if list_tensors:
            _list_tensors(cls.kinds, cls.routes)
        return
    if not order:
        raise CmergeError("give the models to merge (MODELS, or `models:` in the --config file).")
    if cfg.output is None:
        raise CmergeError("give the output folder with -o (or `output:` in the --config file).")
    tmp = None
    if state_dir is None:
        tmp = Path(tempfile.mkdtemp(prefix="cmerge-state-"))
        state_dir = tmp / "state"
    try:
        st = init_state(state_dir, cfg.base, cfg.method, precision=cfg.precision, project=cfg.project,
                        no_project=cfg.no_project, strict_layers=cfg.strict_layers, progress=not quiet,
                        vocab=cfg.vocab, **cfg.method_params())
        click.echo(_describe_tensors(st.info()))
        for m in order:
            entry = st.add(m.path, name=m.name, allow_empty=cfg.allow_empty, device=cfg.device, progress=not quiet,
                           extras=m.extras or None)
            click.echo(_describe_entry(entry))
        record = provenance(st.info())
        if tmp is not None:  # the state folder is gone after this command: record the inputs, not its path
            for key in ("state", "generation"):
                record.pop(key, None)
        st.export(cfg.output, dtype=cfg.dtype, shard_size=cfg.shard_size, device=cfg.device, progress=not quiet,
                  provenance=record)
        click.echo(_exported(len(order), Path(cfg.output)))
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":  # pragma: no cover
    main()
