"""Dataset rows -> conversations (``[{"role", "content"}]``), with every bad row named, never guessed at."""

from __future__ import annotations

from typing import Any

from hf_lora_recipe.data import oasst
from hf_lora_recipe.recipe.schema import RecipeError


REQUIRED_COLUMNS = {
    "alpaca": {"instruction", "output"},
    "messages": {"messages"},
    "prompt_completion": {"prompt", "completion"},
}
ROLES = ("system", "user", "assistant")


def detect_format(columns: list[str]) -> str:
    """The one format whose columns are present, else an error listing what was found."""
    found = [name for name, needed in REQUIRED_COLUMNS.items() if needed <= set(columns)]
    if oasst.layout(columns):
        found.append("oasst")
    if len(found) != 1:
        raise RecipeError(
            f"dataset_format: auto found {' and '.join(found) if found else 'no known format'} in columns "
            f"{sorted(columns)}; set dataset_format to one of alpaca, oasst, prompt_completion, messages"
        )
    return found[0]


def check_columns(columns: list[str], dataset_format: str, source: str) -> None:
    if dataset_format == "oasst":
        if oasst.layout(columns) is None:
            raise RecipeError(
                f"{source}: dataset_format oasst needs the export trees ({sorted(oasst.TREE_COLUMNS)}) or the "
                f"flat message table ({sorted(oasst.FLAT_COLUMNS)}); found {sorted(columns)}"
            )
        return
    missing = REQUIRED_COLUMNS[dataset_format] - set(columns)
    if missing:
        raise RecipeError(
            f"{source}: dataset_format {dataset_format!r} needs column(s) {sorted(missing)}; found {sorted(columns)}"
        )


def _text_problem(value: Any, field: str, allow_empty: bool = False) -> str | None:
    if value is None:
        return f"field {field!r} is missing or null"
    if not isinstance(value, str):
        return f"field {field!r} is {type(value).__name__}, not a string"
    if not allow_empty and not value.strip():
        return f"field {field!r} is empty"
    return None


def conversation_problem(messages: Any) -> str | None:
    """Why a conversation can't be trained on, or None: roles must alternate user/assistant, ending on assistant."""
    if not isinstance(messages, list) or not messages:
        return "field 'messages' is empty or not a list"
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            role = message.get("role") if isinstance(message, dict) else message
            return f"message {i}: role {role!r} is not one of {', '.join(ROLES)}"
        problem = _text_problem(message.get("content"), f"messages[{i}].content")
        if problem:
            return problem
    roles = [m["role"] for m in messages]
    start = 1 if roles[0] == "system" else 0
    for i, role in enumerate(roles[start:], start):
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if role != expected:
            return f"roles don't alternate: message {i} is {role!r}, expected {expected!r}"
    if roles[-1] != "assistant":
        return "conversation doesn't end with an assistant turn"
    return None


def alpaca_conversation(instruction: Any, input_text: Any, output: Any) -> tuple[list[dict], str | None]:
    """user = instruction (+ "\\n" + input only when input is non-empty), assistant = output."""
    problem = (
        _text_problem(instruction, "instruction")
        or (None if input_text is None else _text_problem(input_text, "input", allow_empty=True))
        or _text_problem(output, "output")
    )
    if problem:
        return [], problem
    user = instruction.strip() + (f"\n{input_text.strip()}" if input_text and input_text.strip() else "")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": output}], None


def prompt_completion_conversation(prompt: Any, completion: Any) -> tuple[list[dict], str | None]:
    if isinstance(prompt, list) and isinstance(completion, list):  # TRL's conversational prompt-completion
        messages = [*prompt, *completion]
        return messages, conversation_problem(messages)
    problem = _text_problem(prompt, "prompt") or _text_problem(completion, "completion")
    if problem:
        return [], problem
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}], None


def _plain(messages: Any) -> Any:
    if not isinstance(messages, list):
        return messages
    return [{"role": m.get("role"), "content": m.get("content")} if isinstance(m, dict) else m for m in messages]


def to_conversations(batch: dict[str, list], indices: list[int], dataset_format: str) -> dict[str, list]:
    """Batched ``datasets`` map: one conversation per row, or an empty one and the reason (``problem``)."""
    size = len(indices)
    if dataset_format == "alpaca":
        inputs = batch["input"] if "input" in batch else [None] * size
        results = [alpaca_conversation(*row) for row in zip(batch["instruction"], inputs, batch["output"])]
    elif dataset_format == "prompt_completion":
        results = [prompt_completion_conversation(p, c) for p, c in zip(batch["prompt"], batch["completion"])]
    elif dataset_format == "messages":
        results = [(_plain(m), conversation_problem(_plain(m))) for m in batch["messages"]]
    else:
        raise ValueError(dataset_format)
    return {
        "messages": [messages if not problem else [] for messages, problem in results],
        "problem": [problem or "" for _, problem in results],
        "row": list(indices),
    }


def oasst_conversations(
    batch: dict[str, list], indices: list[int], flat: bool, all_paths: bool, languages: list[str]
) -> dict[str, list]:
    """Batched ``datasets`` map over the whole table: conversations, each with the row of its tree's root."""
    out = oasst.conversations_batch(batch, flat, all_paths, languages)
    out["problem"] = [
        problem or conversation_problem(messages) or "" for messages, problem in zip(out["messages"], out["problem"])
    ]
    out["row"] = [indices[row] for row in out["row"]]
    return out


def oasst_dropped(batch: dict[str, list], flat: bool, languages: list[str]) -> dict[str, list]:
    """Batched ``datasets`` map over the whole table: the messages the OpenAssistant rule never reaches, by reason."""
    return oasst.dropped_messages(batch, flat, languages)
