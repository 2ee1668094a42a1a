"""The GPU path: Megatron-Bridge (NeMo Framework) training configured from our Hydra config.

- `prepare_data`: C4 json(.gz) shards -> Megatron indexed datasets (.bin/.idx), with our
  tokenizer. Pure numpy: runs anywhere, no Megatron needed.
- `recipe`: our composed config -> a plain dict of Megatron-Bridge settings. No NeMo imports,
  so the translation is unit tested on any machine.
- `callback`: the MLPerf events of `clm.mlperf`, driven from Megatron-Bridge's callbacks.
- `launch`: `python -m clm.nemo.launch <hydra overrides>`, run inside the NeMo container; the
  only module that imports `megatron.bridge`.
"""
