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
"""

from __future__ import annotations

from typing import Any

ROLES = {"prompter": "user", "assistant": "assistant"}
TREE_COLUMNS = {"message_tree_id", "prompt"}
FLAT_COLUMNS = {"message_id", "parent_id", "role", "text"}


def layout(columns: list[str] | set[str]) -> str | None:
    columns = set(columns)
    if FLAT_COLUMNS <= columns:
        return "flat"
    if TREE_COLUMNS <= columns and "completion" not in columns:
        return "trees"
    return None


def _kept(message: dict[str, Any]) -> bool:
    return not message.get("deleted") and message.get("review_result") is not False


def _preference(message: dict[str, Any]) -> tuple:
    rank = message.get("rank")
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


def tree_conversations(
    root: dict[str, Any], all_paths: bool = False, languages: set[str] | None = None
) -> list[list[dict[str, str]]]:
    """The conversations one tree yields under the rule above, as ``[{"role", "content"}]`` lists."""
    if root is None or root.get("role") != "prompter":
        return []
    if languages and root.get("lang") not in languages:
        return []
    conversations: list[list[dict[str, str]]] = []
    seen: set[tuple] = set()
    for path in _paths(root, all_paths):
        trimmed = _trim_to_last_assistant(path)
        key = tuple(id(m) for m in trimmed)
        if trimmed and key not in seen:
            seen.add(key)
            conversations.append([{"role": ROLES[m["role"]], "content": m["text"]} for m in trimmed])
    return conversations


def nest_flat_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rebuild trees from the flat table: the roots, each with nested ``replies``, in input order."""
    by_id = {m["message_id"]: {**m, "replies": []} for m in messages}
    roots = []
    for message in by_id.values():
        parent = message.get("parent_id")
        if parent is None:
            roots.append(message)
        elif parent in by_id:
            by_id[parent]["replies"].append(message)
    return roots


def conversations_batch(
    batch: dict[str, list], flat: bool, all_paths: bool, languages: list[str] | None
) -> dict[str, list]:
    """``datasets`` map over the whole table at once (trees need every message of a tree together)."""
    if flat:
        names = list(batch)
        rows = [dict(zip(names, values)) for values in zip(*batch.values())]
        roots = nest_flat_messages(rows)
    else:
        # An export can list a tree more than once; the flat table can't (message ids are unique), so
        # keep each tree's first occurrence and both layouts give the same conversations.
        unique = {root["message_id"]: root for root in reversed(batch["prompt"]) if root}
        roots = [root for root in batch["prompt"] if root and unique.pop(root["message_id"], None) is not None]
    wanted = set(languages) if languages else None
    return {"messages": [c for root in roots for c in tree_conversations(root, all_paths, wanted)]}
