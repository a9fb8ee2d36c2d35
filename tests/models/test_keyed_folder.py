"""Cache folders keyed by what an entry was built from."""

from pathlib import Path

from pimoe.models.cache import keyed_folder


def test_keyed_folder_follows_every_part_and_sanitizes_the_name(tmp_path: Path) -> None:
    parts = {"model": "abc", "settings": {"r": 8}, "phrasings": ["a", "b"]}
    folder = keyed_folder(tmp_path, "org/model name", parts)
    assert folder.parent == tmp_path and folder.name.startswith("org_model_name-")
    assert keyed_folder(tmp_path, "org/model name", dict(reversed(parts.items()))) == folder
    for key, other in (("model", "abd"), ("settings", {"r": 4}), ("phrasings", ["a"])):
        assert keyed_folder(tmp_path, "org/model name", {**parts, key: other}) != folder
