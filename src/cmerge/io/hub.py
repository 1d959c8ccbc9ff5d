"""A model named by its Hugging Face Hub id (``Qwen/Qwen2.5-0.5B``): the weights, config and tokenizer only.

cmerge downloads nothing unless the user names a hub id and is online. The download is
``huggingface_hub.snapshot_download`` restricted to the files a merge needs (safetensors
weights and their index, config and tokenizer files; ``.bin`` weights only for a repository
that has no safetensors), into the usual Hugging Face cache; offline, or if the download
fails, one sentence says so.
"""
from __future__ import annotations

import re
from pathlib import Path

from ..errors import CmergeError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
CONFIG_AND_TOKENIZER = ["config.json", "generation_config.json", "tokenizer*", "special_tokens_map.json",
                        "vocab.*", "merges.txt", "*.model", "adapter_config.json", "chat_template*"]
SAFETENSORS = ["*.safetensors", "*.safetensors.index.json"]
TORCH_FILES = ["*.bin", "pytorch_model.bin.index.json"]


def looks_like_hub_id(text: str) -> bool:
    return bool(HUB_ID.match(text)) and not Path(text).exists()


def download(repo_id: str) -> Path:
    """The local folder of ``repo_id``'s weights, config and tokenizer (downloaded if not cached)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CmergeError(f"{repo_id} is not a local path, and huggingface_hub (to download it) is not "
                          f"installed.") from None
    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=SAFETENSORS + CONFIG_AND_TOKENIZER))
        if not any(folder.glob("*.safetensors")):
            folder = Path(snapshot_download(repo_id, allow_patterns=TORCH_FILES + CONFIG_AND_TOKENIZER))
    except Exception as exc:  # offline, unknown repository, gated, network errors: one sentence
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0].rstrip(".")
        raise CmergeError(f"{repo_id} is not a local path, and it could not be downloaded from the Hugging Face "
                          f"Hub ({type(exc).__name__}: {reason[:200]}); when offline, give the path of a local "
                          f"copy.") from None
    return folder
