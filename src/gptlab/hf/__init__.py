"""Hugging Face format in and out: runs exported as `transformers` folders or Spaces, pushed to the Hub,
and GPT-2 or Llama folders imported to start training from.

Modules: `gpt2` (our GPT's weights and config in GPT-2's layout, both ways), `llama` (our Llama and
`LlamaForCausalLM`, both ways), `tokenizers` (our tokenizers as `tokenizer.json` and back), `source`
(a run loaded for export), `card` (the model card), `export` (the formats, written atomically),
`space` (a Gradio Space), `hub` (push), `init` (weights, shape and tokenizer for `--init-from`).
"""
