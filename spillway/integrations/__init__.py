"""Real engines on lent HBM, by configuration: `spillway.integrations.vllm` (an offloading spec
for vLLM's OffloadingConnector) and `spillway.integrations.transformers` (a cache for Hugging
Face `generate()`). Both move KV blocks through the slot API of `spillway.client`. See
docs/client.md."""
