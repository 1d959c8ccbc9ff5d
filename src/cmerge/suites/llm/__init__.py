"""The LLM suite: continual merging of LoRA experts of SmolLM2-135M-Instruct, offline (docs/llm_suite.md).

backbone.py GGUF → float32 safetensors cache · tasks.py prompts and settings · scoring.py label
log-likelihood ranking · lora.py LoRA recipe, training, ΔW · adapters.py adapter cache ·
sequential.py SeqLoRA and SLAO · bench.py the run · commands.py ``cmerge bench llm``.
"""
