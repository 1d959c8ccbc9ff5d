"""The evaluation commands of the ``cmerge`` CLI: ``report`` and ``similarity``.

cli.py registers ``report_command`` and ``similarity_command``. Bad input raises CmergeError,
which the ``cmerge`` group turns into one sentence on stderr (``error: ...``) and exit status 2;
nothing is written. The heavy modules (torch
readers, matplotlib) are imported inside the commands, so registering them is cheap.
"""
from __future__ import annotations

import json
from pathlib import Path

import click

from cmerge.errors import CmergeError


def model_label(path: str) -> str:
    """A short name for a model path: the folder name, or a weight file's name without its suffix."""
    from cmerge.io import WEIGHT_SUFFIXES

    p = Path(path.rstrip("/\\"))
    return p.stem if p.suffix in WEIGHT_SUFFIXES else p.name


def parse_names(names: str | None, models: tuple[str, ...]) -> list[str]:
    """Labels from ``--names a,b,c`` (one per model) or from the model paths, made unique."""
    if names is None:
        labels = [model_label(m) for m in models]
    else:
        labels = [n.strip() for n in names.split(",")]
        if len(labels) != len(models) or not all(labels):
            raise CmergeError(f"--names gives {len(labels)} names for {len(models)} models; give one non-empty name per model.")
    if len(set(labels)) < len(labels):
        labels = [f"{label} ({i + 1})" for i, label in enumerate(labels)]
    return labels


@click.command("report")
@click.argument("results_path", metavar="RESULTS.json")
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Folder to write table.md, report.md, the CSVs and the PNG figures into.")
@click.option("--title", default="Continual merging report", show_default=True, help="Title of report.md.")
@click.option("--paired-reference", default=None, metavar="ROW",
              help="the row every other row is compared with, order by order (mean ACC difference and its "
                   "95% Student-t interval over orders); default: the one the results name, else opcm.")
def report_command(results_path: str, out_dir: str, title: str, paired_reference: str | None) -> None:
    """Render tables, CSVs and figures from a results JSON.

    Writes table.md (Table 1 of the OPCM paper), report.md, summary.csv, steps.csv,
    sweeps.csv, paired.csv and the PNG figures into the folder given by -o.
    """
    from cmerge.evaluation.report import write_report
    from cmerge.evaluation.results import load_results

    written = write_report(load_results(results_path), out_dir, title=title, paired_reference=paired_reference)
    click.echo(f"wrote {len(written)} files to {out_dir}", err=True)


@click.command("similarity")
@click.argument("base", metavar="BASE")
@click.argument("models", nargs=-1, required=True, metavar="M1 M2 ...")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="PNG file for the cosine-similarity heatmap.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the matrix to stdout as a JSON list of lists, rows in the order given.")
@click.option("--names", default=None, help="Comma-separated labels, one per model (default: from the paths).")
def similarity_command(base: str, models: tuple[str, ...], output: str | None, as_json: bool, names: str | None) -> None:
    """Cosine similarity of the task vectors M_i − BASE.

    Streams the models tensor by tensor in float64, so it works for models larger than
    memory; draws the heatmap of the OPCM paper's Fig. 4 and/or prints the matrix.
    """
    from cmerge.evaluation.plots import plot_similarity
    from cmerge.evaluation.results import to_jsonable
    from cmerge.evaluation.similarity import cosine_similarity_matrix

    if output is None and not as_json:
        raise click.UsageError("give -o HEATMAP.png, --json, or both.")
    labels = parse_names(names, models)
    matrix = cosine_similarity_matrix(base, list(models), labels)
    if output is not None:
        plot_similarity(matrix, labels, output)
        click.echo(f"wrote {output}", err=True)
    if as_json:
        click.echo(json.dumps(to_jsonable(matrix)))
