"""What a credential looks like: the one definition `check` and the manifest's Secret names share."""

from __future__ import annotations

import re

# Hugging Face, OpenAI, GitHub, Modal, AWS and Slack tokens. Each is also a valid Secret name,
# so a pasted token passes every other rule.
_PATTERN = (
    r"hf_[A-Za-z0-9]{20,}|sk-[A-Za-z0-9_-]{16,}|gh[pousr]_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,}"
    r"|(?:ak|as|wk|ws)-[A-Za-z0-9]{16,}|AKIA[A-Z0-9]{16}|xox[abp]-[A-Za-z0-9-]{10,}"
)
_WHOLE = re.compile(rf"(?:{_PATTERN})\Z")
_WITHIN = re.compile(rf"\b(?:{_PATTERN})")


def is_token(value: str) -> bool:
    """Whether the whole of `value` is a credential."""
    return _WHOLE.match(value) is not None


def find_token(text: str) -> str | None:
    """The first credential written anywhere in `text`."""
    match = _WITHIN.search(text)
    return match.group(0) if match else None
