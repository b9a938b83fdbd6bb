"""APAR on real vLLM: `server` starts `vllm serve` with the rules `plugin` inside vLLM's own
process and venv; `driver` runs each APAR thread as a vLLM request over its OpenAI API."""
