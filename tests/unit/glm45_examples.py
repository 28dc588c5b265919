"""GLM45.md §1.4's rendered examples: (name, messages, tools, add_generation_prompt, template kwargs, expected).

Shared by the tests of the reference template and of glmserve's own template; expected strings copied from GLM45.md.
"""

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
}

TOOLS_HEADER = (
    "<|system|>\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with "
    "function signatures within <tools></tools> XML tags:\n<tools>\n"
)
TOOLS_FOOTER = (
    "</tools>\n\nFor each function call, output the function name and arguments within the following XML format:\n"
    "<tool_call>{function-name}\n<arg_key>{arg-key-1}</arg_key>\n<arg_value>{arg-value-1}</arg_value>\n"
    "<arg_key>{arg-key-2}</arg_key>\n<arg_value>{arg-value-2}</arg_value>\n...\n</tool_call>"
)
E8_TOOLS_BLOCK = (
    TOOLS_HEADER
    + "{\"type\": \"function\", \"function\": {\"name\": \"get_weather\", \"description\": \"Get weather\", "
    "\"parameters\": {\"type\": \"object\", \"properties\": {\"city\": {\"type\": \"string\"}, \"days\": "
    "{\"type\": \"integer\"}}, \"required\": [\"city\"]}}}\n"
    + TOOLS_FOOTER
)


def user(text):
    return {"role": "user", "content": text}


# (name, messages, tools, add_generation_prompt, template kwargs, expected), expected copied from GLM45.md §1.4.
EXAMPLES = [
    ("E1", [user("hi")], None, True, {}, "[gMASK]<sop><|user|>\nhi<|assistant|>"),
    ("E2", [user("hi")], None, True, {"enable_thinking": False},
     "[gMASK]<sop><|user|>\nhi/nothink<|assistant|>\n<think></think>"),
    ("E3", [user("hi /nothink")], None, True, {"enable_thinking": False},
     "[gMASK]<sop><|user|>\nhi /nothink<|assistant|>\n<think></think>"),
    ("E4", [{"role": "system", "content": "You are helpful."}, user("hello")], None, True, {},
     "[gMASK]<sop><|system|>\nYou are helpful.<|user|>\nhello<|assistant|>"),
    ("E5", [user("What is 2+2?"), {"role": "assistant", "content": "4", "reasoning_content": "2+2=4"},
            user("And 3+3?"), {"role": "assistant", "content": "6", "reasoning_content": "3+3=6"}], None, False, {},
     "[gMASK]<sop><|user|>\nWhat is 2+2?<|assistant|>\n<think></think>\n4<|user|>\nAnd 3+3?<|assistant|>\n"
     "<think>3+3=6</think>\n6"),
    ("E6", [user("hi"), {"role": "assistant", "content": "<think>\nreason\n</think>\nhello"}], None, False, {},
     "[gMASK]<sop><|user|>\nhi<|assistant|>\n<think>reason</think>\nhello"),
    ("E7", [user("q"), {"role": "assistant", "content": "ans"}, user("q2")], None, True, {"enable_thinking": False},
     "[gMASK]<sop><|user|>\nq/nothink<|assistant|>\n<think></think>\nans<|user|>\nq2/nothink<|assistant|>\n"
     "<think></think>"),
    ("E8", [{"role": "system", "content": "SYS"}, user("北京天气?")], [WEATHER_TOOL], True, {},
     "[gMASK]<sop>" + E8_TOOLS_BLOCK + "<|system|>\nSYS<|user|>\n北京天气?<|assistant|>"),
    ("E9", [user("weather in Beijing"),
            {"role": "assistant", "content": "", "reasoning_content": "need tool",
             "tool_calls": [{"type": "function", "function": {
                 "name": "get_weather", "arguments": {"city": "北京", "days": 3, "opts": {"a": [1, 2]}}}}]},
            {"role": "tool", "content": "{\"temp\": 26}"}, {"role": "tool", "content": "second"}],
     [WEATHER_TOOL], True, {},
     "[gMASK]<sop>" + E8_TOOLS_BLOCK + "<|user|>\nweather in Beijing<|assistant|>\n<think>need tool</think>\n"
     "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>北京</arg_value>\n<arg_key>days</arg_key>\n"
     "<arg_value>3</arg_value>\n<arg_key>opts</arg_key>\n<arg_value>{\"a\": [1, 2]}</arg_value>\n</tool_call>"
     "<|observation|>\n<tool_response>\n{\"temp\": 26}\n</tool_response>\n<tool_response>\nsecond\n"
     "</tool_response><|assistant|>"),
    ("E10", [user("q"), {"role": "assistant", "content": "Let me check.", "tool_calls": [
        {"function": {"name": "f", "arguments": {"x": 1}}}, {"name": "g", "arguments": {}}]}], None, False, {},
     "[gMASK]<sop><|user|>\nq<|assistant|>\n<think></think>\nLet me check.\n<tool_call>f\n<arg_key>x</arg_key>\n"
     "<arg_value>1</arg_value>\n</tool_call>\n<tool_call>g\n</tool_call>"),
    ("E11", [user("q"), {"role": "tool", "content": ["o1", {"output": "o2"}]}], None, True, {},
     "[gMASK]<sop><|user|>\nq<|observation|>\n<tool_response>\no1\n</tool_response>\n<tool_response>\no2\n"
     "</tool_response><|assistant|>"),
    ("E12", [user("q"), {"role": "assistant", "content": None, "reasoning_content": "r"}], None, False, {},
     "[gMASK]<sop><|user|>\nq<|assistant|>\n<think>r</think>\nNone"),
    ("E13", [user("q"), {"role": "system", "content": "S2"}, user("q2")], None, True, {},
     "[gMASK]<sop><|user|>\nq<|system|>\nS2<|user|>\nq2<|assistant|>"),
]  # fmt: skip
