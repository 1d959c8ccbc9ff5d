"""Shared fixtures for the core tests: one compute thread, a CLI runner, tiny models on disk."""
from __future__ import annotations

import os

# The test machines are small and shared: several OpenMP threads per process make SVDs
# tens of times slower under contention. Set before torch is imported (children inherit it).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import sys  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

sys.path.insert(0, str(Path(__file__).parent))

import helpers  # noqa: E402


@dataclass
class CliResult:
    exit_code: int
    stdout: str
    stderr: str
    exception: BaseException | None


@pytest.fixture
def cli():
    """Run ``cmerge ARGS`` in-process; returns exit code, stdout and stderr separately."""
    from click.testing import CliRunner

    from cmerge.cli import main

    def run(*args) -> CliResult:
        res = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=True)
        exc = res.exception if not isinstance(res.exception, SystemExit) else None
        return CliResult(res.exit_code, res.stdout, res.stderr, exc)

    return run


@pytest.fixture
def tiny(tmp_path):
    """The tiny name-rule model: base + 4 experts (+ Fisher files) as .safetensors files, and their tensors."""
    base = helpers.tiny_base(seed=0)
    exps = helpers.experts(base, 4, seed=1)
    paths = {"base": helpers.save_model(base, tmp_path / "models" / "base.safetensors")}
    for i, e in enumerate(exps):
        paths[f"m{i}"] = helpers.save_model(e, tmp_path / "models" / f"m{i}.safetensors")
        fisher = helpers.fisher_like(e, i)
        paths[f"f{i}"] = helpers.save_model(fisher, tmp_path / "models" / f"f{i}.safetensors")
    fishers = [helpers.fisher_like(e, i) for i, e in enumerate(exps)]
    return {"base": base, "experts": exps, "fishers": fishers, "paths": paths, "root": tmp_path}
