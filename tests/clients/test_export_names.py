"""`tokenwire history export -o DIR` writes inside DIR whatever name the server suggests (Security
issue, 15): a hostile or broken server cannot aim the file elsewhere."""

from __future__ import annotations

import pytest

from tokenwire.clients.commands.chat import safe_filename


@pytest.mark.parametrize("suggested,expected", [
    ("chat-My title.md", "chat-My title.md"),
    ("../../.bashrc", "chat-abc123.md"),
    ("/etc/passwd", "passwd"),
    ("..\\\\..\\\\evil.json", "evil.json"),
    ("..", "chat-abc123.md"),
    ("", "chat-abc123.md"),
    (".hidden", "chat-abc123.md"),
    ("a\nb.md", "chat-abc123.md"),
])
def test_only_a_plain_name_inside_the_folder(suggested: str, expected: str) -> None:
    assert safe_filename(suggested, "abc123", markdown=True) == expected
