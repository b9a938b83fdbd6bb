"""The engine: threads, KV blocks, scheduling, the model runner and the step loop."""
