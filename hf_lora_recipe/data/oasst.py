"""OpenAssistant (oasst1 / oasst2) message trees -> conversations.

The selection rule, the documented default:

* messages with ``deleted: true`` or ``review_result: false`` are dropped, and with them their replies;
* every language and tree state is kept (``oasst_languages`` filters on the root prompt's language);
* from each root prompt, follow at every turn the best remaining reply - lowest ``rank`` first, a
  ``null`` rank after ranked ones, ties by earliest ``created_date`` - and end the conversation at the
  last assistant message on that path; a tree with no assistant reply yields nothing;
* ``oasst_all_paths: true`` yields every root-to-leaf path instead (each ending at its last assistant
  message, duplicates removed).

Both layouts are read: the official export *trees* (``message_tree_id`` + nested ``prompt``/``replies``)
and the Hub's *flat* message table (``message_id``, ``parent_id``, ``role``, ``text``, ``rank``, ...).

Nothing is lost silently: messages no conversation can reach - a ``parent_id`` that isn't in the data, a
``parent_id`` cycle, an ancestor that is deleted, rejected or bad, a tree or message row listed twice - are
counted by reason in the data report. A flat row that can't be a message (``text`` not a non-empty string,
an unknown ``role``) is a bad row, named by its line like any other.
"""

from __future__ import annotations

from collections import Counter
from typing import Any


ROLES = {"prompter": "user", "assistant": "assistant"}
TREE_COLUMNS = {"message_tree_id", "prompt"}
FLAT_COLUMNS = {"message_id", "parent_id", "role", "text"}
# why messages that never reach a conversation went, as the data report counts them
MISSING_PARENT = "oasst messages whose parent_id is not in the data (with their replies)"
CYCLE = "oasst messages in (or under) a parent_id cycle"
UNDER_REMOVED = "oasst messages under a deleted, rejected or bad message"
DUPLICATE_MESSAGE = "oasst message rows listed twice (read once)"
DUPLICATE_TREE = "oasst trees listed twice (read once)"
NOT_A_PROMPT = "oasst trees whose root is not a prompter message"
UNUSED = {MISSING_PARENT, CYCLE, UNDER_REMOVED, DUPLICATE_MESSAGE, DUPLICATE_TREE, NOT_A_PROMPT}


def layout(columns: list[str] | set[str]) -> str | None:
    columns = set(columns)
    if FLAT_COLUMNS <= columns:
        return "flat"
    if TREE_COLUMNS <= columns and "completion" not in columns:
        return "trees"
    return None


def _flag(value: Any) -> Any:
    """A boolean field as written, or as CSV spells it ("True", "false")."""
    if isinstance(value, str):
        return {"true": True, "false": False, "": None}.get(value.strip().lower(), value)
    return value


def _kept(message: dict[str, Any]) -> bool:
    return (
        not _flag(message.get("deleted"))
        and _flag(message.get("review_result")) is not False
        and not message.get("_bad")
    )


def _rank(value: Any) -> Any:
    if isinstance(value, str):  # a CSV cell
        try:
            return float(value)
        except ValueError:
            return None
    return value


def _preference(message: dict[str, Any]) -> tuple:
    rank = _rank(message.get("rank"))
    return (rank is None, rank if rank is not None else 0, message.get("created_date") or "")


def _trim_to_last_assistant(path: list[dict[str, Any]]) -> list[dict[str, Any]]:
    last = max((i for i, m in enumerate(path) if m.get("role") == "assistant"), default=-1)
    return path[: last + 1]


def _paths(root: dict[str, Any], all_paths: bool) -> list[list[dict[str, Any]]]:
    if not _kept(root):
        return []
    replies = sorted((r for r in root.get("replies") or [] if _kept(r)), key=_preference)
    if not replies:
        return [[root]]
    chosen = replies if all_paths else replies[:1]
    return [[root, *rest] for reply in chosen for rest in _paths(reply, all_paths)]


def _wanted(root: dict[str, Any] | None, languages: set[str] | None) -> bool:
    return bool(root) and root.get("role") == "prompter" and (not languages or root.get("lang") in languages)


def tree_conversations(
    root: dict[str, Any], all_paths: bool = False, languages: set[str] | None = None
) -> list[list[dict[str, str]]]:
    """The conversations one tree yields under the rule above, as ``[{"role", "content"}]`` lists."""
    if not _wanted(root, languages):
        return []
    conversations: list[list[dict[str, str]]] = []
    seen: set[tuple] = set()
    for path in _paths(root, all_paths):
        trimmed = _trim_to_last_assistant(path)
        key = tuple(id(m) for m in trimmed)
        if trimmed and key not in seen:
            seen.add(key)
            conversations.append(
                [{"role": ROLES.get(m.get("role"), m.get("role")), "content": m.get("text")} for m in trimmed]
            )
    return conversations


def _under_removed(root: dict[str, Any]) -> int:
    """Messages of a tree dropped only because an ancestor is deleted, rejected or bad."""
    count, stack = 0, [(root, False)]
    while stack:
        message, removed_above = stack.pop()
        count += removed_above
        below = removed_above or not _kept(message)
        stack.extend((reply, below) for reply in message.get("replies") or [])
    return count


