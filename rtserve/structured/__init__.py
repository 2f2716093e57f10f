"""Structured outputs: grammar-constrained decoding with xgrammar (JSON schema, regex, choice, EBNF,
tool-call structural tags), and tool-call rendering and parsing.

Engine side: `compiler.GrammarService` compiles a request's grammar off the engine loop (cached by
its source), `matcher.RequestGrammar` follows the tokens a request emits, `matcher.fill_masks` fills
the step's token bitmask (on the runner's worker thread, during the forward) and
`matcher.apply_masks` applies it to the logits before sampling; `vocab` reads the model's
vocabulary. API side: `check.check_structured` refuses a bad grammar before the engine sees it;
`tool_formats` picks the model's tool-call format (Hermes in `tools`, Llama 3 JSON and Mistral
parsed by `json_calls`) and gives its grammar, prompt and streaming parser. xgrammar is imported
lazily: a server that never constrains never loads it.
"""
