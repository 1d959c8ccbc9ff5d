"""Reading and writing models, one tensor at a time.

- :mod:`.sources`  tensor sources (HF folders, sharded or not; safetensors, torch files; state dicts, modules)
- :mod:`.hashing`  content hashes, and a source that hashes what is read through it
- :mod:`.writer`   the streaming safetensors writer, shards + index
- :mod:`.folder`   a model folder: shards, config/tokenizer files, model card, written atomically
- :mod:`.tensors`  shapes, dtypes and their names
"""
from .folder import DEFAULT_SHARD_SIZE, copy_aux_files, write_model_folder, write_tensor_folder
from .hashing import (HashingSource, combine_digests, content_digest, content_hash, digest_start, tensor_bytes,
                      tensor_digest)
from .peft import base_matches
from .sources import (SAFETENSORS_INDEX, TORCH_INDEX, WEIGHT_SUFFIXES, MappingSource, SafetensorsSource,
                      TensorSource, TorchFileSource, data_offsets, describe, is_weight_file, open_source)
from .tensors import DTYPES, TensorMeta, dtype_name, parse_dtype, rows_numel, torch_dtype
from .writer import StreamingSafetensorsWriter, parse_size, plan_shards, write_sharded

__all__ = [
    "DEFAULT_SHARD_SIZE", "DTYPES", "HashingSource", "MappingSource", "SAFETENSORS_INDEX", "SafetensorsSource",
    "StreamingSafetensorsWriter", "TORCH_INDEX", "TensorMeta", "TensorSource", "TorchFileSource", "WEIGHT_SUFFIXES",
    "base_matches", "combine_digests", "content_digest", "content_hash", "copy_aux_files", "data_offsets", "describe",
    "digest_start", "dtype_name", "is_weight_file", "open_source", "parse_dtype", "parse_size", "plan_shards",
    "rows_numel", "tensor_bytes", "tensor_digest", "torch_dtype", "write_model_folder", "write_sharded",
    "write_tensor_folder",
]