def _size(root: dict[str, Any]) -> int:
    count, stack = 0, [root]
    while stack:
        message = stack.pop()
        count += 1
        stack.extend(message.get("replies") or [])
    return count


def message_problem(message: dict[str, Any]) -> str | None:
    """Why a row of the flat table can't be part of a conversation, or None (deleted/rejected rows aren't read)."""
    if message.get("message_id") is None:
        return "field 'message_id' is missing or null"
    if not _kept({**message, "_bad": False}):
        return None
    role = message.get("role")
    if role not in ROLES:
        return f"field 'role' is {role!r}, not one of {', '.join(ROLES)}"
    text = message.get("text")
    if text is None:
        return "field 'text' is missing or null"
    if not isinstance(text, str):
        return f"field 'text' is {type(text).__name__}, not a string"
    if not text.strip():
        return "field 'text' is empty"
    return None


def nest_flat_messages(messages: list[dict[str, Any]], dropped: Counter | None = None) -> list[dict[str, Any]]:
    """Rebuild trees from the flat table: the roots, each with nested ``replies``, in input order.

    Each message keeps its row index as ``_row``. A repeated ``message_id`` is read once; messages whose
    parent is missing, or that never reach a root (a ``parent_id`` cycle), are counted in ``dropped``.
    """
    dropped = Counter() if dropped is None else dropped
    by_id: dict[Any, dict[str, Any]] = {}
    for index, message in enumerate(messages):
        if message.get("message_id") in by_id:
            dropped[DUPLICATE_MESSAGE] += 1
            continue
        by_id[message.get("message_id")] = {**message, "replies": [], "_row": message.get("_row", index)}
    roots, orphans = [], []
    for message in by_id.values():
        parent = message.get("parent_id")
        if parent is None or parent == "":  # a CSV cell
            roots.append(message)
        elif parent in by_id:
            by_id[parent]["replies"].append(message)
        else:
            orphans.append(message)
    missing = sum(_size(orphan) for orphan in orphans)
    cycle = len(by_id) - sum(_size(root) for root in roots) - missing
    if missing:
        dropped[MISSING_PARENT] += missing
    if cycle:
        dropped[CYCLE] += cycle
    return roots


def _roots(batch: dict[str, list], flat: bool, dropped: Counter) -> tuple[list[dict[str, Any]], list[int], dict]:
    """(tree roots, each root's row, {row: problem} for bad flat rows)."""
    problems: dict[int, str] = {}
    if flat:
        names = list(batch)
        rows = [dict(zip(names, values)) for values in zip(*batch.values())]
        for index, row in enumerate(rows):
            problem = message_problem(row)
            if problem:
                problems[index] = problem
                row["_bad"] = True
        roots = nest_flat_messages([row for row in rows if row.get("message_id") is not None], dropped)
        return roots, [root["_row"] for root in roots], problems
    # An export can list a tree more than once; the flat table can't (message ids are unique), so keep each
    # tree's first occurrence and both layouts give the same conversations.
    roots, where, seen = [], [], set()
    for index, root in enumerate(batch["prompt"]):
        if not isinstance(root, dict):
            problems[index] = (
                "field 'prompt' is missing or null"
                if root is None
                else f"field 'prompt' is {type(root).__name__}, not a message object"
            )
        elif root.get("message_id") in seen:
            dropped[DUPLICATE_TREE] += 1
        else:
            seen.add(root.get("message_id"))
            roots.append(root)
            where.append(index)
    return roots, where, problems


def conversations_batch(
    batch: dict[str, list], flat: bool, all_paths: bool, languages: list[str] | None
) -> dict[str, list]:
    """``datasets`` map over the whole table at once (trees need every message of a tree together).

    One output row per conversation (``messages``, ``row`` = the row of its root: the tree, or the root
    message) and one per bad row (``messages`` empty, ``problem`` says why, ``row`` = that row).
    """
    roots, where, problems = _roots(batch, flat, Counter())
    wanted = set(languages) if languages else None
    out: dict[str, list] = {"messages": [], "problem": [], "row": []}
    for root, row in zip(roots, where):
        for conversation in tree_conversations(root, all_paths, wanted):
            out["messages"].append(conversation)
            out["problem"].append("")
            out["row"].append(row)
    for row, problem in sorted(problems.items()):
        out["messages"].append([])
        out["problem"].append(problem)
        out["row"].append(row)
    return out


def dropped_messages(batch: dict[str, list], flat: bool, languages: list[str] | None) -> dict[str, list]:
    """``datasets`` map over the whole table: how many messages the rule never reaches, and why."""
    dropped: Counter = Counter()
    roots, _, _ = _roots(batch, flat, dropped)
    wanted = set(languages) if languages else None
    for root in roots:
        if root.get("role") != "prompter":
            dropped[NOT_A_PROMPT] += 1
        elif _wanted(root, wanted):
            dropped[UNDER_REMOVED] += _under_removed(root)
    reasons = [reason for reason, count in dropped.items() if count]
    return {"reason": reasons, "count": [dropped[reason] for reason in reasons]}
