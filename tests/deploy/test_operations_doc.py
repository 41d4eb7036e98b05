"""docs/operations.md stays complete: every setting the server reads and every series it
exports has a row, with the setting's default."""

from __future__ import annotations

import re

import pytest

from server.metrics import Metrics
from server.settings import Settings

from ._deploy import REPO, ess_setting_names

pytestmark = pytest.mark.deploy

DOC = (REPO / "docs" / "operations.md").read_text()


def table_rows(first_cell: str) -> dict[str, str]:
    """``| `NAME` | rest`` rows whose first cell matches ``first_cell`` -> the row's text."""
    return {m.group(1): m.group(0) for m in
            re.finditer(rf"^\| `({first_cell})` \|.*$", DOC, flags=re.MULTILINE)}


def test_every_setting_has_a_row_with_its_default():
    rows = table_rows(r"ESS_[A-Z0-9_]+")
    assert set(rows) == ess_setting_names()
    for name, field in Settings.model_fields.items():
        default = field.default
        if isinstance(default, (bool, int, float)):
            text = (str(default).lower() if isinstance(default, bool)
                    else str(default) if isinstance(default, int) else f"{default:g}")
            assert f"`{text}`" in rows["ESS_" + name.upper()], name


def test_every_metric_has_a_row():
    metrics = Metrics()
    metrics.observe_steps([0.01, 0.01], [True, False])
    exported = {m.name + ("_total" if m.type == "counter" else "")
                for m in metrics.registry.collect()}
    assert set(table_rows(r"ess_[a-z_]+")) == exported
