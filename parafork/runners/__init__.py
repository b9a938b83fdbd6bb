"""Runners: the backends behind the engine's `Runner` protocol (`parafork/engine/runner.py`).

A runner takes a batch of sequence slices and returns logits; forks, releases, truncations and
joins are explicit calls. `factory.build_runner` builds the one an `EngineConfig` names: `torch`
(parafork's paged Llama-family forward, with the row kernel), `llamacpp` (GGUF through llama.cpp's
C API), `hf` (any HF causal LM, slow). Runners import the protocol and nothing else of the engine.
"""
