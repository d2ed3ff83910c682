"""The one dataset-path check: relative image paths stay inside their dataset root."""

from __future__ import annotations

import pytest

from visguard import InputError
from visguard.core.paths import resolve_inside


class MyError(InputError):
    pass


def test_inside_paths_resolve_and_escapes_are_refused(tmp_path):
    root = tmp_path / "data"
    (root / "img").mkdir(parents=True)
    (root / "img" / "a.png").write_bytes(b"x")
    (tmp_path / "secret.png").write_bytes(b"x")
    (root / "img" / "link.png").symlink_to(tmp_path / "secret.png")
    assert resolve_inside(root, "img/a.png", where="f.json item 0") == (root / "img" / "a.png").resolve()
    assert resolve_inside(root, "img\\a.png", where="w") == (root / "img" / "a.png").resolve()
    assert resolve_inside(root, "img/a.jpg", where="w", fallback_suffixes=[".png"]).name == "a.png"
    cases = {
        "../secret.png": "escapes the dataset root",
        "img/link.png": "escapes the dataset root",
        str(tmp_path / "secret.png"): "is absolute",
        "C:\\x.png": "is absolute",
        "img/missing.png": "does not exist",
        "": "non-empty string",
        None: "non-empty string",
    }
    for rel, needle in cases.items():
        with pytest.raises(MyError, match=needle) as err:
            resolve_inside(root, rel, where="f.json item 3", error=MyError)
        assert str(err.value).startswith("f.json item 3: ")
