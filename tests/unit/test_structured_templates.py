"""Tools through the chat template: a template that renders `tools` itself (Hermes / Qwen style) gets
the tools and the history's calls and results as they are; SmolLM2's own template, which does not,
gets the generic tool prompt. The real SmolLM2 tokenizer encodes both."""
from rtserve.api.tool_fields import render_turns
from rtserve.client.tokenizer import Tokenizer
from rtserve.structured.tools import ToolSpec, Turn

# The tool-calling parts of Qwen2.5's template, shortened.
HERMES_TEMPLATE = """{%- if tools %}<|im_start|>system
{{ messages[0]['content'] if messages[0]['role'] == 'system' else 'You are a helpful assistant.' }}

# Tools

<tools>{%- for tool in tools %}
{{ tool | tojson }}{%- endfor %}
</tools>

Return calls within <tool_call></tool_call> XML tags.<|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == "user" or (message.role == "assistant" and not message.tool_calls) %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% elif message.role == "assistant" %}<|im_start|>assistant
{%- for tool_call in message.tool_calls %}{%- set tool_call = tool_call.function %}
<tool_call>
{"name": "{{ tool_call.name }}", "arguments": {{ tool_call.arguments | tojson }}}
</tool_call>{%- endfor %}<|im_end|>
{% elif message.role == "tool" %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% endif %}{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

TOOLS = [ToolSpec("get_weather", "Weather", {"type": "object", "properties": {"city": {"type": "string"}}})]
TURNS = [Turn("user", "Weather in Paris?"),
         Turn("assistant", "", calls=[("call_1", "get_weather", {"city": "Paris"})]),
         Turn("tool", "sunny", call_id="call_1")]


def test_a_template_that_renders_tools_gets_them_natively():
    smol = Tokenizer.load()
    hermes = Tokenizer(smol.backend, bos_token_id=smol.bos_token_id, eos_token_ids=smol.eos_token_ids,
                       chat_template=HERMES_TEMPLATE, template_tokens={})
    text = hermes.decode(render_turns(hermes, TURNS, TOOLS))
    assert '{"type": "function", "function": {"name": "get_weather"' in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert "<|im_start|>user\n<tool_response>\nsunny\n</tool_response>" in text
    assert "You may call one or more functions" not in text  # not the generic prompt


def test_smollm2_template_gets_the_generic_prompt():
    smol = Tokenizer.load()
    text = smol.decode(render_turns(smol, TURNS, TOOLS))
    assert text.startswith("<|im_start|>system\n# Tools\n\nYou may call one or more functions")
    assert '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}' in text
    assert "<|im_start|>tool\n<tool_response>\nsunny\n</tool_response>" in text
