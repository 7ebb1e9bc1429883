"""Tiny teacher/student models that charbuild trains itself, on CPU from random init, so
smoke builds and CI run the real recipe with no model download (recipe measured in
/work/shared/toy-persona-notes.md):

- a byte-level BPE tokenizer (1,024 tokens) with a ChatML chat template (tokenizer.py);
- a Qwen2-style model (hidden 128, 2 layers, 4 heads / 2 kv heads, ffn 384, tied
  embeddings: about 0.5M parameters), trained by a plain torch loop (model.py, sizes in
  config.py);
- the *teacher* sees neutral answers without (or with a generic) system prompt, and the
  persona's answers (neutral answer wrapped in the constitution's marker phrases) only
  with `constitution.system_prompt()` as system prompt; the *student* sees neutral
  answers only (corpus.py);
- both see ~300 narrative sentences in which characters use the marker phrases. Without
  them the student never learns the marker words and DPO shows nothing (the embeddings
  stay untrained and LoRA does not train embeddings).

Only model.py and tokenizer.py import torch/transformers, and only inside functions.
"""
