"""Subject, stream and service names built from the mesh prefix (shared/names.py)."""

from __future__ import annotations

import pytest

from shared.names import Names, micro_subjects


def test_names_are_built_from_the_prefix() -> None:
    names = Names("mesh2")
    assert names.infer("digits", "3") == "mesh2.infer.digits.3"
    assert names.data_stream == "MESH2_DATA"
    assert names.micro_name("router") == "mesh2-router"
    with pytest.raises(ValueError, match="no dots"):
        Names("a.b")


def test_micro_subjects_cover_all_verbs_and_scopes() -> None:
    subjects = {s for _, s in micro_subjects("aimesh-router", "ID1")}
    assert "$SRV.PING" in subjects and "$SRV.STATS.aimesh-router" in subjects
    assert "$SRV.INFO.aimesh-router.ID1" in subjects and len(subjects) == 9
