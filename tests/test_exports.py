"""Pin the public surface, so the API cannot drift by accident."""

from __future__ import annotations

import types

import fgo_actors


def test_all_matches_public_names() -> None:
    public = {
        name
        for name, value in vars(fgo_actors).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert set(fgo_actors.__all__) == public
    assert len(fgo_actors.__all__) == len(set(fgo_actors.__all__))


def test_exported_objects_claim_the_package() -> None:
    for name in fgo_actors.__all__:
        obj = getattr(fgo_actors, name)
        assert getattr(obj, "__module__", "").startswith("fgo_actors"), name
