"""Structured outputs: grammar-constrained decoding with xgrammar (JSON schema, regex, choice, EBNF,
tool-call structural tags), and tool-call rendering and parsing.

Engine side: `compiler.GrammarService` compiles a request's grammar off the engine loop (cached by
its source), `matcher.RequestGrammar` follows the tokens a request emits, `matcher.fill_masks` fills
the step's token bitmask (on the runner's worker thread, during the forward) and
`matcher.apply_masks` applies it to the logits before sampling; `vocab` reads the model's vocabulary. API side: `check.check_structured`
refuses a bad grammar before the engine sees it, `tools` renders tools into the prompt and parses
calls back out of the text. xgrammar is imported lazily: a server that never constrains never loads it.
"""
