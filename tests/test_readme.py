"""The README's Quickstart runs as written (its Python blocks, in order, in one namespace)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def test_quickstart_runs(capsys):
    pytest.importorskip("peft")  # the LoRA block's last lines use PEFT (a test extra)
    text = README.read_text()
    quickstart = text[text.index("## Quickstart"): text.index("## API")]
    blocks = re.findall(r"```python\n(.*?)```", quickstart, re.S)
    assert len(blocks) >= 5, "the Quickstart's Python blocks were not found"
    exec(compile("\n".join(blocks), str(README), "exec"), {})
    assert "replaced 3 of 3 layer(s)" in capsys.readouterr().out  # the compression example did something
