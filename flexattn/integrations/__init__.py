"""Integrations: flexattn registered as a backend of other libraries.

* `flexattn.integrations.transformers` - an attention implementation for Hugging Face
  transformers (``attn_implementation="flexattn"``).
"""
