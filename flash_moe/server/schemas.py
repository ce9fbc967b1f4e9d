"""Request bodies of the OpenAI and Anthropic endpoints, validated by pydantic.

Only what the server acts on is typed; unknown fields are accepted and ignored (clients send many:
``user``, ``metadata``, ``parallel_tool_calls``, ...), as the real APIs ignore what they do not know.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")


# ---- OpenAI ----------------------------------------------------------------------------------------------

class FunctionCall(_Body):
    name: str
    arguments: Union[str, dict] = "{}"


class ToolCallIn(_Body):
    id: Optional[str] = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[dict], None] = None
    name: Optional[str] = None
    tool_calls: Optional[list[ToolCallIn]] = None
    tool_call_id: Optional[str] = None
    reasoning_content: Optional[str] = None


class FunctionSpec(_Body):
    name: str = Field(min_length=1)
    description: Optional[str] = None
    parameters: Optional[dict] = None


class Tool(_Body):
    type: Literal["function"] = "function"
    function: FunctionSpec


class NamedToolChoice(_Body):
    type: Literal["function"] = "function"
    function: dict


class StreamOptions(_Body):
    include_usage: bool = False


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"] = "text"


class Sampling(_Body):
    """Fields shared by chat and text completions."""

    model: Optional[str] = None
    max_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: Optional[float] = Field(default=None, ge=0, le=2)
    top_p: Optional[float] = Field(default=None, gt=0, le=1)
    top_k: Optional[int] = Field(default=None, ge=0)
    min_p: Optional[float] = Field(default=None, ge=0, le=1)
    repetition_penalty: Optional[float] = Field(default=None, gt=0)
    seed: Optional[int] = Field(default=None, ge=0, lt=2**63)
    stop: Union[str, list[str], None] = Field(default=None, max_length=16)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    n: int = Field(default=1, ge=1, le=1)


class ChatRequest(Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)
    tools: Optional[list[Tool]] = None
    tool_choice: Union[Literal["auto", "none", "required"], NamedToolChoice, None] = None
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(default=None, ge=0, le=20)
    response_format: Optional[ResponseFormat] = None
    enable_thinking: Optional[bool] = None  # passed to the chat template (Qwen's switch)
    chat_template_kwargs: Optional[dict] = None


class CompletionRequest(Sampling):
    prompt: Union[str, list[int], list[str], list[list[int]]]
    logprobs: Optional[int] = Field(default=None, ge=0, le=20)
    echo: bool = False


# ---- Anthropic -------------------------------------------------------------------------------------------

class AnthropicMessage(_Body):
    role: Literal["user", "assistant"]
    content: Union[str, list[dict]]


class AnthropicTool(_Body):
    name: str = Field(min_length=1)
    description: Optional[str] = None
    input_schema: dict = Field(default_factory=lambda: {"type": "object", "properties": {}})


class AnthropicToolChoice(_Body):
    type: Literal["auto", "any", "tool", "none"] = "auto"
    name: Optional[str] = None


class MessagesRequest(_Body):
    model: Optional[str] = None
    max_tokens: int = Field(ge=1)
    messages: list[AnthropicMessage] = Field(min_length=1)
    system: Union[str, list[dict], None] = None
    tools: Optional[list[AnthropicTool]] = None
    tool_choice: Optional[AnthropicToolChoice] = None
    stop_sequences: Optional[list[str]] = Field(default=None, max_length=16)
    temperature: Optional[float] = Field(default=None, ge=0, le=1)
    top_p: Optional[float] = Field(default=None, gt=0, le=1)
    top_k: Optional[int] = Field(default=None, ge=0)
    stream: bool = False
    thinking: Optional[dict[str, Any]] = None
