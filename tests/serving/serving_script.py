"""What the scripted model says: a prompt containing a marker (decoded with special tokens) gets the output.

Markers that include the end of the prompt also check how the prompt was rendered (thinking mode, forced tool
calls). The first matching marker wins, so the more specific ones come first.
"""

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the weather of a city",
    "parameters": {"type": "object", "properties": {"location": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["location"]}}}  # fmt: skip
TIME_TOOL = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}

WEATHER_CALL = ("<tool_call>get_weather\n<arg_key>location</arg_key>\n<arg_value>北京</arg_value>\n"
                "<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n</tool_call>")

SCRIPT = {
    # examples/api_request.py: the second call (the tool result is in the prompt), then the first.
    "2024-06-27": "北京今天晴，气温26度。<|user|>",
    "请帮我查询一下北京的天气。": "\n<think>用户想查询北京的天气。</think>\n<tool_call>get_weather\n<arg_key>location</arg_key>\n"
                    "<arg_value>北京</arg_value>\n</tool_call><|observation|>",
    "SCRIPT_HELLO": "\n<think>Greet them.</think>\nHello there! How can I help?<|user|>",
    # Thinking off: the user turn ends with /nothink and the prompt with an empty think block.
    "SCRIPT_SWITCH/nothink<|assistant|>\n<think></think>": "Direct answer.<|user|>",
    "SCRIPT_SWITCH<|assistant|>": "\n<think>Thinking it over.</think>\nConsidered answer.<|user|>",
    "SCRIPT_TOOL<|assistant|>": "\n<think>Need the weather.</think>\n" + WEATHER_CALL + "<|observation|>",
    "SCRIPT_TWO_CALLS": "Let me check both.\n<tool_call>get_weather\n<arg_key>location</arg_key>\n"
                        "<arg_value>Paris</arg_value>\n</tool_call>\n<tool_call>get_time\n</tool_call><|observation|>",
    # Forced calls: the prompt must end inside the call, after an empty think block.
    "SCRIPT_REQUIRED<|assistant|>\n<think></think>\n<tool_call>":
        "get_weather\n<arg_key>location</arg_key>\n<arg_value>Rome</arg_value>\n</tool_call><|observation|>",
    # ... and with thinking off, where the template already wrote the empty think block.
    "SCRIPT_REQUIRED/nothink<|assistant|>\n<think></think>\n<tool_call>":
        "get_weather\n<arg_key>location</arg_key>\n<arg_value>Oslo</arg_value>\n</tool_call><|observation|>",
    "SCRIPT_NAMED<|assistant|>\n<think></think>\n<tool_call>get_time\n": "</tool_call><|observation|>",
    "SCRIPT_STOP": "alpha beta STOP gamma delta<|user|>",
    "SCRIPT_RAW_TOOL": "Calling: <tool_call>get_weather\n</tool_call><|observation|>",
    "SCRIPT_LONG_THOUGHT": "\n<think>" + "one two three four five six seven eight nine ten " * 4 + "</think>\nDone.<|user|>",
}
