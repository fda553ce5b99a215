"""The patch-window deployment's form explains every field, as the on-request forms do.

Its parameters came from the flow's signature alone: the form showed bare names (window_end,
window_minutes, hosts, window_id, trigger ...) with no word on what they do, where the other forms
(flows/params.py) describe every field.
"""

from __future__ import annotations

from prefect.utilities.callables import parameter_schema

from flows.patch_window import patch_window


def test_every_field_of_the_window_form_is_described() -> None:
    fields = parameter_schema(patch_window).model_dump()["properties"]
    undescribed = [name for name, spec in fields.items() if not spec.get("description")]
    assert not undescribed, f"patch-window form fields without a description: {undescribed}"
    assert "Resume" in fields["window_id"]["description"]
    assert "left alone" in fields["hosts"]["description"]
